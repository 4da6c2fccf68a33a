"""Conversations as message trees: create, walk, branch.

A conversation's visible thread is the path from the root to
``current_leaf_id``. Regenerating an answer adds a sibling (same parent) and
moves the leaf to it; nothing is ever deleted, so every answer a user rated
stays in the store with its context.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlmodel import Session, col, func, select

from store.errors import Conflict, InvalidInput, LimitExceeded, NotFound
from store.tables import Comparison, Conversation, Feedback, Message, User, utcnow

TITLE_CHARS = 60


def owned_conversation(session: Session, user: User, conversation_id: int) -> Conversation:
    """The conversation if ``user`` owns it; otherwise NotFound (never "forbidden":
    don't tell a stranger it exists)."""
    conversation = session.get(Conversation, conversation_id)
    if conversation is None or conversation.user_id != user.id:
        raise NotFound(f"conversation {conversation_id} not found")
    return conversation


def owned_message(session: Session, user: User, message_id: int) -> tuple[Message, Conversation]:
    message = session.get(Message, message_id)
    conversation = session.get(Conversation, message.conversation_id) if message else None
    if message is None or conversation is None or conversation.user_id != user.id:
        raise NotFound(f"message {message_id} not found")
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


def check_turn_count(stored: int, adding: int, max_turns: int) -> None:
    """The one rule on a conversation's length: its stored messages (every branch)
    plus the ones a turn adds stay within ``max_turns``."""
    if stored + adding > max_turns:
        raise LimitExceeded(
            f"this conversation has reached its limit of {max_turns} messages "
            "(TUNELOOP_MAX_TURNS); start a new chat",
            "messages",
        )


def check_turn_limit(session: Session, conversation: Conversation, adding: int, max_turns: int) -> None:
    check_turn_count(count_messages(session, conversation), adding, max_turns)


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


@dataclass
class Turn:
    """What :func:`start_turn` stored: the question and its answers (A first,
    then B for a comparison)."""

    conversation: Conversation
    question: Message
    answers: list[Message]
    comparison: Comparison | None = None


def start_turn(
    session: Session,
    user: User,
    conversation: Conversation | None,
    new_messages: Sequence[dict[str, str]],
    samplings: Sequence[dict[str, Any]],
    *,
    max_turns: int,
    source: str = "web",
    compare: bool = False,
    claimed_by: str | None = None,
    adapter_version: str | None = None,
    challenger: str | None = None,
) -> Turn:
    """The one way a turn enters the store (web pages, OpenAI API, comparisons API).

    ``new_messages`` (the question, or a whole history sent to the API) are
    appended to ``conversation``'s current branch, or start a new conversation
    when it is None; then one answer per sampling, ``pending`` (or ``streaming``
    and pinned to ``adapter_version`` when this process already claimed it:
    ``claimed_by``). ``compare`` makes the two answers an A/B comparison whose
    sides are a coin flip. ``challenger`` (a canary or watch turn,
    ``store.canary``): the version asked to produce the second answer of a
    comparison (or the single answer), recorded on the pending message; the
    server that claims it decides (``AnswerService``). Raises InvalidInput (no user question last, not two
    answers to compare) or LimitExceeded (TUNELOOP_MAX_TURNS). The caller commits.
    """
    if not new_messages or new_messages[-1]["role"] != "user" or not new_messages[-1]["content"].strip():
        raise InvalidInput("the last message must be a non-empty message with role `user`", "messages")
    if not samplings or (compare and len(samplings) != 2):
        raise InvalidInput("a turn has at least one answer, and a comparison exactly two", "n")
    if conversation is None:
        first_user = next(m["content"] for m in new_messages if m["role"] == "user")
        conversation = start_conversation(session, user, source, first_user)
        stored = 0
    else:
        stored = count_messages(session, conversation)
    check_turn_count(stored, len(new_messages) + len(samplings), max_turns)
    parent_id = conversation.current_leaf_id
    question: Message | None = None
    for item in new_messages:
        # an assistant turn in what the caller sends is their text, not the model's answer
        question = add_message(session, conversation, parent_id, item["role"], item["content"],
                               caller_written=item["role"] == "assistant")
        parent_id = question.id
    assert question is not None
    claim = {"status": "streaming", "claimed_by": claimed_by, "adapter_version": adapter_version} if claimed_by \
        else {"status": "pending"}
    answers = [add_message(session, conversation, question.id, "assistant", sampling=s, **claim) for s in samplings]
    if challenger is not None and not claimed_by:
        answers[-1].adapter_version = challenger
        session.add(answers[-1])
    comparison = None
    if compare:
        # A coin flip decides which sample is shown as A (left), so a position
        # bias of the users does not line up with how the answers were made.
        if random.random() < 0.5:
            answers.reverse()
        comparison = Comparison(
            user_id=user.id, conversation_id=conversation.id,
            message_a_id=answers[0].id, message_b_id=answers[1].id,
        )
        session.add(comparison)
        session.flush()
    # The conversation continues from the first answer (A, until the user chooses).
    set_leaf(session, conversation, answers[0])
    return Turn(conversation, question, answers, comparison)


def start_retry(
    session: Session, user: User, message_id: int, sampling: dict[str, Any], *, max_turns: int
) -> Turn:
    """Answer again the question that answer ``message_id`` replied to, and put
    the two answers side by side: a comparison of that answer (A) and a new
    pending one (B), in the same context, which the user's choice turns into a
    pair (``store.feedback.apply_choice``). No coin flip here: the user has
    read the first answer already, so first and new are shown as such. The
    conversation shows the comparison (its leaf is A) until the choice.

    Only the latest turn can be tried again: raises InvalidInput (not one of
    the model's answers), NotFound (not the user's), Conflict (still
    generating, a reply follows it, or it is already in a comparison waiting
    for a choice), LimitExceeded (TUNELOOP_MAX_TURNS). The caller commits."""
    message, conversation = owned_message(session, user, message_id)
    if message.role != "assistant" or message.caller_written or message.parent_id is None:
        raise InvalidInput(f"message {message_id} is not one of the model's answers; only answers can be tried again")
    if message.status in ("pending", "streaming"):
        raise Conflict(f"message {message_id} is still being generated; try again when it is finished")
    if session.exec(select(Message.id).where(Message.parent_id == message.id)).first() is not None:
        raise Conflict(f"message {message_id} has replies after it; only the latest answer can be tried again")
    if any(message.id in (c.message_a_id, c.message_b_id) for c in open_comparisons(session, conversation)):
        raise Conflict(f"message {message_id} is already in a comparison; choose the better answer first")
    check_turn_limit(session, conversation, 1, max_turns)
    again = add_message(session, conversation, message.parent_id, "assistant", status="pending", sampling=sampling)
    comparison = Comparison(user_id=user.id, conversation_id=conversation.id,
                            message_a_id=message.id, message_b_id=again.id)
    session.add(comparison)
    session.flush()
    set_leaf(session, conversation, message)
    question = session.get(Message, message.parent_id)
    assert question is not None  # a foreign key
    return Turn(conversation, question, [message, again], comparison)
