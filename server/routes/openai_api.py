"""OpenAI-compatible API: ``GET /v1/models`` and ``POST /v1/chat/completions``.

Each call is stored as a conversation (its history as a chain of messages) and
every answer as a message whose id comes back in ``X-Tuneloop-Message-Id`` and
in the body field ``tuneloop.message_id``, so the caller can rate it through
the feedback API. ``n`` > 1 becomes n separate engine requests (seed, seed+1,
…): the engine itself only ever sees n=1.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse

from server.answers import AnswerJob
from server.deps import AdaptersDep, AnswersDep, CurrentUser, EngineDep, SettingsDep, StartedAtDep, rate_limited
from server.engine.base import ChatEngine, GenerationChunk, SamplingSettings
from server.errors import ApiError, error_body
from server.schemas import ChatCompletionRequest, validate_chat
from store.settings import Settings

router = APIRouter(prefix="/v1", tags=["openai"])

SERVED_NAME = "tuneloop"
_PLACEHOLDER = "\u0000tuneloop-delta\u0000"  # never in an id or model name: they come from us


def sampling_from(body: ChatCompletionRequest, settings: Settings) -> SamplingSettings:
    max_tokens = body.max_completion_tokens or body.max_tokens or settings.default_max_tokens
    if max_tokens > settings.max_new_tokens:
        raise ApiError(
            400, f"max_tokens {max_tokens} is over the limit of {settings.max_new_tokens} "
            "(TUNELOOP_MAX_NEW_TOKENS)", "max_tokens",
        )
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return SamplingSettings(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        max_tokens=max_tokens,
        seed=body.seed,
        stop=tuple(stops),
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
    )


def check_model(requested: str | None, engine: ChatEngine) -> str:
    known = {SERVED_NAME, engine.model}
    if requested and requested not in known:
        raise ApiError(
            404, f"model `{requested}` does not exist; GET /v1/models lists "
            f"{', '.join(sorted(known))}", "model",
        )
    return requested or SERVED_NAME


@router.get("/models")
async def list_models(
    user: CurrentUser, engine: EngineDep, adapters: AdaptersDep, started_at: StartedAtDep
) -> dict:
    adapter = adapters.active
    created = int(started_at)
    return {
        "object": "list",
        "data": [
            {
                "id": SERVED_NAME,
                "object": "model",
                "created": created,
                "owned_by": "tuneloop",
                "tuneloop": {"adapter": adapter.name if adapter else None},
            },
            {"id": engine.model, "object": "model", "created": created,
             "owned_by": "tuneloop", "tuneloop": {"adapter": None}},
        ],
    }


@router.post("/chat/completions", dependencies=[rate_limited("chat")])
async def chat_completions(
    body: ChatCompletionRequest, user: CurrentUser, settings: SettingsDep, answers: AnswersDep,
    engine: EngineDep,
):
    model = check_model(body.model, engine)
    history = validate_chat(body.messages, settings, answers=body.n)
    sampling = sampling_from(body, settings)
    answers.check_context_fits(history, sampling.max_tokens)
    if not engine.ready:
        raise ApiError(503, "the model engine is starting or restarting; retry shortly")
    samplings = [
        SamplingSettings(**{**sampling.__dict__, "seed": None if sampling.seed is None else sampling.seed + i})
        for i in range(body.n)
    ]
    ids, jobs = await answers.start_api_answers(user.id, history, samplings)
    headers = {"X-Tuneloop-Message-Id": ",".join(str(i) for i in ids)}
    completion_id = f"chatcmpl-{ids[0]}"
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _stream_events(jobs, ids, completion_id, created, model, include_usage)
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)
    await asyncio.gather(*(job.wait() for job in jobs))
    results = [await asyncio.to_thread(answers.stored, i) for i in ids]
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": m.content},
            "finish_reason": _openai_finish(m.finish_reason),
        }
        for i, m in enumerate(results)
    ]
    prompt_tokens = results[0].prompt_tokens or 0
    completion_tokens = sum(m.completion_tokens or 0 for m in results)
    return JSONResponse(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
            "tuneloop": {
                "message_id": ids[0],
                "message_ids": ids,
                "adapter": results[0].adapter_version,
            },
        },
        headers=headers,
    )


def _openai_finish(reason: str | None) -> str | None:
    return {"abort": "stop", "stopped": "stop"}.get(reason or "", reason)


async def _merged(jobs: list[AnswerJob]) -> AsyncIterator[tuple[int, GenerationChunk]]:
    """Interleave the streams of several answers as their chunks arrive."""
    if len(jobs) == 1:
        async for chunk in jobs[0].chunks():
            yield 0, chunk
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, job: AnswerJob) -> None:
        try:
            async for chunk in job.chunks():
                await queue.put((index, chunk))
        finally:
            await queue.put(done)

    tasks = [asyncio.create_task(pump(i, job)) for i, job in enumerate(jobs)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
                continue
            yield item
        for task in tasks:
            task.result()  # re-raise an engine failure
    finally:
        for task in tasks:
            task.cancel()


async def _stream_events(
    jobs: list[AnswerJob], ids: list[int], completion_id: str, created: int, model: str,
    include_usage: bool,
) -> AsyncIterator[str]:
    def event(choices: list, **extra) -> str:
        payload = {
            "id": completion_id, "object": "chat.completion.chunk", "created": created,
            "model": model, "choices": choices, "tuneloop": {"message_id": ids[0], "message_ids": ids},
            **extra,
        }
        return f"data: {json.dumps(payload)}\n\n"

    # Content events are the JSON event() makes, cut around a placeholder once
    # per choice: per token only the new text is escaped.
    content_event = [
        event([{"index": i, "delta": {"content": _PLACEHOLDER}, "finish_reason": None}]).split(
            json.dumps(_PLACEHOLDER)
        )
        for i in range(len(ids))
    ]

    for index in range(len(ids)):
        yield event([{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
    prompt_tokens = completion_tokens = 0
    try:
        async for index, chunk in _merged(jobs):
            if chunk.text:
                before, after = content_event[index]
                yield before + json.dumps(chunk.text) + after
            if chunk.finished:
                prompt_tokens = chunk.prompt_tokens or prompt_tokens
                completion_tokens += chunk.completion_tokens or 0
                yield event([{"index": index, "delta": {}, "finish_reason": _openai_finish(chunk.finish_reason)}])
    except Exception as exc:  # the stream has begun: report in-band, as OpenAI does
        yield f"data: {json.dumps(error_body(503, f'generation failed: {exc}'))}\n\n"
        return
    if include_usage:
        yield event([], usage={
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        })
    yield "data: [DONE]\n\n"
