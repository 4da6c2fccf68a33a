"""A/B API: ``POST /api/comparisons`` answers one context twice (or, with
``only_if_selected``, once when the server's A/B selection passes it over);
``POST /api/messages/{id}/retry`` answers an answer's question again and sets
the two side by side; ``POST /api/comparisons/{id}/choice`` records which
answer was better."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from sqlalchemy.engine import Engine
from starlette.concurrency import run_in_threadpool

from server.ab_selection import AbDecision
from server.deps import (
    AnswersDep,
    CurrentUser,
    EngineDep,
    FeedbackIngestDep,
    GenerationSlotsDep,
    MetricsDep,
    SettingsDep,
    rate_limited,
)
from server.engine.base import SamplingSettings
from server.errors import ApiError
from server.schemas import ChoiceIn, ComparisonIn, validate_chat
from store.conversations import start_retry, start_turn
from store.db import session_scope
from store.feedback import Choice
from store.settings import Settings
from store.tables import Message, User

router = APIRouter(prefix="/api", tags=["comparisons"])


def _answer_json(message: Message) -> dict:
    return {
        "message_id": message.id,
        "content": message.content,
        "adapter": message.adapter_version,
        "finish_reason": message.finish_reason,
    }


def _store_answers(
    db: Engine, settings: Settings, user_id: int, history: list[dict[str, str]], samplings: list[dict],
    challenger: str | None,
) -> tuple[int | None, list[int]]:
    """Store the context and its pending answers, two as a comparison; the ids
    of the comparison (None for one answer) and of the answers (A, B)."""
    with session_scope(db) as session:
        turn = start_turn(
            session, session.get(User, user_id), None, history, samplings,
            max_turns=settings.max_turns, source="api", compare=len(samplings) == 2, challenger=challenger,
        )
        return (turn.comparison.id if turn.comparison else None), [a.id for a in turn.answers]


@router.post("/comparisons", dependencies=[rate_limited("compare")])
async def create_comparison(
    body: ComparisonIn, user: CurrentUser, settings: SettingsDep, answers: AnswersDep, engine: EngineDep,
    slots: GenerationSlotsDep,
) -> dict:
    """Two answers to ``messages``: ``{"id", "a", "b"}``. With ``only_if_selected``
    the server's A/B selection decides first (``AnswerService.decide_ab``), and
    the response says how (``"selection": {"compare", "probability", "basis",
    "uncertainty", "challenger"}``); passed over, the context gets one plain answer,
    ``{"id": null, "a": {...}, "b": null, "selection": {...}}``, rateable with
    ``POST /api/messages/{id}/feedback``. With ``canary`` one answer comes from
    the running canary (or a watched promotion's previous version), the other
    from the active version, sides at random; 409 when none is served."""
    history = validate_chat(body.messages, settings, answers=2)
    max_tokens = body.max_tokens or settings.default_max_tokens
    if max_tokens > settings.max_new_tokens:
        raise ApiError(400, f"max_tokens {max_tokens} is over the limit of {settings.max_new_tokens}", "max_tokens")
    answers.check_context_fits(history, max_tokens)
    if not engine.ready:
        raise ApiError(503, "the model engine is starting or restarting; retry shortly")
    decision = None
    if body.canary:
        challenger = answers.adapters.challenger()
        if challenger is None:
            raise ApiError(409, "no canary (nor a watched promotion's previous version) is being served now", "canary")
        decision = AbDecision(True, 1.0, answers.adapters.beside_role or "canary", challenger=challenger.name)
    elif body.only_if_selected:
        slots.check(user.id)  # 429 before the probe if not even one answer could start
        decision = await answers.decide_ab(history)
    count = 1 if decision is not None and not decision.compare else 2
    seed = body.seed if body.seed is not None else answers.web_sampling().seed
    samplings = [
        SamplingSettings(temperature=body.temperature, max_tokens=max_tokens, seed=seed + i).to_json()
        for i in range(count)
    ]
    lease = slots.take(user.id, count)  # the answers generate at once: 429 before anything is stored
    try:
        comparison_id, ids = await run_in_threadpool(
            _store_answers, answers.db, settings, user.id, history, samplings,
            decision.challenger if decision is not None else None,
        )
    except BaseException:
        lease.close()
        raise
    try:
        done = await asyncio.gather(*(answers.complete(message_id, lease) for message_id in ids))
    finally:
        lease.close()  # normally a no-op (each answer gave its slot back); never leaks on a failure
    result = {
        "id": comparison_id,
        "a": _answer_json(done[0]),
        "b": _answer_json(done[1]) if len(done) == 2 else None,
    }
    if decision is not None:
        result["selection"] = decision.to_json()
    return result


def _store_retry(db: Engine, settings: Settings, user_id: int, message_id: int, sampling: dict) -> tuple[int, int, int]:
    """Store the new pending answer and its comparison with ``message_id``; the
    ids of the comparison, A (the answer) and B (the new one)."""
    with session_scope(db) as session:
        turn = start_retry(session, session.get(User, user_id), message_id, sampling, max_turns=settings.max_turns)
        return turn.comparison.id, turn.answers[0].id, turn.answers[1].id


@router.post("/messages/{message_id}/retry", dependencies=[rate_limited("chat")])
async def retry(
    message_id: int, user: CurrentUser, settings: SettingsDep, answers: AnswersDep, engine: EngineDep,
    slots: GenerationSlotsDep,
) -> dict:
    """Answer the question of answer ``message_id`` again: the same shape as
    ``POST /api/comparisons`` (A is the answer, B the new one); choose with
    ``POST /api/comparisons/{id}/choice``."""
    if not engine.ready:
        raise ApiError(503, "the model engine is starting or restarting; retry shortly")
    lease = slots.take(user.id)
    try:
        ids = await run_in_threadpool(
            _store_retry, answers.db, settings, user.id, message_id, answers.web_sampling().to_json()
        )
    except BaseException:
        lease.close()
        raise
    try:
        done_b = await answers.complete(ids[2], lease)
    finally:
        lease.close()
    done_a = await run_in_threadpool(answers.stored, ids[1])
    return {"id": ids[0], "a": _answer_json(done_a), "b": _answer_json(done_b)}


@router.post("/comparisons/{comparison_id}/choice", dependencies=[rate_limited("feedback")])
async def choose(
    comparison_id: int, body: ChoiceIn, user: CurrentUser, ingest: FeedbackIngestDep, metrics: MetricsDep,
) -> dict:
    """Answered once the choice is committed (group commit: ``server.feedback_ingest``)."""
    recorded = await ingest.choice(Choice(user.id, comparison_id, body.winner))
    metrics.feedback(f"choice_{body.winner}")
    return {"id": recorded.comparison_id, "winner": recorded.winner, "decided_at": recorded.decided_at.isoformat()}
