"""The adapter registry in the database: which version is active, promotion,
activation of any earlier version, and rollback.

Changing the active version here is all it takes: every server process polls
the database (``server.adapter_watcher``) and swaps the engine to the new
version without a restart. Exactly one row is ``active`` at a time (or none:
the base model serves).
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlmodel import Session, col, func, select

from server.models import AdapterVersion, utcnow


class AdapterError(ValueError):
    """An activation that cannot be done (unknown version, failed version, …)."""


def list_versions(session: Session) -> Sequence[AdapterVersion]:
    return session.exec(select(AdapterVersion).order_by(col(AdapterVersion.version))).all()


def active_version(session: Session) -> AdapterVersion | None:
    return session.exec(select(AdapterVersion).where(AdapterVersion.status == "active")).first()


def next_version_number(session: Session) -> int:
    return (session.exec(select(func.max(AdapterVersion.version))).one() or 0) + 1


def get_version(session: Session, version: int) -> AdapterVersion:
    row = session.exec(select(AdapterVersion).where(AdapterVersion.version == version)).first()
    if row is None:
        raise AdapterError(f"there is no adapter v{version}; `tuneloop adapters list` shows them")
    return row


def parse_version(text: str) -> int:
    """``"v3"`` or ``"3"`` -> 3."""
    value = text.strip().lower().removeprefix("v")
    if not value.isdigit():
        raise AdapterError(f"{text!r} is not an adapter version (write it as v3 or 3)")
    return int(value)


def activate(
    session: Session, version: int | None, previous_becomes: str = "retired"
) -> AdapterVersion | None:
    """Make ``version`` the active adapter (None: the base model). The previously
    active version becomes ``retired`` (``rolled_back`` from :func:`rollback`).
    Failed versions cannot be activated."""
    target = get_version(session, version) if version is not None else None
    if target is not None and target.status == "failed":
        raise AdapterError(f"v{version} failed to load before ({target.error}); it cannot be activated")
    current = active_version(session)
    if current is not None and (target is None or current.id != target.id):
        current.status = previous_becomes
        session.add(current)
    if target is not None and target.status != "active":
        target.status = "active"
        target.activated_at = utcnow()
        session.add(target)
    session.flush()
    return target


def rollback(session: Session) -> AdapterVersion | None:
    """Go back to the version that was active before the current one (by
    activation time), or to the base model if there was none. The version rolled
    back from is marked ``rolled_back`` so a second rollback goes further back
    instead of returning to it."""
    current = active_version(session)
    if current is None:
        raise AdapterError("no adapter is active (the base model serves); nothing to roll back")
    previous = rollback_target(session, current)
    return activate(session, previous.version if previous else None, previous_becomes="rolled_back")


def rollback_target(session: Session, current: AdapterVersion) -> AdapterVersion | None:
    """The version a rollback from ``current`` returns to: the last one active
    before it that was not itself rolled back from (None = the base model)."""
    return session.exec(
        select(AdapterVersion)
        .where(
            AdapterVersion.id != current.id,
            col(AdapterVersion.activated_at).is_not(None),
            AdapterVersion.status == "retired",
            col(AdapterVersion.activated_at) < current.activated_at,
        )
        .order_by(col(AdapterVersion.activated_at).desc())
    ).first()


def mark_failed(session: Session, version: int, error: str) -> None:
    """A version the engine could not load: never serve it, and fall back to the
    version that was active before it."""
    row = get_version(session, version)
    was_active = row.status == "active"
    if was_active:
        rollback(session)
    row.status = "failed"
    row.error = error[:2000]
    session.add(row)
    session.flush()
