"""Group commit for feedback: one thread records the thumbs and A/B choices of
all concurrent requests, many per transaction.

Committing each request's write on its own costs one durable commit (an
fsync with SQLite's ``synchronous=FULL``, a WAL flush on PostgreSQL) per
write, plus a thread hop per request. Here a request hands its write
(:class:`store.feedback.Thumb` or :class:`~store.feedback.Choice`, already
checked for its shape) to :meth:`FeedbackWriter.submit` with a callback, and
the writer thread

1. takes everything queued (up to ``max_batch``) -- the writes that arrived
   while the previous batch was committing;
2. opens one transaction (``BEGIN IMMEDIATE`` on SQLite, so it waits for
   other writers with the busy timeout instead of failing halfway) and applies
   each write with Core statements (``store.feedback.apply``): one read for
   its checks, one insert or update, one read of the thumbs it pairs with;
   the pairs all the writes withdraw and build go in at the end, with one
   DELETE and one INSERT (``store.pairs.PairChanges``);
3. commits, and only then calls each write's callback with its result.

One write's refusal does not fail the others: the store's checks raise their
``StoreError`` before the write changes anything, so it is reported to that
write alone and the batch goes on. A write the *database* refuses (a value
out of range, a constraint) may have left statements in the transaction: the
batch is rolled back and done again without it, and that write gets its
error. A failure of the database itself (locked past the busy timeout, disk
full, connection lost; ``OperationalError``) or of the commit fails every
write of the batch: nothing of it was stored, and each caller is told so.

So an acknowledged write is a committed one: with SQLite in WAL mode and
``synchronous=FULL`` (``store.db``) it survives a crash of the process and a
power loss; with PostgreSQL, as far as its ``synchronous_commit`` goes (on by
default). :meth:`FeedbackWriter.close` (the server's shutdown) returns once
everything already queued is committed. The thread starts with the first
write and ends after ``idle_exit_s`` without any (the next write starts it
again), so a writer nobody closes holds no thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DataError, IntegrityError, OperationalError

from store.errors import Conflict, NotFound, NotStored, StoreError
from store.feedback import Choice, Recorded, Write, apply
from store.pairs import PairChanges

log = logging.getLogger("tuneloop.feedback_writer")

DEFAULT_MAX_BATCH = 256
"""Most writes in one transaction: the rest wait for the next (about 50-100 ms of work)."""

IDLE_EXIT_S = 30.0

Done = Callable[[Recorded | None, BaseException | None], None]
"""Called once per write from the writer thread: (result, None) after its
commit, or (None, the error) when it was not stored."""


@dataclass
class _Pending:
    write: Write
    done: Done
    result: Recorded | None = None
    error: BaseException | None = None


class _Rejected(Exception):
    """A write the database refused (not a StoreError): redo the batch without it."""

    def __init__(self, pending: _Pending, error: BaseException) -> None:
        super().__init__(str(error))
        self.pending = pending
        self.error = error


_STOP = object()


class FeedbackWriter:
    """The process's one writer of thumbs and choices into ``engine``'s database.

    ``eval_share`` (TUNELOOP_EVAL_SHARE) splits the pairs it builds;
    ``max_batch`` caps the writes per transaction. Thread-safe: ``submit``
    from any thread."""

    def __init__(self, engine: Engine, eval_share: float, max_batch: int = DEFAULT_MAX_BATCH,
                 idle_exit_s: float = IDLE_EXIT_S) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        self.engine = engine
        self.eval_share = eval_share
        self.max_batch = max_batch
        self.idle_exit_s = idle_exit_s
        self.submitted = 0
        """Writes accepted so far."""
        self.batches = 0
        """Transactions committed so far (each holds one or more writes)."""
        self.committed = 0
        """Writes committed so far."""
        self.busy_s = 0.0
        """Seconds spent writing (transactions, retries, callbacks): the writer's load."""
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._conn: Connection | None = None  # held between back-to-back batches (writer thread only)
        self.after_batch: Callable[[], None] | None = None
        """Called on the writer thread after each batch's callbacks (the writer
        process sends the batch's answers back in one message)."""

    def submit(self, write: Write, done: Done) -> None:
        """Queue ``write``; ``done`` is called from the writer thread once it is
        committed or refused. After :meth:`close`, ``done`` gets NotStored at once."""
        with self._lock:
            if not self._closed:
                self._queue.put(_Pending(write, done))
                self.submitted += 1
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="tuneloop-feedback-writer", daemon=True)
                    self._thread.start()
                return
        _call(done, None, NotStored("the server is shutting down and takes no more feedback; nothing was "
                                    "saved, send it again"))

    def queued(self) -> int:
        """Writes waiting for a transaction (approximate)."""
        return self._queue.qsize()

    def close(self, timeout: float | None = None) -> None:
        """Drain: return when every write queued before the call has been
        committed (or refused) and its callback called; writes submitted
        meanwhile are refused (NotStored). Afterwards the writer takes writes
        again, on a new thread (an app served a second time, in tests)."""
        with self._lock:
            self._closed = True
            thread = self._thread
            if thread is not None:
                self._queue.put(_STOP)
        try:
            if thread is not None:
                thread.join(timeout)
        finally:
            with self._lock:
                if thread is None or not thread.is_alive():
                    self._thread = None
                    self._closed = False

    # --- the writer thread -----------------------------------------------------

    def _run(self) -> None:
        try:
            self._serve()
        finally:  # however it ended, the next submit() starts a writer again
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            with self._lock:
                if self._thread is threading.current_thread():
                    self._thread = None

    def _serve(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=self.idle_exit_s)
            except queue.Empty:
                with self._lock:
                    if self._queue.empty():  # submit() puts under the lock: nothing can slip in now
                        self._thread = None
                        return
                continue
            if first is _STOP:
                return
            batch = [first]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            started = time.perf_counter()
            self._write(batch)
            self.busy_s += time.perf_counter() - started
            if stop:
                return

    def _write(self, batch: list[_Pending]) -> None:
        todo = batch
        while todo:
            try:
                self._transaction(todo)
                self.batches += 1
                self.committed += sum(1 for pending in todo if pending.error is None)
                break
            except _Rejected as rejected:
                rejected.pending.error = _refusal(rejected.error, rejected.pending.write)
                todo = [pending for pending in todo if pending is not rejected.pending]
            except Exception as exc:  # noqa: BLE001 - the database failed: nothing of this batch is stored
                log.warning("a batch of %d feedback writes was not stored: %s", len(todo), exc)
                for pending in todo:
                    pending.result = None
                    if not isinstance(pending.error, StoreError):  # a refused write stays refused
                        pending.error = exc
                break
        for pending in batch:
            _call(pending.done, pending.result, pending.error)
        if self.after_batch is not None:
            self.after_batch()

    def _transaction(self, todo: list[_Pending]) -> None:
        changes = PairChanges()  # every write's pair changes, applied together before the commit
        conn, self._conn = self._conn or self.engine.connect(), None
        try:
            _begin_writing(conn)
            for pending in todo:
                pending.result, pending.error = None, None
                try:
                    pending.result = apply(conn, pending.write, self.eval_share, changes)
                except StoreError as exc:  # refused by its checks, before it changed anything
                    pending.error = exc
                except OperationalError:
                    raise
                except Exception as exc:  # noqa: BLE001 - refused by the database: may have changed something
                    raise _Rejected(pending, exc) from exc
            changes.flush(conn)
            conn.commit()
        except BaseException:
            conn.close()  # rolled back; a broken connection is left to the pool to replace
            raise
        if self._queue.empty():
            conn.close()  # idle: back to the pool
        else:
            self._conn = conn  # more writes are waiting: keep it (no checkout, no ping) for the next batch


def _begin_writing(conn: Connection) -> None:
    """Start the transaction as a writer. SQLite: ``BEGIN IMMEDIATE`` takes the
    write lock now (waiting up to the busy timeout), so no read done for a
    check can be overtaken by another process's write before ours; PostgreSQL
    begins on the first statement (rows are read under its row versioning and
    the writes take their row locks)."""
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")


_NUMERIC_OUT_OF_RANGE = "22003"  # SQLSTATE class 22 "data exception": a number beyond the column's type


def _refusal(error: BaseException, write: Write) -> BaseException:
    """What to tell the caller of a write the database refused, as a store
    error (it may cross a process boundary, where a driver's error loses what
    identifies it): a unique constraint means another process recorded the
    same thumb at the same moment; a number beyond the database's integers
    (sqlite3's OverflowError, PostgreSQL's 22003) is an id no row can have."""
    if isinstance(error, IntegrityError):
        return Conflict("this feedback was recorded by another request at the same moment; send it again")
    out_of_range = isinstance(error, OverflowError) or (
        isinstance(error, DataError) and getattr(error.orig, "sqlstate", None) == _NUMERIC_OUT_OF_RANGE)
    if out_of_range:
        field, value = _target(write)
        return NotFound(f"nothing has id {value}: it is beyond the database's range", field)
    return error


def _target(write: Write) -> tuple[str, int]:
    if isinstance(write, Choice):
        return "comparison_id", write.comparison_id
    return "message_id", write.message_id


def _call(done: Done, result: Recorded | None, error: BaseException | None) -> None:
    try:
        done(result, error)
    except Exception:  # noqa: BLE001 - a caller's callback must not stop the writer
        log.exception("a feedback write's callback failed")
