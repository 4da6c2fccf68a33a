"""Which server processes are alive, for claims on answers being generated.

Each server process has a claim id made new at every boot
(``host:pid:random``) and holds a lease ``server:<claim id>`` that it renews
while it runs. An answer left ``streaming`` under a claim whose lease is gone
was abandoned (the process died, its container restarted -- where host and pid
repeat, which is why the id is per boot) and goes back to ``pending``, so the
next viewer regenerates it: the question was accepted and is never lost.
"""

from __future__ import annotations

import os
import socket
import uuid

from sqlalchemy import delete, update
from sqlmodel import Session, col, select

from store import leases
from store.db import db_now
from store.tables import Lease, Message

PREFIX = "server:"
TTL_S = 30.0
RENEW_S = 10.0


def new_claim_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def announce(session: Session, claim_id: str) -> None:
    """Take or renew this process's presence lease (every RENEW_S)."""
    leases.acquire(session, PREFIX + claim_id, claim_id, TTL_S)


def withdraw(session: Session, claim_id: str) -> None:
    session.execute(delete(Lease).where(Lease.name == PREFIX + claim_id))


def alive(session: Session, claim_id: str | None) -> bool:
    return bool(claim_id) and leases.current_holder(session, PREFIX + claim_id) == claim_id


def live_claims(session: Session) -> set[str]:
    """Claim ids of every server process announcing itself now (its presence
    lease unexpired on the database clock): the live replicas."""
    rows = session.exec(
        select(Lease.name, Lease.holder).where(
            col(Lease.name).startswith(PREFIX), col(Lease.expires_at) > db_now(session)
        )
    ).all()
    return {holder for name, holder in rows if holder and name == PREFIX + holder}


def recover_abandoned_answers(session: Session, message_ids: list[int] | None = None) -> int:
    """Answers ``streaming`` under a claim that is no longer alive go back to
    ``pending`` (all of them, or those in ``message_ids``); expired presence
    leases are dropped. Returns how many answers were recovered."""
    query = select(Message.id, Message.claimed_by).where(Message.status == "streaming")
    if message_ids is not None:
        query = query.where(col(Message.id).in_(message_ids))
    rows = session.exec(query).all()
    live = {claim for claim in {c for _, c in rows} if alive(session, claim)}
    dead = [(i, claim) for i, claim in rows if claim not in live]
    for message_id, claim in dead:
        # conditional: a process that claimed it again meanwhile keeps it
        session.execute(
            update(Message)
            .where(Message.id == message_id, Message.status == "streaming", Message.claimed_by == claim)
            .values(status="pending", content="", claimed_by=None)
        )
    session.execute(
        delete(Lease).where(col(Lease.name).startswith(PREFIX), col(Lease.expires_at) < db_now(session))
    )
    return len(dead)
