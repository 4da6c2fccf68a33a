"""One server that cannot load an adapter version does not roll back the others:
the version fails only once every live replica (a presence claim) has failed
to load it. On SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from sqlmodel import select

from store.db import make_engine, session_scope, upgrade
from store.load_failures import failed_here, load_failures, record_load_failure, settle
from store.presence import announce, live_claims, withdraw
from store.registry import activate, active_version
from store.tables import AdapterVersion


@pytest.fixture
def db(database_url):
    upgrade(database_url)
    engine = make_engine(database_url)
    with session_scope(engine) as s:
        s.add_all([AdapterVersion(version=v, path=f"/adapters/v{v}", status="candidate") for v in (1, 2)])
    with session_scope(engine) as s:
        activate(s, 1)
    with session_scope(engine) as s:
        activate(s, 2)
    yield engine
    engine.dispose()


def replicas(db, *claims: str) -> None:
    for claim in claims:
        with session_scope(db) as s:
            announce(s, claim)


def fail(db, replica: str, error: str = "out of memory") -> bool:
    with session_scope(db) as s:
        return record_load_failure(s, 2, replica, error)


def state(db) -> tuple[int | None, dict[int, str], list[str]]:
    with session_scope(db) as s:
        active = active_version(s)
        statuses = {row.version: row.status for row in s.exec(select(AdapterVersion)).all()}
        failures = [f.replica for f in load_failures(s, 2)]
        return (active.version if active else None), statuses, failures


def test_one_replica_failing_leaves_the_version_to_the_others(db):
    replicas(db, "a", "b")
    with session_scope(db) as s:
        assert live_claims(s) == {"a", "b"}
    assert fail(db, "a") is False
    assert state(db) == (2, {1: "retired", 2: "active"}, ["a"])
    with session_scope(db) as s:
        assert failed_here(s, 2, "a") and not failed_here(s, 2, "b")
        assert settle(s, 2, "a") is False  # b still serves v2
        assert settle(s, 2, "b") is False  # b never failed it: nothing to settle from b


def test_every_live_replica_failing_fails_the_version_and_rolls_back(db):
    replicas(db, "a", "b")
    assert fail(db, "a", "disk error") is False
    assert fail(db, "b", "out of memory") is True
    assert state(db) == (1, {1: "active", 2: "failed"}, ["a", "b"])
    with session_scope(db) as s:
        error = s.exec(select(AdapterVersion).where(AdapterVersion.version == 2)).one().error
    assert "every live server (2)" in error and "a: disk error" in error and "b: out of memory" in error


def test_a_single_replica_failing_rolls_back_at_once(db):
    replicas(db, "a")
    assert fail(db, "a", "corrupt weights") is True
    assert state(db) == (1, {1: "active", 2: "failed"}, ["a"])
    with session_scope(db) as s:
        assert s.exec(select(AdapterVersion).where(AdapterVersion.version == 2)).one().error == "corrupt weights"


def test_a_replica_not_yet_announced_counts_itself(db):
    assert fail(db, "a") is True  # nobody announcing (a presence renewal failed): it is alone
    assert state(db)[0] == 1


def test_failures_of_stopped_replicas_do_not_count_and_the_last_one_leaving_settles(db):
    replicas(db, "gone", "a", "b")
    assert fail(db, "gone") is False
    with session_scope(db) as s:
        withdraw(s, "gone")
    assert fail(db, "a") is False  # b serves v2; gone's failure is not needed
    with session_scope(db) as s:
        withdraw(s, "b")  # the one replica that served v2 stopped
    with session_scope(db) as s:
        assert settle(s, 2, "a") is True
    assert state(db)[:2] == (1, {1: "active", 2: "failed"})


def test_activating_the_version_again_is_a_fresh_try(db):
    replicas(db, "a", "b")
    fail(db, "a")
    with session_scope(db) as s:
        activate(s, 1)
    with session_scope(db) as s:
        assert failed_here(s, 2, "a")  # kept while it is not active: its detail still shows it
        activate(s, 2)
    with session_scope(db) as s:
        assert not failed_here(s, 2, "a") and list(load_failures(s, 2)) == []


def test_failing_twice_keeps_one_row_with_the_latest_error(db):
    replicas(db, "a", "b")
    fail(db, "a", "first")
    fail(db, "a", "second")
    with session_scope(db) as s:
        assert [(f.replica, f.error) for f in load_failures(s, 2)] == [("a", "second")]
