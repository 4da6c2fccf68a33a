"""The retrain-run lease protocol: one retraining cycle at a time, across every
process that shares the database.

``open_run`` creates the ``TrainingRun`` row and takes the ``retrain`` lease
for it (holder ``run:<id>``) in one transaction, so of two requests at once
exactly one gets a run; the other gets ``CycleBusy`` naming the run in
progress. The process doing the run keeps the lease and the run's
``heartbeat_at`` fresh with a :class:`Heartbeat`; a process that dies stops
renewing, the lease expires after ``LEASE_TTL_S``, and ``reap_stale_runs``
marks its run failed, so a killed run never blocks the next one.

With trainer workers (``TUNELOOP_TRAINER=workers``) the run is opened
``queued`` with a claim deadline and the lease held until then; a worker
claims it with ``claim_queued_run`` (``SELECT ... FOR UPDATE SKIP LOCKED``,
then a conditional UPDATE, so two workers never take the same run, also on
SQLite where SKIP LOCKED does not exist) and from then on the heartbeat rules
above apply. A run no worker claimed by its deadline is failed, saying so.

The lease is a fence: a run whose renewal failed (its lease expired and may be
someone else's) stops (``Heartbeat.check`` raises ``LeaseLost``), and a run
promotes only inside a transaction that has checked it still holds the lease
and is still ``running`` (``still_holds``). Times come from the database clock.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta

from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from store import leases
from store.db import db_now, session_scope
from store.tables import AdapterVersion, TrainingRun

log = logging.getLogger("tuneloop.run_lease")

LEASE_TTL_S = 60.0
HEARTBEAT_S = 10.0  # well inside the TTL: a few missed beats (a busy database) do not lose the lease
STALE_AFTER_S = LEASE_TTL_S * 2


class LeaseLost(Exception):
    """This run no longer holds the retrain lease: it must stop and not promote."""


class CycleBusy(Exception):
    """Another retraining run holds the lease."""

    def __init__(self, run_id: int | None) -> None:
        super().__init__(f"retraining run {run_id} is already in progress")
        self.run_id = run_id


def lease_holder(run_id: int) -> str:
    return f"run:{run_id}"


def holder_run_id(holder: str | None) -> int | None:
    """``"run:7"`` -> 7; anything else -> None."""
    if holder and holder.startswith("run:") and holder[4:].isdigit():
        return int(holder[4:])
    return None


def open_run(db: Engine, trigger: str, *, claim_within_s: float | None = None) -> int:
    """Create a queued run holding the retrain lease; return its id. Raises
    CycleBusy (and creates nothing) if another run holds the lease.
    ``claim_within_s``: the run waits for a trainer worker, which must claim
    it within that many seconds; the lease is held that long meanwhile."""
    with session_scope(db) as session:
        reap_stale_runs(session)
    with session_scope(db) as session:
        run = TrainingRun(status="queued", trigger=trigger)
        if claim_within_s is not None:
            run.claim_by = db_now(session) + timedelta(seconds=claim_within_s)
        session.add(run)
        session.flush()
        ttl = max(LEASE_TTL_S, claim_within_s or 0.0)
        if not leases.acquire(session, leases.RETRAIN, lease_holder(run.id), ttl):
            holder = leases.current_holder(session, leases.RETRAIN)
            session.rollback()
            raise CycleBusy(holder_run_id(holder))
        return run.id  # type: ignore[return-value]


def release_run(session: Session, run_id: int) -> None:
    leases.release(session, leases.RETRAIN, lease_holder(run_id))


def still_holds(session: Session, run_id: int) -> bool:
    """True if run ``run_id`` still holds the retrain lease and is still running;
    the lease row stays locked until the caller's transaction ends."""
    if leases.current_holder(session, leases.RETRAIN, lock=True) != lease_holder(run_id):
        return False
    run = session.get(TrainingRun, run_id, populate_existing=True)
    return run is not None and run.status == "running"


def reap_stale_runs(session: Session, now: datetime | None = None) -> list[int]:
    """Mark runs failed whose process stopped renewing its heartbeat (killed,
    crashed, machine restarted), and the adapter versions they had reserved.
    Returns their ids."""
    now = now or db_now(session)
    stale_before = now - timedelta(seconds=STALE_AFTER_S)
    reaped = []
    for run in session.exec(select(TrainingRun).where(col(TrainingRun.status).in_(("queued", "running")))).all():
        waiting = run.status == "queued" and run.claim_by is not None and run.worker is None
        if waiting:  # queued for a trainer worker: stale only once nobody claimed it in time
            stale = _aware(run.claim_by, now) < now
            why = ("no trainer worker claimed it in time (TUNELOOP_TRAINER_CLAIM_MINUTES): is a "
                   "`tuneloop trainer` worker running against this database?")
        else:
            stale = _aware(run.heartbeat_at or run.started_at or run.created_at, now) < stale_before
            why = "the training process stopped responding (killed or crashed)"
        if stale:
            run.status = "failed"
            run.finished_at = now
            run.error = (run.error or "") + why
            session.add(run)
            release_reserved_versions(session, run.id, "its training run stopped responding")
            reaped.append(run.id)
    return reaped


def _aware(moment: datetime, now: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=now.tzinfo)


def claim_queued_run(db: Engine, worker: str) -> int | None:
    """Claim the oldest run queued for trainer workers for ``worker``; return its
    id, or None when there is none. Rows another worker is claiming are skipped
    (SKIP LOCKED), and the conditional UPDATE makes the claim exclusive even
    where row locks do not exist (SQLite)."""
    with session_scope(db) as session:
        reap_stale_runs(session)
    with session_scope(db) as session:
        candidates = session.exec(
            select(TrainingRun.id)
            .where(TrainingRun.status == "queued", col(TrainingRun.claim_by).is_not(None),
                   col(TrainingRun.worker).is_(None))
            .order_by(col(TrainingRun.id))
            .limit(1)
            .with_for_update(skip_locked=True)
        ).all()
        for run_id in candidates:
            claimed = session.execute(
                update(TrainingRun)
                .where(TrainingRun.id == run_id, TrainingRun.status == "queued",
                       col(TrainingRun.worker).is_(None))
                .values(worker=worker, heartbeat_at=db_now(session))
            ).rowcount
            if claimed and leases.current_holder(session, leases.RETRAIN) == lease_holder(run_id):
                return run_id
            session.rollback()  # taken meanwhile, or its lease lapsed (the reaper fails it)
    return None


def release_reserved_versions(session: Session, run_id: int, reason: str) -> None:
    """A version reserved by a run that ended without producing it is failed for
    good (its number is never reused)."""
    for row in session.exec(
        select(AdapterVersion).where(AdapterVersion.training_run_id == run_id, AdapterVersion.status == "training")
    ).all():
        row.status, row.error = "failed", reason
        session.add(row)


class Heartbeat:
    """Renews the retrain lease and the run's heartbeat from a thread, so a long
    training step never lets them expire while the process is alive."""

    def __init__(self, db: Engine, run_id: int) -> None:
        self.db = db
        self.run_id = run_id
        self._stop = threading.Event()
        self.lost = threading.Event()  # set when a renewal found the lease gone
        self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self.beat()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def beat(self) -> None:
        with session_scope(self.db) as session:
            if not leases.renew(session, leases.RETRAIN, lease_holder(self.run_id), LEASE_TTL_S):
                log.error("run %d lost the retrain lease; it stops", self.run_id)
                self.lost.set()
                return
            run = session.get(TrainingRun, self.run_id)
            if run is not None:
                run.heartbeat_at = db_now(session)
                session.add(run)

    def check(self) -> None:
        """Raise LeaseLost if a renewal found the lease taken over."""
        if self.lost.is_set():
            raise LeaseLost(f"run {self.run_id} lost the retrain lease (a renewal failed); it stopped")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.beat()
            except Exception:  # a busy database must not kill the training
                log.exception("heartbeat failed; retrying")
