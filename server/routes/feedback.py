"""Feedback API: read an answer, rate it (``POST /api/messages/{id}/feedback``),
correct it (``POST /api/messages/{id}/correction``)."""

from __future__ import annotations

from typing import cast

from fastapi import APIRouter
from sqlmodel import select

from server.deps import CurrentUser, FeedbackIngestDep, MetricsDep, SessionDep, SettingsDep, rate_limited
from server.schemas import CorrectionIn, FeedbackIn
from store.conversations import owned_message
from store.corrections import CorrectionRecorded, CorrectionWrite, corrections_by_message
from store.feedback import Thumb
from store.tables import Correction, Feedback, Message

router = APIRouter(prefix="/api", tags=["feedback"])


def feedback_json(feedback: Feedback | None) -> dict | None:
    if feedback is None:
        return None
    return {
        "rating": feedback.rating,
        "comment": feedback.comment,
        "tags": feedback.tags,
        "updated_at": feedback.updated_at.isoformat(),
    }


def correction_json(correction: Correction | None) -> dict | None:
    if correction is None:
        return None
    return {"text": correction.content, "updated_at": correction.updated_at.isoformat()}


def message_json(message: Message, feedback: Feedback | None = None, correction: Correction | None = None) -> dict:
    return {
        "id": message.id,
        "conversation_id": message.conversation_id,
        "parent_id": message.parent_id,
        "role": message.role,
        "content": message.content,
        "status": message.status,
        "adapter": message.adapter_version,
        "sampling": message.sampling,
        "finish_reason": message.finish_reason,
        "feedback": feedback_json(feedback),
        "correction": correction_json(correction),
    }


@router.get("/messages/{message_id}")
def get_message(message_id: int, user: CurrentUser, session: SessionDep) -> dict:
    message, _ = owned_message(session, user, message_id)
    feedback = session.exec(
        select(Feedback).where(Feedback.message_id == message_id, Feedback.user_id == user.id)
    ).first()
    return message_json(message, feedback, corrections_by_message(session, user, [message_id]).get(message_id))


@router.post("/messages/{message_id}/feedback", dependencies=[rate_limited("feedback")])
async def post_feedback(
    message_id: int, body: FeedbackIn, user: CurrentUser, ingest: FeedbackIngestDep, metrics: MetricsDep,
) -> dict:
    """Answered once the thumb is committed (group commit: ``server.feedback_ingest``)."""
    recorded = await ingest.thumb(Thumb(user.id, message_id, body.rating, body.comment, tuple(body.tags)))
    metrics.feedback(f"thumbs_{body.rating}")
    return {"message_id": message_id, **recorded.to_json()}


@router.post("/messages/{message_id}/correction", dependencies=[rate_limited("feedback")])
async def post_correction(
    message_id: int, body: CorrectionIn, user: CurrentUser, settings: SettingsDep, ingest: FeedbackIngestDep,
    metrics: MetricsDep,
) -> dict:
    """The answer you wanted instead of answer ``message_id``: preferred over it in
    training (a pair with source ``correction``); a later one replaces it.
    Answered once committed, like a thumb."""
    write = CorrectionWrite(user.id, message_id, body.text, settings.max_message_chars)
    recorded = cast(CorrectionRecorded, await ingest.record(write))
    metrics.feedback("correction")
    return recorded.to_json()
