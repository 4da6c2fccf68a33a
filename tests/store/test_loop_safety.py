"""What keeps the nightly loop safe in the store: one active version by the
database's own rule, reserved version numbers, the fenced run lease on the
database clock, fair selection across users and quarantine of what a rolled
back version learned. On SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from store import leases
from store.db import db_now, make_engine, session_scope, upgrade
from store.pairs import build_pairs
from store.registry import activate, active_version, reserve_version, rollback
from store.run_lease import Heartbeat, LeaseLost, lease_holder, open_run, reap_stale_runs, still_holds
from store.selection import count_new_pairs, select_for_run
from store.tables import AdapterVersion, PreferencePair, TrainingRun, TrainingRunPair
from tests.store.test_pairs_and_registry import _pairs_for, make_user


@pytest.fixture
def db(database_url):
    upgrade(database_url)
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def test_the_database_refuses_a_second_active_version(db):
    with session_scope(db) as s:
        s.add_all([AdapterVersion(version=1, path="/a/v1", status="active"),
                   AdapterVersion(version=2, path="/a/v2", status="candidate")])
    with pytest.raises(IntegrityError), session_scope(db) as s:
        row = s.exec(select(AdapterVersion).where(AdapterVersion.version == 2)).one()
        row.status = "active"
        s.add(row)


def test_activation_demotes_before_it_promotes_whatever_the_row_order(db):
    with session_scope(db) as s:
        s.add_all([AdapterVersion(version=v, path=f"/a/v{v}", status="candidate") for v in (1, 2)])
    with session_scope(db) as s:
        activate(s, 2)
    with session_scope(db) as s:
        activate(s, 1)  # v1's row comes first: a single flush would write it active before v2 retires
    with session_scope(db) as s:
        statuses = {r.version: r.status for r in s.exec(select(AdapterVersion)).all()}
    assert statuses == {1: "active", 2: "retired"}


def test_reserved_numbers_skip_leftover_folders_and_are_never_reused(db, tmp_path):
    adapters = tmp_path / "adapters"
    (adapters / "v4").mkdir(parents=True)  # a crash, or a database restored from an older backup
    with session_scope(db) as s:
        first = reserve_version(s, adapters, training_run_id=None, parent_version=None)
        second = reserve_version(s, adapters, training_run_id=None, parent_version=first.version)
    assert (first.version, second.version) == (5, 6)
    assert first.status == "training" and first.path.endswith("/adapters/v5")
    with session_scope(db) as s, pytest.raises(Exception, match="still being trained"):
        activate(s, 5)


def test_the_database_clock_is_utc_and_current(db):
    with session_scope(db) as s:
        now = db_now(s)
    assert now.tzinfo is not None and abs(now - datetime.now(timezone.utc)) < timedelta(seconds=5)


def test_a_run_that_lost_its_lease_stops_and_cannot_promote(db):
    run_id = open_run(db, "manual")
    with session_scope(db) as s:
        s.get(TrainingRun, run_id).status = "running"
    heartbeat = Heartbeat(db, run_id)
    heartbeat.beat()
    heartbeat.check()
    with session_scope(db) as s:
        assert still_holds(s, run_id)
        # the lease expired and another run took it over
        assert leases.acquire(s, leases.RETRAIN, "run:999", 60, now=db_now(s) + timedelta(seconds=120))
    heartbeat.beat()
    with pytest.raises(LeaseLost):
        heartbeat.check()
    with session_scope(db) as s:
        assert not still_holds(s, run_id)


def test_a_run_marked_failed_cannot_promote_even_with_its_lease(db):
    run_id = open_run(db, "manual")
    with session_scope(db) as s:
        assert leases.current_holder(s, leases.RETRAIN) == lease_holder(run_id)
        s.get(TrainingRun, run_id).status = "failed"
    with session_scope(db) as s:
        assert not still_holds(s, run_id)


def test_a_reaped_run_fails_the_version_it_reserved(db, tmp_path):
    run_id = open_run(db, "manual")
    with session_scope(db) as s:
        reserve_version(s, tmp_path / "adapters", run_id, None)
    with session_scope(db) as s:
        assert reap_stale_runs(s, now=db_now(s) + timedelta(hours=1)) == [run_id]
    with session_scope(db) as s:
        (row,) = s.exec(select(AdapterVersion)).all()
    assert row.status == "failed" and "stopped responding" in row.error


def test_two_busy_identities_cannot_push_another_users_pairs_out_of_a_run(db):
    with session_scope(db) as s:
        spam_a, spam_b, honest = make_user(s, "a"), make_user(s, "b"), make_user(s, "honest")
        _pairs_for(s, spam_a, 20, "A")
        _pairs_for(s, spam_b, 20, "B")
        _pairs_for(s, honest, 3, "H")  # arrives last, after the backlog
        build_pairs(s, eval_share=0.0)
        selection = select_for_run(s, max_pairs_per_user=50, replay_fraction=0.0, max_train_pairs=9)
    per_user = {u: sum(p.user_id == u for p in selection.new) for u in (spam_a.id, spam_b.id, honest.id)}
    assert per_user == {spam_a.id: 3, spam_b.id: 3, honest.id: 3}
    assert selection.deferred == 34


def test_no_single_user_fills_the_held_out_set(db):
    with session_scope(db) as s:
        loud, quiet = make_user(s, "loud"), make_user(s, "quiet")
        _pairs_for(s, loud, 12, "L")
        _pairs_for(s, quiet, 2, "Q")
        build_pairs(s, eval_share=0.9999)  # everything held out
        selection = select_for_run(s, max_pairs_per_user=4, replay_fraction=0.0)
        loud_ids = sorted(p.id for p in s.exec(select(PreferencePair).where(PreferencePair.user_id == loud.id)))
    assert sum(p.user_id == loud.id for p in selection.eval) == 4
    assert sum(p.user_id == quiet.id for p in selection.eval) == 2
    assert sorted(p.id for p in selection.eval if p.user_id == loud.id) == loud_ids[-4:]  # the newest


def _promote(s, run_pairs, version, parent=None):
    run = TrainingRun(status="promoted")
    s.add(run)
    s.flush()
    s.add_all(TrainingRunPair(run_id=run.id, pair_id=p.id, role="new") for p in run_pairs)
    s.add(AdapterVersion(version=version, path=f"/a/v{version}", status="candidate", parent_version=parent,
                         training_run_id=run.id))
    s.flush()
    activate(s, version)


def test_rolling_back_quarantines_what_only_the_rolled_back_version_learned(db):
    with session_scope(db) as s:
        user = make_user(s)
        _pairs_for(s, user, 4, "one")
        build_pairs(s, eval_share=0.0)
        first = s.exec(select(PreferencePair)).all()
        _promote(s, first, 1)
        _pairs_for(s, user, 4, "two")
        build_pairs(s, eval_share=0.0)
        second = [p for p in s.exec(select(PreferencePair)).all() if p.id not in {q.id for q in first}]
        _promote(s, second, 2, parent=1)
        assert {p.id for p in select_for_run(s, 50, 0.5).replay} == set()  # nothing new: no replay needed
        rollback(s)
        assert active_version(s).version == 1
        _pairs_for(s, user, 4, "three")
        build_pairs(s, eval_share=0.0)
        assert count_new_pairs(s) == 4  # v2's pairs are not new again
        selection = select_for_run(s, 50, 0.5, seed=1)
    second_ids = {p.id for p in second}
    assert not second_ids & {p.id for p in selection.new}
    assert not second_ids & {p.id for p in selection.replay}
    assert {p.id for p in selection.replay} <= {p.id for p in first} and len(selection.replay) == 4


def test_pairs_a_run_skipped_are_not_picked_again(db):
    with session_scope(db) as s:
        user = make_user(s)
        _pairs_for(s, user, 3, "S")
        build_pairs(s, eval_share=0.0)
        pairs = s.exec(select(PreferencePair)).all()
        run = TrainingRun(status="skipped")
        s.add(run)
        s.flush()
        s.add(TrainingRunPair(run_id=run.id, pair_id=pairs[0].id, role="skipped"))
        s.flush()
        selection = select_for_run(s, 50, 0.0)
        assert count_new_pairs(s) == 2
    assert {p.id for p in selection.new} == {p.id for p in pairs[1:]}

