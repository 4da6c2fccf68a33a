"""Named leases in the database: a lock every process sharing the database
respects (the web servers, the scheduler, the trainer, the CLI).

A lease has a holder and an expiry; the holder renews it while it works. A
holder that dies stops renewing, so its lease expires and the next caller takes
it over — a killed training run never blocks the next one. Expiries are read
and written on the database's clock (``store.db.db_now``), so machines whose
clocks disagree still agree on who holds a lease.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from sqlalchemy import or_, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from store.db import db_now
from store.tables import Lease

RETRAIN = "retrain"
SCHEDULER = "scheduler"


def _ensure_row(session: Session, name: str) -> None:
    if session.get(Lease, name) is not None:
        return
    try:
        with session.begin_nested():
            session.add(Lease(name=name))
    except IntegrityError:
        pass  # another process created it first


def acquire(session: Session, name: str, holder: str, ttl_seconds: float, now: datetime | None = None) -> bool:
    """Take lease ``name`` for ``holder`` if it is free, expired or already ours.
    Atomic across processes (a conditional UPDATE); the caller commits."""
    _ensure_row(session, name)
    now = now or db_now(session)
    taken = session.execute(
        update(Lease)
        .where(
            Lease.name == name,
            or_(Lease.holder.is_(None), Lease.holder == holder, Lease.expires_at < now),  # type: ignore[union-attr,operator]
        )
        .values(holder=holder, expires_at=now + timedelta(seconds=ttl_seconds))
    ).rowcount
    return bool(taken)


def renew(session: Session, name: str, holder: str, ttl_seconds: float) -> bool:
    """Extend our lease; False if it was taken over (we had let it expire)."""
    return bool(
        session.execute(
            update(Lease)
            .where(Lease.name == name, Lease.holder == holder)
            .values(expires_at=db_now(session) + timedelta(seconds=ttl_seconds))
        ).rowcount
    )


def release(session: Session, name: str, holder: str) -> None:
    session.execute(
        update(Lease).where(Lease.name == name, Lease.holder == holder).values(holder=None, expires_at=None)
    )


def current_holder(session: Session, name: str, lock: bool = False) -> str | None:
    """Who holds lease ``name`` now (None: free or expired). ``lock`` keeps the
    row locked until the caller's transaction ends (PostgreSQL; SQLite locks
    the whole database on the first write anyway), so a check-then-act on the
    lease cannot race a takeover."""
    query = select(Lease).where(Lease.name == name).execution_options(populate_existing=True)
    lease = session.exec(query.with_for_update() if lock else query).first()
    if lease is None or lease.holder is None or lease.expires_at is None:
        return None
    expires = lease.expires_at if lease.expires_at.tzinfo else lease.expires_at.replace(tzinfo=timezone.utc)
    return lease.holder if expires > db_now(session) else None
