"""A/B API: ``POST /api/comparisons`` answers one context twice;
``POST /api/comparisons/{id}/choice`` records which answer was better."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from server.deps import AnswersDep, CurrentUser, EngineDep, MetricsDep, SessionDep, SettingsDep
from server.engine.base import SamplingSettings
from server.errors import ApiError
from server.schemas import ChoiceIn, ComparisonIn, validate_chat
from store.conversations import start_turn
from store.db import session_scope
from store.feedback import record_choice
from store.tables import Message, User

router = APIRouter(prefix="/api", tags=["comparisons"])


def _answer_json(message: Message) -> dict:
    return {
        "message_id": message.id,
        "content": message.content,
        "adapter": message.adapter_version,
        "finish_reason": message.finish_reason,
    }


@router.post("/comparisons")
async def create_comparison(
    body: ComparisonIn, user: CurrentUser, settings: SettingsDep, answers: AnswersDep, engine: EngineDep
) -> dict:
    history = validate_chat(body.messages, settings, answers=2)
    max_tokens = body.max_tokens or settings.default_max_tokens
    if max_tokens > settings.max_new_tokens:
        raise ApiError(400, f"max_tokens {max_tokens} is over the limit of {settings.max_new_tokens}", "max_tokens")
    answers.check_context_fits(history, max_tokens)
    if not engine.ready:
        raise ApiError(503, "the model engine is starting or restarting; retry shortly")
    seed = body.seed if body.seed is not None else answers.web_sampling().seed
    samplings = [
        SamplingSettings(temperature=body.temperature, max_tokens=max_tokens, seed=seed + i).to_json()
        for i in range(2)
    ]
    with session_scope(answers.db) as session:
        turn = start_turn(
            session, session.get(User, user.id), None, history, samplings,
            max_turns=settings.max_turns, source="api", compare=True,
        )
        ids = (turn.comparison.id, turn.answers[0].id, turn.answers[1].id)
    done_a, done_b = await asyncio.gather(answers.complete(ids[1]), answers.complete(ids[2]))
    return {"id": ids[0], "a": _answer_json(done_a), "b": _answer_json(done_b)}


@router.post("/comparisons/{comparison_id}/choice")
def choose(
    comparison_id: int, body: ChoiceIn, user: CurrentUser, session: SessionDep, settings: SettingsDep,
    metrics: MetricsDep,
) -> dict:
    comparison = record_choice(session, user, comparison_id, body.winner, eval_share=settings.eval_share)
    session.commit()
    metrics.feedback(f"choice_{body.winner}")
    return {"id": comparison.id, "winner": comparison.winner, "decided_at": comparison.decided_at.isoformat()}
