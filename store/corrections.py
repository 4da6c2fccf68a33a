"""Corrections: a user rewrites one of the model's answers into the answer
they wanted, and the rewrite is preferred over the answer.

A correction is kept as a row of its own (``Correction``: answer, user, text;
one per user per answer), not as a message in the conversation. A message is
something said in the chat: the tree, the context of later turns, regenerated
siblings, the answers the model produced with their adapter and sampling. A
correction was never said and never continues the chat; as a sibling message
it would show up as a regeneration, be sent to the model as history, and take
a flag every reader of messages must honour (as ``caller_written`` does). As
its own row it has the owner and the replace-on-change rule a thumb has, and
admins see it next to the answer it corrects.

Recording one (:func:`apply_correction`, Core statements in the caller's
transaction -- the feedback writer's, ``store.feedback.apply`` -- with every
check done before the first change, like a thumb) stores or replaces the
user's correction and makes the pair ``store.pairs.correction_pair``: the
corrected text chosen over the answer, source ``correction``, prompt = the
answer's context, through the same ``pair_values`` rules as every pair
(content hash, split). Changing a correction withdraws the pair the old text
made, unless a run trained on it.

A correction writes text straight into training, so what is not an answer is
refused, never stored: empty, longer than TUNELOOP_MAX_MESSAGE_CHARS, or the
model's answer itself (equal after whitespace is normalised), and so is a
correction of a question, of an assistant turn an API caller wrote, of an
answer still generating or cut short, or of someone else's answer. Its pair
then follows the trust rules of every pair (``store.selection.eligible_pairs``:
excluded users, conversations, messages and pairs, disabled accounts,
anonymous visitors) and is counted against the feedback rate limit by the
server.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, bindparam, insert, update
from sqlalchemy import select as core_select
from sqlalchemy.engine import Connection
from sqlmodel import Session, col, select

from store.errors import Conflict, InvalidInput, NotFound
from store.pairs import ANSWER_FIELDS, PairChanges, correction_pair, withdraw_correction
from store.tables import Conversation, Correction, Message, User, utcnow

_MESSAGES = Message.__table__
_CONVERSATIONS = Conversation.__table__
_USERS = User.__table__
_CORRECTIONS = Correction.__table__


def _answer_query():
    m, c, u, k = _MESSAGES, _CONVERSATIONS, _USERS, _CORRECTIONS
    return (
        core_select(*(m.c[name] for name in ANSWER_FIELDS), c.c.user_id.label("owner_id"),
               u.c.excluded_from_training.label("user_excluded"), k.c.id.label("correction_id"),
               k.c.content.label("old_content"))
        .select_from(
            m.join(c, c.c.id == m.c.conversation_id).join(u, u.c.id == c.c.user_id)
            .outerjoin(k, and_(k.c.message_id == m.c.id, k.c.user_id == c.c.user_id))
        )
        .where(m.c.id == bindparam("message_id"))
    )


_ANSWER = _answer_query()
_INSERT = insert(_CORRECTIONS)
_UPDATE = update(_CORRECTIONS).where(_CORRECTIONS.c.id == bindparam("correction_id"))


def same_text(a: str, b: str) -> bool:
    """Whether two texts are the same once runs of whitespace count as one space."""
    return a.split() == b.split()


@dataclass(frozen=True)
class CorrectionWrite:
    """``user_id``'s corrected ``text`` for answer ``message_id``, at most
    ``max_chars`` long (TUNELOOP_MAX_MESSAGE_CHARS). The text is stripped;
    raises InvalidInput when it is empty or too long."""

    user_id: int | None
    message_id: int
    text: str
    max_chars: int

    def __post_init__(self) -> None:
        text = (self.text or "").strip()
        if not text:
            raise InvalidInput("the correction is empty; write the answer you wanted", "text")
        if len(text) > self.max_chars:
            raise InvalidInput(
                f"the correction is {len(text)} characters; the limit is {self.max_chars} "
                "(TUNELOOP_MAX_MESSAGE_CHARS). Shorten it", "text",
            )
        object.__setattr__(self, "text", text)


@dataclass(frozen=True)
class CorrectionRecorded:
    """What a recorded correction is now. ``changed``: its text is new (the old
    pair withdrawn); ``pair_id``: the pair it makes (None when it makes none:
    its user or answer is excluded from training)."""

    correction_id: int
    message_id: int
    conversation_id: int
    text: str
    updated_at: datetime
    pair_id: int | None
    changed: bool = True

    def to_json(self) -> dict[str, Any]:
        return {"id": self.correction_id, "message_id": self.message_id, "text": self.text,
                "pair_id": self.pair_id, "updated_at": self.updated_at.isoformat()}


def apply_correction(
    conn: Connection, correction: CorrectionWrite, eval_share: float, changes: PairChanges
) -> CorrectionRecorded:
    """Create or replace the user's correction of the answer and make its pair
    (see the module's docstring); ``changes`` gives the answer's context.
    Raises NotFound (no such message, or not the user's), InvalidInput (not
    one of the model's complete answers, or a copy of it), Conflict (still
    generating) -- always before changing anything. The caller commits."""
    row = conn.execute(_ANSWER, {"message_id": correction.message_id}).first()
    message_id = correction.message_id
    if row is None or correction.user_id is None or row.owner_id != correction.user_id:
        raise NotFound(f"message {message_id} not found")
    if row.role != "assistant":
        raise InvalidInput(f"message {message_id} is a {row.role} message; only answers can be corrected")
    if row.caller_written:
        raise InvalidInput(
            f"message {message_id} is an assistant turn the caller sent as history, not one of the model's "
            "answers; correct the answers tuneloop returned"
        )
    if row.status in ("pending", "streaming"):
        raise Conflict(f"message {message_id} is still being generated; correct it when it is finished")
    if row.status != "complete":
        raise InvalidInput(
            f"message {message_id} did not finish ({row.status}); regenerate it, then correct the new answer"
        )
    if same_text(correction.text, row.content):
        raise InvalidInput(
            "the correction is the model's answer unchanged; edit it into the answer you wanted", "text"
        )

    now = utcnow()
    correction_id = row.correction_id
    if correction_id is None:
        inserted = conn.execute(_INSERT, {"message_id": message_id, "user_id": correction.user_id,
                                          "content": correction.text, "created_at": now, "updated_at": now})
        correction_id = inserted.inserted_primary_key[0]
    else:
        conn.execute(_UPDATE, {"correction_id": correction_id, "content": correction.text, "updated_at": now})
    changed = row.old_content != correction.text
    if changed and row.correction_id is not None:
        withdraw_correction(conn, correction.user_id, message_id)
    pair_id = None
    if not row.user_excluded:
        pair_id = correction_pair(conn, changes, correction.user_id, correction.text, row, eval_share)
    return CorrectionRecorded(correction_id=correction_id, message_id=message_id,
                              conversation_id=row.conversation_id, text=correction.text, updated_at=now,
                              pair_id=pair_id, changed=changed)


def record_correction(
    session: Session, user: User, message_id: int, text: str, *, max_chars: int, eval_share: float
) -> CorrectionRecorded:
    """:func:`apply_correction` inside an ORM session (CLI, tests, scripts); the
    caller commits. Raises InvalidInput, NotFound, Conflict."""
    correction = CorrectionWrite(user.id, message_id, text, max_chars)
    session.flush()  # the Core statements must see what the session holds
    conn = session.connection()
    changes = PairChanges()
    recorded = apply_correction(conn, correction, eval_share, changes)
    changes.flush(conn)
    session.expire_all()  # and the session must see what they changed
    return recorded


def corrections_by_message(session: Session, user: User, message_ids: list[int]) -> dict[int, Correction]:
    """``user``'s corrections of these answers, by answer id."""
    if not message_ids or user.id is None:
        return {}
    rows = session.exec(
        select(Correction).where(Correction.user_id == user.id, col(Correction.message_id).in_(message_ids))
    ).all()
    return {row.message_id: row for row in rows}
