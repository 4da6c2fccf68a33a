"""Holding the database's write lock from another connection, so that a
group-commit writer's transaction waits and the writes submitted meanwhile
queue up as one batch (deterministic batches in tests)."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from typing import Any

from sqlalchemy import create_engine
from sqlalchemy.engine import make_url


@contextlib.contextmanager
def write_lock_held(url: str, tables: tuple[str, ...] = ("feedback", "comparisons")) -> Iterator[None]:
    """Until the block ends, no other connection may write: SQLite's whole
    file (``BEGIN EXCLUSIVE``), or ``tables`` on PostgreSQL."""
    if url.startswith("sqlite"):
        blocker = sqlite3.connect(make_url(url).database, timeout=1)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            blocker.rollback()
            blocker.close()
        return
    engine = create_engine(url)
    with engine.connect() as conn:
        conn.exec_driver_sql(f"LOCK TABLE {', '.join(tables)} IN ACCESS EXCLUSIVE MODE")
        try:
            yield
        finally:
            conn.rollback()
    engine.dispose()


class Outcomes:
    """Collects each write's (result, error) from the writer's thread."""

    def __init__(self) -> None:
        self.by_key: dict[str, tuple] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)

    def callback(self, key: str):
        def done(result, error):
            with self._changed:
                self.by_key[key] = (result, error)
                self._changed.notify_all()
        return done

    def wait(self, count: int, timeout: float = 60) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.by_key) >= count, timeout):
                raise AssertionError(f"only {len(self.by_key)} of {count} writes were answered")


def submit_while_locked(url: str, writer: Any, writes: dict, outcomes: Outcomes,
                        tables: tuple[str, ...] = ("feedback", "comparisons")) -> None:
    """Submit the first write alone (the writer takes it and waits on the
    lock), then the rest (they queue as the next batch); nothing may be
    acknowledged before the lock goes."""
    keys = list(writes)
    with write_lock_held(url, tables):
        writer.submit(writes[keys[0]], outcomes.callback(keys[0]))
        time.sleep(0.3)
        for key in keys[1:]:
            writer.submit(writes[key], outcomes.callback(key))
        time.sleep(0.3)
        assert outcomes.by_key == {}, "acknowledged before the commit"
    outcomes.wait(len(keys))
