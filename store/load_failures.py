"""A server that cannot load an adapter version, among several sharing one database.

Each server process (a replica) follows the active version (told of every
change, ``store.adapter_signal``) and loads it into its own engine. A replica
that fails records the failure here, under its presence claim id
(``store.presence``), and keeps serving the adapter it had: its bad disk or
full GPU must not roll back the replicas that loaded the version fine. The
version is marked ``failed`` -- and the database rolls back to the version
before it -- only once every *live* replica (announcing its presence now) has
failed to load it. One replica alone fails it at once, as before.

Whoever records a failure settles the version in the same transaction, with
the version's row locked (PostgreSQL), so two replicas failing at the same
moment see each other's failure. A replica that already failed settles again
on every re-read of the registry (``settle``, at least every
``TUNELOOP_ADAPTER_POLL_SECONDS``): when the last replica that served the
version stops announcing, the version is failed without anyone loading it again.

Example (replicas ``a`` and ``b`` announcing, v2 active)::

    record_load_failure(session, 2, "a", "CUDA out of memory")  # False: b may serve v2
    record_load_failure(session, 2, "b", "CUDA out of memory")  # True: v2 failed, v1 active
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlmodel import Session, col, select

from store.presence import live_claims
from store.registry import mark_failed
from store.tables import AdapterLoadFailure, AdapterVersion, utcnow

ERROR_CHARS = 2000


def _version_row(session: Session, version: int, lock: bool = False) -> AdapterVersion | None:
    query = select(AdapterVersion).where(AdapterVersion.version == version)
    return session.exec(query.with_for_update() if lock else query).first()


def load_failures(session: Session, version: int) -> Sequence[AdapterLoadFailure]:
    """The replicas that failed to load v``version`` since it was last activated, oldest first."""
    row = _version_row(session, version)
    if row is None:
        return []
    return session.exec(
        select(AdapterLoadFailure)
        .where(AdapterLoadFailure.adapter_version_id == row.id)
        .order_by(col(AdapterLoadFailure.failed_at), col(AdapterLoadFailure.id))
    ).all()


def failed_here(session: Session, version: int, replica: str) -> bool:
    """Whether ``replica`` failed to load v``version`` since it was last activated
    (then it does not try again until the version is activated again)."""
    return any(failure.replica == replica for failure in load_failures(session, version))


def record_load_failure(session: Session, version: int, replica: str, error: str) -> bool:
    """Record that ``replica`` could not load v``version`` (``error`` says why),
    then :func:`settle`. True when the version is now ``failed``. A version the
    database no longer knows is ignored. The caller commits."""
    row = _version_row(session, version, lock=True)
    if row is None:
        return False
    failure = session.exec(
        select(AdapterLoadFailure).where(
            AdapterLoadFailure.adapter_version_id == row.id, AdapterLoadFailure.replica == replica
        )
    ).first()
    if failure is None:
        assert row.id is not None
        failure = AdapterLoadFailure(adapter_version_id=row.id, replica=replica, error=error[:ERROR_CHARS])
    else:
        failure.error, failure.failed_at = error[:ERROR_CHARS], utcnow()
    session.add(failure)
    session.flush()
    return settle(session, version, replica)


def settle(session: Session, version: int, replica: str) -> bool:
    """Mark v``version`` failed (rolling back if it is active) when every live
    replica -- ``replica`` itself counted live -- has failed to load it. True
    when the version is ``failed``. The caller commits."""
    row = _version_row(session, version, lock=True)
    if row is None:
        return False
    if row.status == "failed":
        return True
    failures = {failure.replica: failure for failure in load_failures(session, version)}
    if replica not in failures:
        return False
    live = live_claims(session) | {replica}
    if not live <= failures.keys():
        return False
    mark_failed(session, version, _summary([failures[r] for r in sorted(live)]))
    return True


def _summary(failures: list[AdapterLoadFailure]) -> str:
    """The version's error: the one replica's, or every live replica's."""
    if len(failures) == 1:
        return failures[0].error
    lines = [f"{failure.replica}: {failure.error}" for failure in failures]
    return f"every live server ({len(failures)}) failed to load it -- " + "; ".join(lines)
