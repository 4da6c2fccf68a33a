"""Telling every server at once that the adapter registry changed: "look now".

Whoever changes what serves -- an activation, a rollback, a version failed and
rolled back, a candidate the trainer registered -- calls :func:`signal_change`
in the same transaction (``store.registry`` does). The signal carries nothing:
the database stays the one truth, and each server re-reads it
(``server.adapter_watcher``). Servers also re-read every
``TUNELOOP_ADAPTER_POLL_SECONDS``, so a lost signal costs time, never correctness.

- **PostgreSQL**: ``NOTIFY tuneloop_adapters`` inside the transaction, which
  PostgreSQL delivers when -- and only if -- it commits; each server keeps one
  connection that ``LISTEN``s, reconnecting by itself.
- **SQLite** (one machine: the database is a local file): after the commit,
  the file ``<database>.adapter-signal`` beside the database is replaced; each
  server watches its folder with inotify (Linux) or, where there is none,
  looks at the file's ``stat`` every 50 ms. A file needs no list of listeners,
  leaves nothing stale behind when a server dies, and every process that can
  write the database (server, trainer, CLI) can write it. ``touch`` on it is a
  manual "look now". An in-memory database has no signal (the poll remains).

Example::

    with session_scope(db) as session:
        activate(session, 3)                  # signal_change(session) inside
    # committed: every server's listener wakes up

    async with listen_for_changes(db.url) as changes:
        signalled = await changes.wait(5.0)   # False when 5 s passed without one
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import struct
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from sqlalchemy import event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session

log = logging.getLogger("tuneloop.adapter_signal")

CHANNEL = "tuneloop_adapters"
SIGNAL_SUFFIX = ".adapter-signal"
STAT_POLL_S = 0.05  # where inotify is missing
RECONNECT_MIN_S, RECONNECT_MAX_S = 0.5, 30.0
# a silently dead PostgreSQL connection is noticed in about a minute (the poll covers meanwhile)
PG_KEEPALIVE = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}

_PENDING = "tuneloop_adapter_signal"  # Session.info key: a signal file to replace after the commit

# inotify(7)
IN_ATTRIB, IN_CLOSE_WRITE, IN_MOVED_TO, IN_Q_OVERFLOW = 0x4, 0x8, 0x80, 0x4000
_INOTIFY_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name


def signal_file(url: str | URL) -> Path | None:
    """The signal file of an SQLite database at ``url`` (None: not SQLite, or in memory)."""
    parsed = make_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:" \
            or database.startswith("file:"):
        return None
    path = Path(os.path.abspath(database))
    return path.with_name(path.name + SIGNAL_SUFFIX)


def signal_change(session: Session) -> None:
    """Tell every server to re-read the adapter registry once this transaction
    commits (nothing is sent if it rolls back). Call it in the transaction
    that changes the active version or adds a candidate."""
    bind = session.get_bind()
    if bind.dialect.name == "postgresql":
        session.execute(text("SELECT pg_notify(:channel, '')"), {"channel": CHANNEL})
        return
    path = signal_file(bind.engine.url)
    if path is not None:
        session.info[_PENDING] = path


@event.listens_for(Session, "after_commit")
def _replace_after_commit(session: Session) -> None:
    path = session.info.pop(_PENDING, None)
    if path is not None:
        replace_signal_file(path)


@event.listens_for(Session, "after_rollback")
def _forget_after_rollback(session: Session) -> None:
    session.info.pop(_PENDING, None)


def replace_signal_file(path: Path) -> None:
    """Replace ``path`` (a rename: watchers see one complete change). Never raises:
    without it servers still notice within their poll interval."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(uuid.uuid4().hex)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not signal servers through %s (%s); they notice within "
                    "TUNELOOP_ADAPTER_POLL_SECONDS", path, exc)
        with contextlib.suppress(OSError):
            tmp.unlink()


class ChangeListener:
    """What a server awaits: a change signal, or its poll interval running out."""

    def __init__(self) -> None:
        self._changed = asyncio.Event()

    def set(self) -> None:
        self._changed.set()

    async def wait(self, timeout: float) -> bool:
        """Return True as soon as a change is signalled (at once if one came since
        the last call), False after ``timeout`` seconds without one."""
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
            signalled = True
        except asyncio.TimeoutError:
            signalled = False
        self._changed.clear()
        return signalled


@contextlib.asynccontextmanager
async def listen_for_changes(url: str | URL, use_inotify: bool = True) -> AsyncIterator[ChangeListener]:
    """Listen for :func:`signal_change` on the database at ``url`` while the
    block runs. The listener fires once when it starts listening (whatever
    changed before then is seen by the re-read that causes), and again after
    every reconnection. ``use_inotify=False`` forces the stat poll (tests)."""
    listener = ChangeListener()
    parsed = make_url(url)
    path = signal_file(parsed)
    if parsed.get_backend_name() == "postgresql":
        runner = _listen_postgres(listener, parsed)
    elif path is not None:
        runner = _watch_file(listener, path, use_inotify)
    else:
        runner = None
    task = asyncio.create_task(runner, name="tuneloop-adapter-signal") if runner is not None else None
    try:
        yield listener
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def _listen_postgres(listener: ChangeListener, url: URL) -> None:
    import psycopg

    conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
    delay = RECONNECT_MIN_S
    while True:
        try:
            connection = await psycopg.AsyncConnection.connect(conninfo, autocommit=True, **PG_KEEPALIVE)
            async with connection:
                await connection.execute(f"LISTEN {CHANNEL}")
                listener.set()
                delay = RECONNECT_MIN_S
                async for _ in connection.notifies():
                    listener.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure: reconnect, polling meanwhile
            log.warning("not listening for adapter changes (%s: %s); retrying in %.1f s, polling meanwhile",
                        type(exc).__name__, exc, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, RECONNECT_MAX_S)


async def _watch_file(listener: ChangeListener, path: Path, use_inotify: bool) -> None:
    fd = _inotify_watch(path.parent) if use_inotify else None
    if fd is None:
        await _watch_by_stat(listener, path)
        return
    name = os.fsencode(path.name)
    loop = asyncio.get_running_loop()

    def readable() -> None:
        try:
            data = os.read(fd, 64 * 1024)
        except BlockingIOError:
            return
        if any(event_name == name or mask & IN_Q_OVERFLOW for mask, event_name in _inotify_events(data)):
            listener.set()

    loop.add_reader(fd, readable)
    listener.set()
    try:
        await asyncio.Future()  # until cancelled
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def _inotify_watch(folder: Path) -> int | None:
    """A non-blocking inotify descriptor watching ``folder`` for files written or
    renamed into it; None where inotify is missing or refused (watch limits)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, AttributeError):
        return None
    if fd < 0:
        log.warning("no inotify (%s): watching the adapter signal file every %.0f ms",
                    os.strerror(ctypes.get_errno()), STAT_POLL_S * 1000)
        return None
    if libc.inotify_add_watch(fd, os.fsencode(folder), IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_TO) < 0:
        log.warning("cannot watch %s with inotify (%s): watching the adapter signal file every %.0f ms",
                    folder, os.strerror(ctypes.get_errno()), STAT_POLL_S * 1000)
        os.close(fd)
        return None
    return fd


def _inotify_events(data: bytes) -> list[tuple[int, bytes]]:
    """(mask, name) of each event in a read from an inotify descriptor."""
    events, offset = [], 0
    while offset + _INOTIFY_EVENT.size <= len(data):
        _, mask, _, length = _INOTIFY_EVENT.unpack_from(data, offset)
        start = offset + _INOTIFY_EVENT.size
        events.append((mask, data[start:start + length].split(b"\0", 1)[0]))
        offset = start + length
    return events


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_ino, stat.st_size


async def _watch_by_stat(listener: ChangeListener, path: Path) -> None:
    last = _stamp(path)
    listener.set()
    while True:
        await asyncio.sleep(STAT_POLL_S)
        stamp = _stamp(path)  # a stat of a local file: microseconds, fine on the event loop
        if stamp != last:
            last = stamp
            listener.set()
