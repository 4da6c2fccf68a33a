"""The retrain-run lease protocol: one retraining cycle at a time, across every
process that shares the database.

``open_run`` creates the ``TrainingRun`` row and takes the ``retrain`` lease
for it (holder ``run:<id>``) in one transaction, so of two requests at once
exactly one gets a run; the other gets ``CycleBusy`` naming the run in
progress. The process doing the run keeps the lease and the run's
``heartbeat_at`` fresh with a :class:`Heartbeat`; a process that dies stops
renewing, the lease expires after ``LEASE_TTL_S``, and ``reap_stale_runs``
marks its run failed, so a killed run never blocks the next one.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from store import leases
from store.db import session_scope
from store.tables import TrainingRun, utcnow

log = logging.getLogger("tuneloop.run_lease")

LEASE_TTL_S = 60.0
HEARTBEAT_S = 10.0  # well inside the TTL: a few missed beats (a busy database) do not lose the lease
STALE_AFTER_S = LEASE_TTL_S * 2


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


def open_run(db: Engine, trigger: str) -> int:
    """Create a queued run holding the retrain lease; return its id. Raises
    CycleBusy (and creates nothing) if another run holds the lease."""
    with session_scope(db) as session:
        reap_stale_runs(session)
    with session_scope(db) as session:
        run = TrainingRun(status="queued", trigger=trigger)
        session.add(run)
        session.flush()
        if not leases.acquire(session, leases.RETRAIN, lease_holder(run.id), LEASE_TTL_S):
            holder = leases.current_holder(session, leases.RETRAIN)
            session.rollback()
            raise CycleBusy(holder_run_id(holder))
        return run.id  # type: ignore[return-value]


def release_run(session: Session, run_id: int) -> None:
    leases.release(session, leases.RETRAIN, lease_holder(run_id))


def reap_stale_runs(session: Session, now: datetime | None = None) -> list[int]:
    """Mark runs failed whose process stopped renewing its heartbeat (killed,
    crashed, machine restarted). Returns their ids."""
    now = now or utcnow()
    stale_before = now - timedelta(seconds=STALE_AFTER_S)
    reaped = []
    for run in session.exec(select(TrainingRun).where(col(TrainingRun.status).in_(("queued", "running")))).all():
        last = run.heartbeat_at or run.started_at or run.created_at
        if last.tzinfo is None:
            last = last.replace(tzinfo=now.tzinfo)
        if last < stale_before:
            run.status = "failed"
            run.finished_at = now
            run.error = (run.error or "") + "the training process stopped responding (killed or crashed)"
            session.add(run)
            reaped.append(run.id)
    return reaped


class Heartbeat:
    """Renews the retrain lease and the run's heartbeat from a thread, so a long
    training step never lets them expire while the process is alive."""

    def __init__(self, db: Engine, run_id: int) -> None:
        self.db = db
        self.run_id = run_id
        self._stop = threading.Event()
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
            leases.renew(session, leases.RETRAIN, lease_holder(self.run_id), LEASE_TTL_S)
            run = session.get(TrainingRun, self.run_id)
            if run is not None:
                run.heartbeat_at = utcnow()
                session.add(run)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.beat()
            except Exception:  # a busy database must not kill the training
                log.exception("heartbeat failed; retrying")
