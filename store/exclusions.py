"""Keeping a source out of training: an admin excludes a user, a conversation,
a message or a single pair (and can undo it). Excluded sources are filtered by
``store.selection.eligible_pairs`` from every later run; what they already
taught is shown by ``adapters_reached`` so the admin can roll back.
"""

from __future__ import annotations

from sqlmodel import Session, col, select

from store.errors import InvalidInput, NotFound
from store.tables import AdapterVersion, Conversation, Message, PreferencePair, TrainingRun, TrainingRunPair, User

KINDS: dict[str, type] = {"user": User, "conversation": Conversation, "message": Message, "pair": PreferencePair}


def set_excluded(session: Session, kind: str, row_id: int, excluded: bool = True):
    """Exclude (or, with ``excluded=False``, include again) one source; returns
    its row. Raises InvalidInput for an unknown kind, NotFound for an unknown id."""
    table = KINDS.get(kind)
    if table is None:
        raise InvalidInput(f"cannot exclude a {kind!r}; choose one of {', '.join(KINDS)}", "kind")
    row = session.get(table, row_id)
    if row is None:
        raise NotFound(f"there is no {kind} {row_id}")
    row.excluded_from_training = excluded
    session.add(row)
    session.flush()
    return row


def adapters_reached(session: Session, user_id: int) -> list[str]:
    """The adapter versions whose training runs learned from ``user_id``'s pairs
    (as new pairs or replayed), oldest first."""
    versions = session.exec(
        select(AdapterVersion.version)
        .join(TrainingRun, TrainingRun.id == AdapterVersion.training_run_id)
        .join(TrainingRunPair, TrainingRunPair.run_id == TrainingRun.id)
        .join(PreferencePair, PreferencePair.id == TrainingRunPair.pair_id)
        .where(PreferencePair.user_id == user_id, col(TrainingRunPair.role).in_(("new", "replay")))
        .distinct()
    ).all()
    return [f"v{v}" for v in sorted(versions)]
