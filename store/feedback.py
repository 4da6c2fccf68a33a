"""Recording what users preferred: thumbs on answers and A/B choices.

Both the browser pages and the JSON API go through these functions, so the
rules (ownership, one thumb per user per message, no rating of turns an API
caller wrote, a choice only on finished answers) live in one place.

A write is a value (:class:`Thumb`, :class:`Choice`) checked for its shape
when it is made; :func:`apply_thumb` and :func:`apply_choice` record it on a
SQLAlchemy ``Connection`` with Core statements, all the store's checks done
with reads *before* the first statement that changes anything, so a refused
write (a ``StoreError``) leaves the transaction as it found it; the pairs a
write withdraws and builds are collected in a ``store.pairs.PairChanges``
that the caller flushes before it commits. That is what lets the feedback
writer (``store.feedback_writer``) put the writes of many requests in one
transaction. ``record_feedback`` and ``record_choice`` do the same inside an
ORM session (the caller commits). Corrections (``store.corrections``) are
written the same way and go through :func:`apply` too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from types import SimpleNamespace
from typing import Any, Literal

from sqlalchemy import and_, bindparam, insert, select, update
from sqlalchemy.engine import Connection
from sqlmodel import Session

from store.corrections import CorrectionRecorded, CorrectionWrite, apply_correction
from store.errors import Conflict, InvalidInput, NotFound
from store.pairs import ANSWER_FIELDS, PairChanges, choice_pairs, thumb_pairs
from store.tables import Comparison, Conversation, Feedback, Message, User, utcnow

Rating = Literal["up", "down"]
Winner = Literal["a", "b", "tie", "both_bad"]
RATINGS: tuple[str, ...] = ("up", "down")
WINNERS: tuple[str, ...] = ("a", "b", "tie", "both_bad")
UNFINISHED = ("pending", "streaming")

# Built once with bound parameters (SQLAlchemy reuses their compiled form): they run per write.
_MESSAGES = Message.__table__
_CONVERSATIONS = Conversation.__table__
_USERS = User.__table__
_FEEDBACK = Feedback.__table__
_COMPARISONS = Comparison.__table__


def _thumb_query():
    m, c, u, f = _MESSAGES, _CONVERSATIONS, _USERS, _FEEDBACK
    return (
        select(*(m.c[name] for name in ANSWER_FIELDS), c.c.user_id.label("owner_id"),
               u.c.excluded_from_training.label("user_excluded"), f.c.id.label("feedback_id"),
               f.c.rating.label("old_rating"))
        .select_from(
            m.join(c, c.c.id == m.c.conversation_id).join(u, u.c.id == c.c.user_id)
            .outerjoin(f, and_(f.c.message_id == m.c.id, f.c.user_id == c.c.user_id))
        )
        .where(m.c.id == bindparam("message_id"))
    )


def _comparison_query():
    cmp, conv, u = _COMPARISONS, _CONVERSATIONS, _USERS
    a, b = _MESSAGES.alias("a"), _MESSAGES.alias("b")
    sides = [side.c[name].label(f"{label}_{name}") for label, side in (("a", a), ("b", b)) for name in ANSWER_FIELDS]
    return (
        select(cmp.c.user_id, cmp.c.conversation_id, cmp.c.message_a_id, cmp.c.message_b_id, cmp.c.winner,
               conv.c.current_leaf_id, u.c.excluded_from_training.label("user_excluded"), *sides)
        .select_from(
            cmp.join(u, u.c.id == cmp.c.user_id).outerjoin(conv, conv.c.id == cmp.c.conversation_id)
            .outerjoin(a, a.c.id == cmp.c.message_a_id).outerjoin(b, b.c.id == cmp.c.message_b_id)
        )
        .where(cmp.c.id == bindparam("comparison_id"))
    )


_THUMB = _thumb_query()
_INSERT_FEEDBACK = insert(_FEEDBACK)
_UPDATE_FEEDBACK = update(_FEEDBACK).where(_FEEDBACK.c.id == bindparam("feedback_id"))
_COMPARISON = _comparison_query()
_UPDATE_COMPARISON = update(_COMPARISONS).where(_COMPARISONS.c.id == bindparam("comparison_id"))
_UPDATE_LEAF = update(_CONVERSATIONS).where(_CONVERSATIONS.c.id == bindparam("conversation_id"))


@dataclass(frozen=True)
class Thumb:
    """``user_id``'s thumb (``rating`` up or down, optional comment and tags)
    on answer ``message_id``. Raises InvalidInput for a rating that is neither."""

    user_id: int | None
    message_id: int
    rating: str
    comment: str | None = None
    tags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.rating not in RATINGS:
            raise InvalidInput(f"rating must be up or down, not {self.rating!r}", "rating")
        object.__setattr__(self, "comment", (self.comment or "").strip() or None)
        object.__setattr__(self, "tags", tuple(self.tags or ()))


@dataclass(frozen=True)
class Choice:
    """``user_id``'s verdict on comparison ``comparison_id``: a, b, tie or
    both_bad. Raises InvalidInput for anything else."""

    user_id: int | None
    comparison_id: int
    winner: str

    def __post_init__(self) -> None:
        if self.winner not in WINNERS:
            raise InvalidInput("winner must be a, b, tie or both_bad", "winner")


@dataclass(frozen=True)
class ThumbRecorded:
    """What a recorded thumb is now; ``changed``: its rating is new (pairs rebuilt)."""

    feedback_id: int
    message_id: int
    conversation_id: int
    rating: str
    comment: str | None
    tags: list[str] = field(default_factory=list)
    updated_at: datetime = field(default_factory=utcnow)
    changed: bool = True

    def to_json(self) -> dict[str, Any]:
        return {"rating": self.rating, "comment": self.comment, "tags": list(self.tags),
                "updated_at": self.updated_at.isoformat()}


@dataclass(frozen=True)
class ChoiceRecorded:
    """What a recorded choice is now; ``chosen_id`` is the answer the
    conversation continues from (A on a tie or both-bad)."""

    comparison_id: int
    conversation_id: int
    message_a_id: int
    message_b_id: int
    winner: str
    decided_at: datetime
    changed: bool = True

    @property
    def chosen_id(self) -> int:
        return self.message_b_id if self.winner == "b" else self.message_a_id


Write = Thumb | Choice | CorrectionWrite
Recorded = ThumbRecorded | ChoiceRecorded | CorrectionRecorded


def apply(conn: Connection, write: Write, eval_share: float, changes: PairChanges) -> Recorded:
    """Record ``write`` (a :class:`Thumb`, a :class:`Choice` or a
    ``store.corrections.CorrectionWrite``) in ``conn``'s transaction; its pair
    changes go to ``changes``, which the caller flushes before committing. See
    :func:`apply_thumb`, :func:`apply_choice` and ``apply_correction``."""
    if isinstance(write, Thumb):
        return apply_thumb(conn, write, eval_share, changes)
    if isinstance(write, CorrectionWrite):
        return apply_correction(conn, write, eval_share, changes)
    return apply_choice(conn, write, eval_share, changes)


def apply_thumb(conn: Connection, thumb: Thumb, eval_share: float, changes: PairChanges) -> ThumbRecorded:
    """Create or change the thumb, then withdraw the pairs its old rating made
    and build the ones the new rating supports, into ``changes``
    (``eval_share``: TUNELOOP_EVAL_SHARE). Raises NotFound (no such answer, or
    not the user's), InvalidInput (not an answer, or one the caller wrote),
    Conflict (still generating) -- always before changing anything. The
    caller commits."""
    row = conn.execute(_THUMB, {"message_id": thumb.message_id}).first()
    if row is None or thumb.user_id is None or row.owner_id != thumb.user_id:
        raise NotFound(f"message {thumb.message_id} not found")
    if row.role != "assistant":
        raise InvalidInput(f"message {thumb.message_id} is a {row.role} message; only answers can be rated")
    if row.caller_written:
        raise InvalidInput(
            f"message {thumb.message_id} is an assistant turn the caller sent as history, not one of the "
            "model's answers; rate the answers tuneloop returned"
        )
    if row.status in UNFINISHED:
        raise Conflict(f"message {thumb.message_id} is still being generated; rate it when it is finished")

    now = utcnow()
    values = {"rating": thumb.rating, "comment": thumb.comment, "tags": list(thumb.tags), "updated_at": now}
    feedback_id = row.feedback_id
    if feedback_id is None:
        inserted = conn.execute(
            _INSERT_FEEDBACK, {"message_id": thumb.message_id, "user_id": thumb.user_id, "created_at": now, **values}
        )
        feedback_id = inserted.inserted_primary_key[0]
    else:
        conn.execute(_UPDATE_FEEDBACK, {"feedback_id": feedback_id, **values})
    changed = row.old_rating != thumb.rating
    if changed:
        if row.feedback_id is not None:  # a new thumb has no pairs to withdraw
            changes.withdraw_thumb(feedback_id)
        if not row.user_excluded:
            thumb_pairs(conn, changes, feedback_id, thumb.user_id, thumb.rating, row, eval_share)
    return ThumbRecorded(feedback_id=feedback_id, message_id=thumb.message_id, conversation_id=row.conversation_id,
                         rating=thumb.rating, comment=thumb.comment, tags=list(thumb.tags), updated_at=now,
                         changed=changed)


def _side(row: Any, label: str) -> SimpleNamespace | None:
    values = row._mapping
    if values[f"{label}_id"] is None:
        return None
    return SimpleNamespace(**{name: values[f"{label}_{name}"] for name in ANSWER_FIELDS})


def apply_choice(conn: Connection, choice: Choice, eval_share: float, changes: PairChanges) -> ChoiceRecorded:
    """Store (or change) the choice and build the pair it supports, withdrawing
    the pair of an earlier, different choice. While the two answers are still
    the conversation's latest turn, the chosen one (A on a tie or both-bad)
    continues it. Raises NotFound (no such comparison, or not the user's) or
    Conflict (an answer still generating) before changing anything. The caller
    commits."""
    row = conn.execute(_COMPARISON, {"comparison_id": choice.comparison_id}).first()
    if row is None or choice.user_id is None or row.user_id != choice.user_id:
        raise NotFound(f"comparison {choice.comparison_id} not found")
    a, b = _side(row, "a"), _side(row, "b")
    if a is None or b is None or a.status in UNFINISHED or b.status in UNFINISHED:
        raise Conflict("both answers must be finished before choosing; wait for them")

    now = utcnow()
    conn.execute(_UPDATE_COMPARISON, {"comparison_id": choice.comparison_id, "winner": choice.winner,
                                      "decided_at": now})
    chosen_id = row.message_b_id if choice.winner == "b" else row.message_a_id
    if row.current_leaf_id in (row.message_a_id, row.message_b_id):
        conn.execute(_UPDATE_LEAF, {"conversation_id": row.conversation_id, "current_leaf_id": chosen_id,
                                    "updated_at": now})
    changed = row.winner != choice.winner
    if changed:
        if row.winner in ("a", "b"):  # only a winner makes a pair: nothing to withdraw otherwise
            changes.withdraw_choice(choice.comparison_id)
        if choice.winner in ("a", "b") and not row.user_excluded:
            chosen, rejected = (a, b) if choice.winner == "a" else (b, a)
            choice_pairs(conn, changes, choice.comparison_id, choice.user_id, chosen, rejected, eval_share)
    return ChoiceRecorded(comparison_id=choice.comparison_id, conversation_id=row.conversation_id,
                          message_a_id=row.message_a_id, message_b_id=row.message_b_id, winner=choice.winner,
                          decided_at=now, changed=changed)


# --- in an ORM session (CLI, tests, scripts) ----------------------------------


def _apply_in_session(session: Session, write: Write, eval_share: float) -> Recorded:
    session.flush()  # the Core statements must see what the session holds
    conn = session.connection()
    changes = PairChanges()
    recorded = apply(conn, write, eval_share, changes)
    changes.flush(conn)
    session.expire_all()  # and the session must see what they changed
    return recorded


def record_feedback(
    session: Session, user: User, message_id: int, rating: Rating, comment: str | None = None,
    tags: list[str] | None = None, *, eval_share: float,
) -> Feedback:
    """Create or change ``user``'s thumb on an assistant message, and build the
    pairs it supports (``eval_share``: TUNELOOP_EVAL_SHARE). Raises InvalidInput,
    NotFound, Conflict. The caller commits."""
    thumb = Thumb(user.id, message_id, rating, comment, tuple(tags or ()))
    recorded = _apply_in_session(session, thumb, eval_share)
    return session.get(Feedback, recorded.feedback_id)


def record_choice(
    session: Session, user: User, comparison_id: int, winner: Winner, *, eval_share: float
) -> Comparison:
    """Store (or change) the user's choice and build the pair it supports (see
    :func:`apply_choice`). Raises InvalidInput, NotFound, Conflict. The caller
    commits."""
    recorded = _apply_in_session(session, Choice(user.id, comparison_id, winner), eval_share)
    return session.get(Comparison, recorded.comparison_id)
