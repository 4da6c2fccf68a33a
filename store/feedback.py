"""Recording what users preferred: thumbs on answers and A/B choices.

Both the browser pages and the JSON API go through these functions, so the
rules (ownership, one thumb per user per message, a choice made once) live in
one place.
"""

from __future__ import annotations

from typing import Literal

from sqlmodel import Session, select

from store.conversations import owned_message, set_leaf
from store.errors import Conflict, InvalidInput, NotFound
from store.pairs import pairs_for_choice, pairs_for_thumb
from store.tables import Comparison, Conversation, Feedback, Message, User, utcnow

Rating = Literal["up", "down"]
Winner = Literal["a", "b", "tie", "both_bad"]
RATINGS: tuple[str, ...] = ("up", "down")
WINNERS: tuple[str, ...] = ("a", "b", "tie", "both_bad")


def record_feedback(
    session: Session, user: User, message_id: int, rating: Rating, comment: str | None = None,
    tags: list[str] | None = None, *, eval_share: float,
) -> Feedback:
    """Create or change ``user``'s thumb on an assistant message, and build the
    pairs it supports (``eval_share``: TUNELOOP_EVAL_SHARE). Raises InvalidInput,
    NotFound, Conflict. The caller commits."""
    if rating not in RATINGS:
        raise InvalidInput(f"rating must be up or down, not {rating!r}", "rating")
    message, _ = owned_message(session, user, message_id)
    if message.role != "assistant":
        raise InvalidInput(f"message {message_id} is a {message.role} message; only answers can be rated")
    if message.caller_written:
        raise InvalidInput(
            f"message {message_id} is an assistant turn the caller sent as history, not one of the model's "
            "answers; rate the answers tuneloop returned"
        )
    if message.status in ("pending", "streaming"):
        raise Conflict(f"message {message_id} is still being generated; rate it when it is finished")
    feedback = session.exec(
        select(Feedback).where(Feedback.message_id == message_id, Feedback.user_id == user.id)
    ).first()
    changed = feedback is None or feedback.rating != rating
    if feedback is None:
        feedback = Feedback(message_id=message_id, user_id=user.id, rating=rating)
    feedback.rating = rating
    feedback.comment = (comment or "").strip() or None
    feedback.tags = list(tags or [])
    feedback.updated_at = utcnow()
    session.add(feedback)
    session.flush()
    if changed:
        pairs_for_thumb(session, feedback, eval_share)
    return feedback


def owned_comparison(session: Session, user: User, comparison_id: int) -> Comparison:
    comparison = session.get(Comparison, comparison_id)
    if comparison is None or comparison.user_id != user.id:
        raise NotFound(f"comparison {comparison_id} not found")
    return comparison


def record_choice(
    session: Session, user: User, comparison_id: int, winner: Winner, *, eval_share: float
) -> Comparison:
    """Store (or change) the user's choice and build the pair it supports. While
    the two answers are still the latest turn, the chosen one (A on a tie or
    both-bad) continues the conversation. Raises InvalidInput, NotFound,
    Conflict. The caller commits."""
    if winner not in WINNERS:
        raise InvalidInput("winner must be a, b, tie or both_bad", "winner")
    comparison = owned_comparison(session, user, comparison_id)
    for message_id in (comparison.message_a_id, comparison.message_b_id):
        message = session.get(Message, message_id)
        if message is None or message.status in ("pending", "streaming"):
            raise Conflict("both answers must be finished before choosing; wait for them")
    changed = comparison.winner != winner
    comparison.winner = winner
    comparison.decided_at = utcnow()
    session.add(comparison)
    conversation = session.get(Conversation, comparison.conversation_id)
    pair = (comparison.message_a_id, comparison.message_b_id)
    if conversation is not None and conversation.current_leaf_id in pair:
        chosen = session.get(Message, comparison.message_b_id if winner == "b" else comparison.message_a_id)
        if chosen is not None:
            set_leaf(session, conversation, chosen)
    session.flush()
    if changed:
        pairs_for_choice(session, comparison, eval_share)
    return comparison
