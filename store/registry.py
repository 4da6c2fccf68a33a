"""The adapter registry in the database: which version is active, promotion,
activation of any earlier version, rollback, failed versions and lineage.

Changing the active version here is all it takes: the change signals every
server process when it commits (``store.adapter_signal``), and each re-reads
the database and swaps its engine to the new version without a restart.
Registering a candidate signals too, so servers load and warm it while the
gate decides. Exactly one row is ``active`` at a time (or none: the base
model serves).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import delete
from sqlmodel import Session, col, func, select

from store.adapter_signal import signal_change
from store.errors import Conflict, InvalidInput, UnknownAdapterVersion, VersionNotServable
from store.tables import (
    AdapterLoadFailure,
    AdapterVersion,
    Feedback,
    PreferencePair,
    TrainingRun,
    TrainingRunExample,
    TrainingRunPair,
    utcnow,
)

BASE = "base"


def list_versions(session: Session) -> Sequence[AdapterVersion]:
    return session.exec(select(AdapterVersion).order_by(col(AdapterVersion.version))).all()


def active_version(session: Session, lock: bool = False) -> AdapterVersion | None:
    """The active version (None: the base model serves). ``lock`` holds its row
    until the transaction ends (PostgreSQL), for a read-then-change."""
    query = select(AdapterVersion).where(AdapterVersion.status == "active")
    return session.exec(query.with_for_update() if lock else query).first()


def next_version_number(session: Session, adapters_dir: Path | None = None) -> int:
    """One above every version the database knows and every ``vN`` folder in
    ``adapters_dir``: a folder left behind (a crash, a database restored from
    backup) is never overwritten or reused."""
    highest = session.exec(select(func.max(AdapterVersion.version))).one() or 0
    if adapters_dir is not None and adapters_dir.is_dir():
        numbers = [int(p.name[1:]) for p in adapters_dir.iterdir() if p.name[:1] == "v" and p.name[1:].isdigit()]
        highest = max([highest, *numbers])
    return highest + 1


def reserve_version(
    session: Session, adapters_dir: Path, training_run_id: int, parent_version: int | None
) -> AdapterVersion:
    """Reserve the next version number for a run before it trains (status
    ``training``, folder ``adapters_dir/vN``), so no two runs and no leftover
    folder ever share N. The caller commits."""
    number = next_version_number(session, adapters_dir)
    row = AdapterVersion(
        version=number, path=str((adapters_dir / f"v{number}").resolve()), status="training",
        parent_version=parent_version, training_run_id=training_run_id,
    )
    session.add(row)
    session.flush()
    return row


def get_version(session: Session, version: int) -> AdapterVersion:
    row = session.exec(select(AdapterVersion).where(AdapterVersion.version == version)).first()
    if row is None:
        raise UnknownAdapterVersion(f"there is no adapter v{version}; `tuneloop adapters list` shows them")
    return row


def version_id(session: Session, version: int) -> int:
    """The row id of version N (raises UnknownAdapterVersion)."""
    return get_version(session, version).id  # type: ignore[return-value]


def parse_version(text: str) -> int | None:
    """The one reader of version names (API, dashboard, CLI): ``"v3"`` or ``"3"``
    -> 3, ``"base"`` -> None (the base model, no adapter).

    >>> parse_version("v3"), parse_version("3"), parse_version("Base")
    (3, 3, None)
    """
    value = text.strip().lower()
    if value == BASE:
        return None
    number = value.removeprefix("v")
    if not number.isdigit() or len(number) > 9:
        raise InvalidInput(
            f"{text!r} is not an adapter version (write it as v3 or 3, or base for the base model)", "version"
        )
    return int(number)


def version_name(version: int | None) -> str:
    """3 -> ``"v3"``; None -> ``"base"``."""
    return BASE if version is None else f"v{version}"


def activate(
    session: Session, version: int | None, previous_becomes: str = "retired"
) -> AdapterVersion | None:
    """Make ``version`` the active adapter (None: the base model). The previously
    active version becomes ``retired`` (``rolled_back`` from :func:`rollback`).
    Failed versions, and versions still training, cannot be activated.

    The active row is locked while it changes, and the demotion is written
    before the promotion, so the database's one-active index never sees two.
    Servers are signalled when the caller commits."""
    target = get_version(session, version) if version is not None else None
    if target is not None and target.status == "failed":
        raise VersionNotServable(f"v{version} failed to load before ({target.error}); it cannot be activated")
    if target is not None and target.status == "training":
        raise VersionNotServable(f"v{version} is still being trained; it cannot be activated yet")
    current = active_version(session, lock=True)
    if current is not None and (target is None or current.id != target.id):
        current.status = previous_becomes
        session.add(current)
        session.flush()
    if target is not None and target.status != "active":
        target.status = "active"
        target.activated_at = utcnow()
        session.add(target)
        # a fresh activation is a fresh try for every replica (store.load_failures)
        session.execute(delete(AdapterLoadFailure).where(col(AdapterLoadFailure.adapter_version_id) == target.id))
    session.flush()
    signal_change(session)
    return target


def register_candidate(session: Session, version: int) -> AdapterVersion:
    """A trained version now awaiting the gate: status ``candidate``, and servers
    are signalled, so they load and warm it while the gate decides and its
    promotion is a pointer flip. The caller commits."""
    row = get_version(session, version)
    row.status = "candidate"
    session.add(row)
    session.flush()
    signal_change(session)
    return row


def versions_to_keep_loaded(session: Session, active: AdapterVersion | None) -> list[AdapterVersion]:
    """Besides the ``active`` version, the versions a server should keep loaded,
    most wanted first: the newest candidate (the gate may promote it any
    moment), then the version a rollback from ``active`` returns to."""
    wanted = []
    candidate = session.exec(
        select(AdapterVersion).where(AdapterVersion.status == "candidate").order_by(col(AdapterVersion.version).desc())
    ).first()
    if candidate is not None:
        wanted.append(candidate)
    previous = rollback_target(session, active) if active is not None and active.activated_at else None
    if previous is not None:
        wanted.append(previous)
    return wanted


def rollback(session: Session) -> AdapterVersion | None:
    """Go back to the version that was active before the current one (by
    activation time), or to the base model if there was none. The version rolled
    back from is marked ``rolled_back`` so a second rollback goes further back
    instead of returning to it."""
    current = active_version(session, lock=True)
    if current is None:
        raise Conflict("no adapter is active (the base model serves); nothing to roll back")
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
    version that was active before it. With several servers, it is called once
    every live one has failed to load it (``store.load_failures``)."""
    row = get_version(session, version)
    was_active = row.status == "active"
    if was_active:
        rollback(session)
    row.status = "failed"
    row.error = error[:2000]
    session.add(row)
    session.flush()


def lineage_pairs(session: Session, row: AdapterVersion) -> list[tuple[TrainingRunPair, PreferencePair]]:
    """The pairs the run that made ``row`` trained on or evaluated with, and how
    each was used (``new``, ``replay``, ``eval``): the way back to the feedback."""
    if row.training_run_id is None or session.get(TrainingRun, row.training_run_id) is None:
        return []
    return list(session.exec(
        select(TrainingRunPair, PreferencePair)
        .where(TrainingRunPair.pair_id == PreferencePair.id, TrainingRunPair.run_id == row.training_run_id)
        .order_by(col(PreferencePair.id))
    ).all())


def lineage_examples(session: Session, row: AdapterVersion) -> list[tuple[TrainingRunExample, Feedback]]:
    """The single thumbs (``store.examples``) the run that made ``row`` trained
    on, held out or skipped, with the label each had then and its feedback row."""
    if row.training_run_id is None:
        return []
    return list(session.exec(
        select(TrainingRunExample, Feedback)
        .where(TrainingRunExample.feedback_id == Feedback.id, TrainingRunExample.run_id == row.training_run_id)
        .order_by(col(Feedback.id))
    ).all())


def ancestry(session: Session, version: AdapterVersion | None) -> list[AdapterVersion]:
    """``version`` and the versions it was continued from, newest first (empty
    for the base model)."""
    chain: list[AdapterVersion] = []
    seen: set[int] = set()
    while version is not None and version.version not in seen:
        chain.append(version)
        seen.add(version.version)
        parent = version.parent_version
        version = session.exec(select(AdapterVersion).where(AdapterVersion.version == parent)).first() \
            if parent is not None else None
    return chain
