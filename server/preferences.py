"""Recording what users preferred: thumbs on answers and A/B choices.

Both the browser pages and the JSON API go through these functions, so the
rules (ownership, one thumb per user per message, a choice made once) live in
one place.
"""

from __future__ import annotations

import random
from typing import Literal

from pydantic import BaseModel, Field, field_validator
from sqlmodel import Session, select

from server.conversations import add_message, owned_message, set_leaf
from server.errors import ApiError
from server.models import Comparison, Conversation, Feedback, Message, User, utcnow

Rating = Literal["up", "down"]
Winner = Literal["a", "b", "tie", "both_bad"]

MAX_TAGS = 10
MAX_TAG_CHARS = 40


class FeedbackIn(BaseModel):
    rating: Rating
    comment: str | None = Field(None, max_length=2000)
    tags: list[str] = Field(default_factory=list, max_length=MAX_TAGS)

    @field_validator("tags")
    @classmethod
    def _clean_tags(cls, tags: list[str]) -> list[str]:
        cleaned = []
        for tag in tags:
            tag = tag.strip().lower()
            if not tag:
                continue
            if len(tag) > MAX_TAG_CHARS:
                raise ValueError(f"a tag may have at most {MAX_TAG_CHARS} characters")
            if tag not in cleaned:
                cleaned.append(tag)
        return cleaned


class ChoiceIn(BaseModel):
    winner: Winner


def record_feedback(session: Session, user: User, message_id: int, data: FeedbackIn) -> Feedback:
    """Create or change ``user``'s thumb on an assistant message."""
    message, _ = owned_message(session, user, message_id)
    if message.role != "assistant":
        raise ApiError(400, f"message {message_id} is a {message.role} message; only answers can be rated")
    if message.status in ("pending", "streaming"):
        raise ApiError(409, f"message {message_id} is still being generated; rate it when it is finished")
    feedback = session.exec(
        select(Feedback).where(Feedback.message_id == message_id, Feedback.user_id == user.id)
    ).first()
    if feedback is None:
        feedback = Feedback(message_id=message_id, user_id=user.id, rating=data.rating)
    feedback.rating = data.rating
    feedback.comment = (data.comment or "").strip() or None
    feedback.tags = data.tags
    feedback.updated_at = utcnow()
    session.add(feedback)
    session.flush()
    return feedback


def add_answer_pair(
    session: Session, user: User, conversation: Conversation, parent: Message, sampling_a: dict, sampling_b: dict
) -> tuple[Comparison, Message, Message]:
    """Two pending sibling answers to ``parent`` and the comparison between them.

    Which sample becomes A (shown left) is a coin flip, so a position bias of the
    users does not line up with anything about how the answers were made.
    """
    first = add_message(session, conversation, parent.id, "assistant", status="pending", sampling=sampling_a)
    second = add_message(session, conversation, parent.id, "assistant", status="pending", sampling=sampling_b)
    a, b = (first, second) if random.random() < 0.5 else (second, first)
    comparison = Comparison(
        user_id=user.id, conversation_id=conversation.id, message_a_id=a.id, message_b_id=b.id
    )
    session.add(comparison)
    session.flush()
    # Until the user chooses, the conversation continues from A.
    set_leaf(session, conversation, a)
    return comparison, a, b


def owned_comparison(session: Session, user: User, comparison_id: int) -> Comparison:
    comparison = session.get(Comparison, comparison_id)
    if comparison is None or comparison.user_id != user.id:
        raise ApiError(404, f"comparison {comparison_id} not found")
    return comparison


def record_choice(session: Session, user: User, comparison_id: int, winner: Winner) -> Comparison:
    """Store (or change) the user's choice. While the pair is still the latest
    turn, the chosen answer (A on a tie or both-bad) continues the conversation."""
    comparison = owned_comparison(session, user, comparison_id)
    for message_id in (comparison.message_a_id, comparison.message_b_id):
        message = session.get(Message, message_id)
        if message is None or message.status in ("pending", "streaming"):
            raise ApiError(409, "both answers must be finished before choosing; wait for them")
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
    return comparison
