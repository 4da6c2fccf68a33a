"""A/B API: ``POST /api/comparisons`` answers one context twice;
``POST /api/comparisons/{id}/choice`` records which answer was better."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from server.conversations import add_chain, start_conversation
from server.db import session_scope
from server.deps import AnswersDep, CurrentUser, SessionDep, SettingsDep
from server.engine.base import SamplingSettings
from server.errors import ApiError
from server.models import Message, User
from server.preferences import ChoiceIn, add_answer_pair, record_choice
from server.routes.openai_api import ChatMessageIn, validate_chat

router = APIRouter(prefix="/api", tags=["comparisons"])


class ComparisonIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    messages: list[ChatMessageIn] = Field(min_length=1)
    temperature: float = Field(0.8, gt=0.0, le=2.0, description="> 0: two samples must differ")
    max_tokens: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0, le=2**62)


def _answer_json(message: Message) -> dict:
    return {
        "message_id": message.id,
        "content": message.content,
        "adapter": message.adapter_version,
        "finish_reason": message.finish_reason,
    }


@router.post("/comparisons")
async def create_comparison(
    body: ComparisonIn, request: Request, user: CurrentUser, settings: SettingsDep, answers: AnswersDep
) -> dict:
    history = validate_chat(body.messages, settings)
    max_tokens = body.max_tokens or settings.default_max_tokens
    if max_tokens > settings.max_new_tokens:
        raise ApiError(400, f"max_tokens {max_tokens} is over the limit of {settings.max_new_tokens}", "max_tokens")
    answers.check_context_fits(history, max_tokens)
    if not request.app.state.engine.ready:
        raise ApiError(503, "the model engine is starting or restarting; retry shortly")
    seed = body.seed if body.seed is not None else answers.web_sampling().seed
    samplings = [
        SamplingSettings(temperature=body.temperature, max_tokens=max_tokens, seed=seed + i).to_json()
        for i in range(2)
    ]
    with session_scope(answers.db) as session:
        owner = session.get(User, user.id)
        first_user = next(m["content"] for m in history if m["role"] == "user")
        conversation = start_conversation(session, owner, "api", first_user)
        parent = add_chain(session, conversation, history)
        comparison, a, b = add_answer_pair(session, owner, conversation, parent, *samplings)
        ids = (comparison.id, a.id, b.id)
    done_a, done_b = await asyncio.gather(answers.complete(ids[1]), answers.complete(ids[2]))
    return {"id": ids[0], "a": _answer_json(done_a), "b": _answer_json(done_b)}


@router.post("/comparisons/{comparison_id}/choice")
def choose(comparison_id: int, body: ChoiceIn, request: Request, user: CurrentUser, session: SessionDep) -> dict:
    comparison = record_choice(session, user, comparison_id, body.winner)
    session.commit()
    request.app.state.metrics.feedback(f"choice_{body.winner}")
    return {"id": comparison.id, "winner": comparison.winner, "decided_at": comparison.decided_at.isoformat()}
