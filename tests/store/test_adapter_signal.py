"""Changes to what serves signal every listener when -- and only when -- they
commit: PostgreSQL LISTEN/NOTIFY, or the SQLite signal file (inotify, and the
stat poll where inotify is missing). On SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlmodel import Session

from store.adapter_signal import listen_for_changes, signal_change, signal_file
from store.db import make_engine, session_scope, upgrade
from store.errors import VersionNotServable
from store.registry import activate, register_candidate, rollback
from store.tables import AdapterVersion

QUIET_S = 0.4  # long enough for a signal that was (wrongly) sent to arrive


@pytest.fixture
def db(database_url):
    upgrade(database_url)
    engine = make_engine(database_url)
    with session_scope(engine) as s:
        s.add_all([AdapterVersion(version=v, path=f"/adapters/v{v}", status="training") for v in (1, 2)])
        s.add(AdapterVersion(version=3, path="/adapters/v3", status="failed", error="did not load"))
    yield engine
    engine.dispose()


def in_a_transaction(db, change, commit: bool = True) -> None:
    """Run ``change(session)`` in a transaction that commits or rolls back."""
    with Session(db) as session:
        session.execute(text("SELECT 1"))
        change(session)
        if commit:
            session.commit()
        else:
            session.rollback()


async def signalled_within(changes, seconds: float) -> float | None:
    started = time.perf_counter()
    return time.perf_counter() - started if await changes.wait(seconds) else None


@pytest.mark.parametrize("use_inotify", [True, False], ids=["inotify", "stat"])
async def test_a_commit_signals_and_a_rollback_does_not(db, database_url, use_inotify):
    if not use_inotify and not database_url.startswith("sqlite"):
        pytest.skip("the stat poll is the SQLite signal file's fallback")
    async with listen_for_changes(database_url, use_inotify=use_inotify) as changes:
        assert await signalled_within(changes, 5) is not None  # listening: look once now
        assert await changes.wait(QUIET_S) is False
        await asyncio.to_thread(in_a_transaction, db, signal_change, commit=False)
        assert await changes.wait(QUIET_S) is False
        await asyncio.to_thread(in_a_transaction, db, signal_change)
        elapsed = await signalled_within(changes, 5)
        assert elapsed is not None and elapsed < 0.5
        assert await changes.wait(QUIET_S) is False  # one commit, one signal


async def test_activation_rollback_and_a_new_candidate_signal(db, database_url):
    async with listen_for_changes(database_url) as changes:
        assert await changes.wait(5)
        for change in (lambda s: register_candidate(s, 1), lambda s: activate(s, 1),
                       lambda s: register_candidate(s, 2), lambda s: activate(s, 2), rollback, rollback):
            await asyncio.to_thread(in_a_transaction, db, change)
            assert await changes.wait(5)

        def refused(session):
            with pytest.raises(VersionNotServable):
                activate(session, 3)
        await asyncio.to_thread(in_a_transaction, db, refused)
        assert await changes.wait(QUIET_S) is False


async def test_a_change_in_another_database_is_not_heard(db, tmp_path):
    other = f"sqlite:///{tmp_path / 'other.db'}"  # beside the SQLite one: the same folder is watched
    async with listen_for_changes(other) as changes:
        assert await changes.wait(5)
        await asyncio.to_thread(in_a_transaction, db, signal_change)
        assert await changes.wait(QUIET_S) is False


async def test_the_postgres_listener_comes_back_after_its_connection_dies(db, database_url):
    if not database_url.startswith("postgresql"):
        pytest.skip("a PostgreSQL connection to kill")
    async with listen_for_changes(database_url) as changes:
        assert await changes.wait(5)
        name = db.url.database

        def kill_listener() -> int:
            with db.connect() as conn:
                return len(conn.execute(text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :name AND query LIKE 'LISTEN%'"), {"name": name}).all())

        assert await asyncio.to_thread(kill_listener) == 1
        assert await signalled_within(changes, 10) is not None  # listening again: look now
        await asyncio.to_thread(in_a_transaction, db, signal_change)
        assert await signalled_within(changes, 5) is not None


def test_the_signal_file_lies_beside_the_database(tmp_path):
    assert signal_file(f"sqlite:///{tmp_path}/data/tuneloop.db") == tmp_path / "data" / "tuneloop.db.adapter-signal"
    assert signal_file("sqlite://") is None and signal_file("sqlite:///:memory:") is None
    assert signal_file("postgresql+psycopg://postgres@127.0.0.1/test") is None


async def test_touching_the_signal_file_is_a_manual_look_now(tmp_path):
    url = f"sqlite:///{tmp_path / 'tuneloop.db'}"
    async with listen_for_changes(url) as changes:
        assert await changes.wait(5)
        path = signal_file(url)
        assert isinstance(path, Path)
        path.touch()
        assert await changes.wait(5)
