"""Conversations as message trees: create, walk, branch.

A conversation's visible thread is the path from the root to
``current_leaf_id``. Regenerating an answer adds a sibling (same parent) and
moves the leaf to it; nothing is ever deleted, so every answer a user rated
stays in the store with its context.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlmodel import Session, col, func, select

from server.errors import ApiError
from server.models import Comparison, Conversation, Feedback, Message, User, utcnow

TITLE_CHARS = 60


def owned_conversation(session: Session, user: User, conversation_id: int) -> Conversation:
    """The conversation if ``user`` owns it; otherwise a 404 (never a 403: don't
    tell a stranger it exists)."""
    conversation = session.get(Conversation, conversation_id)
    if conversation is None or conversation.user_id != user.id:
        raise ApiError(404, f"conversation {conversation_id} not found")
    return conversation


def owned_message(session: Session, user: User, message_id: int) -> tuple[Message, Conversation]:
    message = session.get(Message, message_id)
    conversation = session.get(Conversation, message.conversation_id) if message else None
    if message is None or conversation is None or conversation.user_id != user.id:
        raise ApiError(404, f"message {message_id} not found")
    return message, conversation


def list_conversations(session: Session, user: User, limit: int = 100) -> Sequence[Conversation]:
    return session.exec(
        select(Conversation)
        .where(Conversation.user_id == user.id)
        .order_by(col(Conversation.updated_at).desc())
        .limit(limit)
    ).all()


def thread(session: Session, conversation: Conversation, leaf_id: int | None = None) -> list[Message]:
    """Messages from the root to ``leaf_id`` (default: the conversation's current leaf)."""
    leaf_id = leaf_id if leaf_id is not None else conversation.current_leaf_id
    if leaf_id is None:
        return []
    by_id = {
        m.id: m
        for m in session.exec(
            select(Message).where(Message.conversation_id == conversation.id)
        ).all()
    }
    path: list[Message] = []
    node = by_id.get(leaf_id)
    while node is not None:
        path.append(node)
        node = by_id.get(node.parent_id) if node.parent_id is not None else None
    path.reverse()
    return path


def chat_context(messages: Sequence[Message]) -> list[dict[str, str]]:
    """The chat messages an engine sees for a thread: finished text only."""
    return [
        {"role": m.role, "content": m.content}
        for m in messages
        if m.status in ("complete", "stopped") and (m.content or m.role != "assistant")
    ]


def start_conversation(session: Session, user: User, source: str, first_text: str) -> Conversation:
    title = " ".join(first_text.split())[:TITLE_CHARS] or "New chat"
    conversation = Conversation(user_id=user.id, source=source, title=title)
    session.add(conversation)
    session.flush()
    return conversation


def count_messages(session: Session, conversation: Conversation) -> int:
    return session.exec(
        select(func.count()).select_from(Message).where(Message.conversation_id == conversation.id)
    ).one()


def check_turn_limit(session: Session, conversation: Conversation, adding: int, max_turns: int) -> None:
    if count_messages(session, conversation) + adding > max_turns:
        raise ApiError(
            400,
            f"this conversation has reached its limit of {max_turns} messages "
            "(TUNELOOP_MAX_TURNS); start a new chat",
        )


def add_message(
    session: Session,
    conversation: Conversation,
    parent_id: int | None,
    role: str,
    content: str = "",
    status: str = "complete",
    **fields: Any,
) -> Message:
    message = Message(
        conversation_id=conversation.id,
        parent_id=parent_id,
        role=role,
        content=content,
        status=status,
        completed_at=utcnow() if status == "complete" else None,
        **fields,
    )
    session.add(message)
    session.flush()
    conversation.updated_at = utcnow()
    session.add(conversation)
    return message


def add_chain(
    session: Session, conversation: Conversation, messages: Sequence[dict[str, str]]
) -> Message | None:
    """Store a linear history (as sent to the OpenAI API); return its last message."""
    parent: Message | None = None
    for item in messages:
        parent = add_message(
            session, conversation, parent.id if parent else None, item["role"], item["content"]
        )
    return parent


def set_leaf(session: Session, conversation: Conversation, message: Message) -> None:
    conversation.current_leaf_id = message.id
    conversation.updated_at = utcnow()
    session.add(conversation)


def siblings(session: Session, message: Message) -> list[Message]:
    """Answers sharing ``message``'s parent, oldest first (regenerations)."""
    return list(
        session.exec(
            select(Message)
            .where(
                Message.conversation_id == message.conversation_id,
                Message.parent_id == message.parent_id,
                Message.role == message.role,
            )
            .order_by(col(Message.id))
        ).all()
    )


def feedback_by_message(
    session: Session, user: User, message_ids: Sequence[int]
) -> dict[int, Feedback]:
    if not message_ids:
        return {}
    rows = session.exec(
        select(Feedback).where(Feedback.user_id == user.id, col(Feedback.message_id).in_(message_ids))
    ).all()
    return {f.message_id: f for f in rows}


def open_comparisons(session: Session, conversation: Conversation) -> list[Comparison]:
    return list(
        session.exec(
            select(Comparison).where(
                Comparison.conversation_id == conversation.id, col(Comparison.winner).is_(None)
            )
        ).all()
    )
