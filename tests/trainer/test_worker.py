"""Trainer workers (TUNELOOP_TRAINER=workers): the server only queues a run; a
``tuneloop trainer`` worker claims it (SELECT ... FOR UPDATE SKIP LOCKED) and
trains it in a child process under the same lease and heartbeat. The whole
shape with real training on a fleet is in tests/fleet/test_fleet.py."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import text
from sqlmodel import select

from server import cli
from server.retraining import start_cycle
from store import leases
from store.db import db_now, make_engine, session_scope, upgrade
from store.run_lease import CycleBusy, claim_queued_run, lease_holder, open_run, reap_stale_runs
from store.tables import TrainingRun
from tests.conftest import make_settings
from trainer import worker


@pytest.fixture
def setup(database_url, tmp_path):
    settings = make_settings(tmp_path, database_url=database_url, trainer="workers")
    upgrade(database_url)
    db = make_engine(database_url)
    yield settings, db
    db.dispose()


def _run(db, run_id: int) -> TrainingRun:
    with session_scope(db) as s:
        row = s.get(TrainingRun, run_id)
        s.expunge(row)
        return row


def test_with_workers_the_server_only_queues_and_holds_the_lease(setup):
    settings, db = setup
    started = start_cycle(settings, db, "api")
    assert started.process is None and started.watcher is None
    row = _run(db, started.run_id)
    assert row.status == "queued" and row.pid is None and row.worker is None and row.claim_by is not None
    with pytest.raises(CycleBusy):  # one run in the deployment, queued or not
        start_cycle(settings, db, "api")
    # the lease lasts as long as the wait for a worker, not the 60 s of a live heartbeat
    with session_scope(db) as s:
        later = db_now(s) + timedelta(minutes=settings.trainer_claim_minutes - 1)
        assert not leases.acquire(s, leases.RETRAIN, "run:999", 60, now=later)
        assert reap_stale_runs(s, now=later) == []


def test_a_queued_run_is_claimed_once(setup):
    settings, db = setup
    run_id = start_cycle(settings, db, "api").run_id
    assert claim_queued_run(db, "gpu-1:10") == run_id
    assert claim_queued_run(db, "gpu-2:20") is None
    row = _run(db, run_id)
    assert row.worker == "gpu-1:10" and row.heartbeat_at is not None


def test_of_many_workers_claiming_at_once_exactly_one_gets_the_run(setup):
    settings, db = setup
    run_id = start_cycle(settings, db, "api").run_id
    barrier = threading.Barrier(6)
    got: list[int | None] = []

    def claim(index: int) -> None:
        barrier.wait()
        got.append(claim_queued_run(db, f"w{index}:1"))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(got, key=lambda x: x or 0) == [None] * 5 + [run_id]


@pytest.fixture
def postgres_url():
    from tests.conftest import _postgres_database

    yield from _postgres_database()


@pytest.mark.postgres
def test_a_run_another_worker_is_claiming_is_skipped_not_waited_for(postgres_url, tmp_path):
    upgrade(postgres_url)
    db = make_engine(postgres_url)
    try:
        settings = make_settings(tmp_path, database_url=postgres_url, trainer="workers")
        run_id = start_cycle(settings, db, "api").run_id
        got: list[int | None] = []
        claimer = threading.Thread(target=lambda: got.append(claim_queued_run(db, "w2:2")), daemon=True)
        with db.connect() as other:
            locked = other.execute(
                text("SELECT id FROM training_runs WHERE id = :id FOR UPDATE"), {"id": run_id}
            ).scalar()
            assert locked == run_id  # another worker is mid-claim and holds the row
            claimer.start()
            claimer.join(timeout=15)  # a claim that waited for the row lock would still be waiting
            assert not claimer.is_alive() and got == [None]
            other.rollback()
        assert claim_queued_run(db, "w2:2") == run_id
    finally:
        db.dispose()


def test_a_run_no_worker_claims_in_time_fails_saying_why(setup):
    settings, db = setup
    run_id = start_cycle(settings, db, "schedule").run_id
    with session_scope(db) as s:
        late = db_now(s) + timedelta(minutes=settings.trainer_claim_minutes + 1)
        assert reap_stale_runs(s, now=late) == [run_id]
    row = _run(db, run_id)
    assert row.status == "failed" and "no trainer worker claimed it" in row.error
    assert "tuneloop trainer" in row.error


def test_a_claimed_run_whose_worker_died_is_reaped_by_its_heartbeat(setup):
    settings, db = setup
    run_id = start_cycle(settings, db, "api").run_id
    assert claim_queued_run(db, "gpu-1:10") == run_id
    with session_scope(db) as s:
        assert reap_stale_runs(s, now=db_now(s) + timedelta(seconds=30)) == []
        assert reap_stale_runs(s, now=db_now(s) + timedelta(minutes=5)) == [run_id]
    assert "stopped responding" in _run(db, run_id).error


def test_a_local_run_is_not_for_workers(setup):
    settings, db = setup
    run_id = open_run(db, "manual")  # the embedded default's run: its own server starts the trainer
    assert claim_queued_run(db, "w:1") is None
    with session_scope(db) as s:
        assert leases.current_holder(s, leases.RETRAIN) == lease_holder(run_id)


def test_the_worker_runs_a_queued_cycle_to_its_end_in_a_child_process(setup, capsys):
    """The real trainer process (``python -m trainer run``): with no feedback yet
    the cycle ends ``skipped``; the worker records itself, the child's pid, and
    gives the lease back."""
    settings, db = setup
    run_id = start_cycle(settings, db, "api").run_id
    assert worker.serve_forever(settings, once=True) == 1
    row = _run(db, run_id)
    assert row.status == "skipped", row.error
    assert row.worker == worker.worker_name() and row.pid and row.pid != __import__("os").getpid()
    assert (settings.runs_dir / f"run-{run_id}.log").is_file()
    assert not (settings.runs_dir / f"run-{run_id}.settings.json").exists()
    with session_scope(db) as s:
        assert leases.current_holder(s, leases.RETRAIN) is None
    assert worker.serve_forever(settings, once=True) == 0  # an empty queue: nothing taken


def test_tuneloop_retrain_with_workers_queues_and_waits_for_the_decision(setup, monkeypatch, capsys):
    settings, db = setup
    monkeypatch.setattr(cli, "Settings", lambda: settings)
    done = threading.Event()

    def work() -> None:  # the worker on the GPU machine
        while not done.is_set():  # (alembic's upgrade is not thread-safe: start once the CLI's has run)
            with session_scope(db) as s:
                queued = s.exec(select(TrainingRun).where(TrainingRun.status == "queued")).first()
            if queued is not None and worker.serve_forever(settings, once=True):
                return
            done.wait(0.2)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        assert cli.main(["retrain"]) == 0
    finally:
        done.set()
        thread.join(timeout=120)
    out = capsys.readouterr().out
    assert "queued for a trainer worker" in out and "SKIPPED" in out
    with session_scope(db) as s:
        (row,) = s.exec(select(TrainingRun)).all()
    assert row.worker is not None


def test_tuneloop_trainer_once_is_a_worker_process(setup, tmp_path):
    """``tuneloop trainer`` as a platform engineer runs it: its settings from the
    environment, it claims the queued run, trains it and says so."""
    import os
    import subprocess
    import sys

    settings, db = setup
    run_id = start_cycle(settings, db, "api").run_id
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNELOOP_")} | {
        "TUNELOOP_DATABASE_URL": settings.resolved_database_url, "TUNELOOP_DATA_DIR": str(settings.data_dir),
        "TUNELOOP_MODEL": str(settings.model),
    }
    tuneloop = os.path.join(os.path.dirname(sys.executable), "tuneloop")
    done = subprocess.run([tuneloop, "trainer", "--once"], env=env, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("1 run trained") and f"claimed run {run_id}" in done.stderr
    assert _run(db, run_id).status == "skipped"
