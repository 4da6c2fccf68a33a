"""Feedback API: read an answer, rate it (``POST /api/messages/{id}/feedback``)."""

from __future__ import annotations

from fastapi import APIRouter
from sqlmodel import select

from server.deps import CurrentUser, FeedbackIngestDep, MetricsDep, SessionDep, rate_limited
from server.schemas import FeedbackIn
from store.conversations import owned_message
from store.feedback import Thumb
from store.tables import Feedback, Message

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


def message_json(message: Message, feedback: Feedback | None = None) -> dict:
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
    }


@router.get("/messages/{message_id}")
def get_message(message_id: int, user: CurrentUser, session: SessionDep) -> dict:
    message, _ = owned_message(session, user, message_id)
    feedback = session.exec(
        select(Feedback).where(Feedback.message_id == message_id, Feedback.user_id == user.id)
    ).first()
    return message_json(message, feedback)


@router.post("/messages/{message_id}/feedback", dependencies=[rate_limited("feedback")])
async def post_feedback(
    message_id: int, body: FeedbackIn, user: CurrentUser, ingest: FeedbackIngestDep, metrics: MetricsDep,
) -> dict:
    """Answered once the thumb is committed (group commit: ``server.feedback_ingest``)."""
    recorded = await ingest.thumb(Thumb(user.id, message_id, body.rating, body.comment, tuple(body.tags)))
    metrics.feedback(f"thumbs_{body.rating}")
    return {"message_id": message_id, **recorded.to_json()}
