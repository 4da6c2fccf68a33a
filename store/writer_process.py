"""The group-commit writer in a process of its own.

:class:`~store.feedback_writer.FeedbackWriter` commits the feedback of
concurrent requests together, but in the server's interpreter: its Core
statements, pair building and hashing share one GIL with the event loop that
parses the requests, so a busy server is bound by one core however many it
has (measured: the writer thread ~56 % and the event loop ~44 % of one core,
the second core nearly idle). :class:`WriterProcess` has the same interface
(``submit``, ``close``, ``queued`` and the counters) and runs the writer in a
child process on its own connection to the same database:

- ``submit`` (any thread, the event loop's included) only queues the write; a
  sender thread hands everything queued to the child in one pickled message,
  so the event loop never blocks on the pipe;
- the child feeds its ``FeedbackWriter``, which commits batches exactly as in
  the server, and after each commit sends the batch's results back in one
  message; a receiver thread here calls each write's ``done``. An
  acknowledged write is still a committed one.

Failures: a child that dies (killed, out of memory) fails every write it
held with NotStored -- "may not have been saved, send it again": some may
have been committed just before, and thumbs and choices are idempotent -- and
the next write starts a new child. A server that dies closes the pipe: the
child commits what it already read (none of it acknowledged) and exits.

The child is started with ``spawn`` (the server has vLLM's threads: never
fork them) on the first write or :meth:`start`; an in-memory SQLite
database has nothing a second process can open, so ``store.feedback_writer``
stays the writer there (``make_feedback_writer``).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import pickle
import threading
from collections import deque
from multiprocessing.connection import Connection as Pipe
from typing import Any

from sqlalchemy.engine import Engine, make_url

from store.errors import NotStored
from store.feedback import Recorded, Write
from store.feedback_writer import DEFAULT_MAX_BATCH, Done, FeedbackWriter

log = logging.getLogger("tuneloop.writer_process")

START_TIMEOUT_S = 60.0
"""How long the child may take to import the store and connect."""

_LOST = ("the feedback writer process stopped; this write may not have been saved, send it again")


class WriterProcess:
    """Group commit of thumbs, choices and corrections in a child process
    writing to ``url``. Thread-safe; same interface as FeedbackWriter."""

    def __init__(self, url: str, eval_share: float, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        self.url = url
        self.eval_share = eval_share
        self.max_batch = max_batch
        self.submitted = 0
        self.batches = 0
        self.committed = 0
        self.busy_s = 0.0
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._outbox: deque[tuple[int, Write]] = deque()  # queued, not yet sent to the child
        self._pending: dict[int, Done] = {}  # sent or queued, not yet answered
        self._seq = 0
        self._child: _Child | None = None
        self._closed = False

    # --- the server's side -------------------------------------------------------

    def start(self) -> None:
        """Start the child now (the server's start-up), not on the first write."""
        with self._lock:
            if not self._closed:
                self._ensure_child()

    def submit(self, write: Write, done: Done) -> None:
        with self._lock:
            if not self._closed:
                self._seq += 1
                self._pending[self._seq] = done
                self._outbox.append((self._seq, write))
                self.submitted += 1
                self._ensure_child()
                self._wake.notify()
                return
        _call(done, None, NotStored("the server is shutting down and takes no more feedback; nothing was "
                                    "saved, send it again"))

    def queued(self) -> int:
        """Writes not yet answered by the child (approximate)."""
        return len(self._pending)

    def close(self, timeout: float | None = None) -> None:
        """Drain: return once every write submitted before the call is committed
        (or refused) and answered; later writes are refused. Afterwards the
        writer takes writes again, in a new child."""
        with self._lock:
            self._closed = True
            child = self._child
            self._wake.notify_all()
        try:
            if child is not None:
                child.stop(timeout)
        finally:
            with self._lock:
                self._child = None
                self._closed = False

    def _ensure_child(self) -> None:  # under the lock
        if self._child is None or not self._child.alive:
            self._child = _Child(self)


class _Child:
    """One child process and the two threads that talk to it."""

    def __init__(self, owner: WriterProcess) -> None:
        self.owner = owner
        context = multiprocessing.get_context("spawn")
        self.pipe, child_end = context.Pipe(duplex=True)
        self.process = context.Process(
            target=_child_main, args=(child_end, owner.url, owner.eval_share, owner.max_batch),
            name="tuneloop-feedback-writer", daemon=True,
        )
        self.process.start()
        child_end.close()
        self.alive = True
        self._stopping = False
        self.sender = threading.Thread(target=self._send, name="tuneloop-writer-sender", daemon=True)
        self.receiver = threading.Thread(target=self._receive, name="tuneloop-writer-receiver", daemon=True)
        self.sender.start()
        self.receiver.start()

    def stop(self, timeout: float | None) -> None:
        with self.owner._lock:
            self._stopping = True
            self.owner._wake.notify_all()
        self.sender.join(timeout)
        self.receiver.join(timeout)  # ends when the child, having answered everything, exits
        self.process.join(timeout)

    def _send(self) -> None:
        owner = self.owner
        while True:
            with owner._lock:
                while not owner._outbox and not self._stopping and self.alive:
                    owner._wake.wait()
                if not self.alive:
                    return
                batch = list(owner._outbox)
                owner._outbox.clear()
                stopping = self._stopping and not batch
            try:
                if batch:
                    self.pipe.send(("writes", batch))
                if stopping:
                    self.pipe.send(("close",))
                    return
            except (OSError, EOFError, ValueError):
                return  # the child is gone: the receiver fails what it held

    def _receive(self) -> None:
        owner = self.owner
        try:
            while True:
                message = self.pipe.recv()
                if message[0] == "ready":
                    continue
                _, answers, batches, committed, busy_s = message
                with owner._lock:
                    owner.batches, owner.committed, owner.busy_s = batches, committed, busy_s
                    dones = [(owner._pending.pop(seq, None), result, error) for seq, result, error in answers]
                for done, result, error in dones:
                    if done is not None:
                        _call(done, result, error)
        except (EOFError, OSError):
            pass  # the child exited (closed, or died)
        finally:
            self._lost()

    def _lost(self) -> None:
        """The child is gone: every write still unanswered fails (outcome unknown)."""
        owner = self.owner
        with owner._lock:
            self.alive = False
            owner._wake.notify_all()
            unanswered = list(owner._pending.values())
            owner._pending.clear()
            owner._outbox.clear()
        self.pipe.close()
        if unanswered and not self._stopping:
            log.warning("the feedback writer process stopped with %d writes unanswered", len(unanswered))
        for done in unanswered:
            _call(done, None, NotStored(_LOST))


# --- the child process ---------------------------------------------------------------


def _child_main(pipe: Pipe, url: str, eval_share: float, max_batch: int) -> None:
    from store.db import make_engine  # the child's own engine and pool

    engine = make_engine(url)
    writer = FeedbackWriter(engine, eval_share, max_batch=max_batch, idle_exit_s=3600.0)
    send_lock = threading.Lock()
    answers: list[tuple[int, Recorded | None, BaseException | None]] = []

    def after_batch() -> None:  # on the writer thread, after a batch's commit
        with send_lock:
            batch, answers[:] = list(answers), []
            with contextlib.suppress(OSError, ValueError):  # the server is gone: nobody waits for them
                pipe.send(("answers", [_picklable(answer) for answer in batch],
                           writer.batches, writer.committed, writer.busy_s))

    writer.after_batch = after_batch
    pipe.send(("ready",))
    try:
        while True:
            try:
                message = pipe.recv()
            except (EOFError, OSError):
                break  # the server is gone: commit what was read, then exit
            if message[0] == "close":
                break
            for seq, write in message[1]:
                writer.submit(write, _collector(answers, seq))
    finally:
        writer.close()
        engine.dispose()


def _collector(answers: list, seq: int) -> Done:
    def done(result: Recorded | None, error: BaseException | None) -> None:
        answers.append((seq, result, error))
    return done


def _picklable(answer: tuple[int, Any, BaseException | None]) -> tuple[int, Any, BaseException | None]:
    seq, result, error = answer
    if error is not None:
        try:
            pickle.loads(pickle.dumps(error))
        except Exception:  # noqa: BLE001 - a driver's error that does not survive pickling
            error = NotStored(f"the database refused the write: {error}")
    return seq, result, error


def _call(done: Done, result: Recorded | None, error: BaseException | None) -> None:
    try:
        done(result, error)
    except Exception:  # noqa: BLE001 - a caller's callback must not stop the writer
        log.exception("a feedback write's callback failed")


def make_feedback_writer(db: Engine, eval_share: float, mode: str = "auto") -> FeedbackWriter | WriterProcess:
    """The server's writer: ``process`` (its own interpreter), ``thread`` (in
    the server's), or ``auto``: a process, unless the database is an in-memory
    SQLite that no other process can open."""
    url = db.url
    in_memory = url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")
    if mode == "thread" or (mode == "auto" and in_memory):
        return FeedbackWriter(db, eval_share)
    if in_memory:
        raise ValueError("TUNELOOP_FEEDBACK_WRITER=process needs a database another process can open, "
                         "not an in-memory SQLite")
    return WriterProcess(make_url(url).render_as_string(hide_password=False), eval_share)
