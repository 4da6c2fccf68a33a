"""A fake fleet of vLLM OpenAI servers for fast tests of the remote engine.

:class:`FakeFleet` is an ``httpx`` transport (no sockets, no threads) that
answers for any number of :class:`FakeReplica`, each by its base URL, as vLLM
0.32's OpenAI server does: ``GET /health``, ``GET /v1/models``, streamed and
plain ``POST /v1/chat/completions`` (usage on every chunk, ``[DONE]`` last),
``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter`` (400 for a name
already loaded, 404 for an unknown one), 404 for an unknown model. Its answer
is ``[model]`` followed by words, one per token, ``max_tokens`` of them.

A test tells a replica to misbehave: ``reachable = False`` (every request
refused), ``healthy = False`` (``/health`` 503), ``fail_next`` (the next chat
requests answer 500 before any token), ``error_event_next`` (the next streams
are one error event, as vLLM reports an engine failure inside a stream),
``reject_next`` (the next chat requests answer 400: too long), ``cut_after``
(the next stream breaks after that many tokens), ``refuse_loads`` (names whose load fails with 500),
``token_delay`` (seconds per token). It records what it got: ``chats`` (the
request bodies), ``loads``/``unloads`` (names), ``closed_early`` (request ids
whose stream the client closed before the end), ``open_streams``.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
BASE_MODEL = "fake-base"


@dataclass
class FakeReplica:
    url: str
    model: str = BASE_MODEL
    reachable: bool = True
    healthy: bool = True
    fail_next: int = 0
    error_event_next: int = 0
    reject_next: int = 0
    cut_after: int | None = None
    refuse_loads: set[str] = field(default_factory=set)
    token_delay: float = 0.0
    loaded: dict[str, str] = field(default_factory=dict)
    chats: list[dict[str, Any]] = field(default_factory=list)
    loads: list[str] = field(default_factory=list)
    unloads: list[str] = field(default_factory=list)
    closed_early: list[str] = field(default_factory=list)
    open_streams: int = 0
    health_checks: int = 0

    def restart(self) -> None:
        """As a vLLM server restarting: every adapter it had is gone."""
        self.loaded.clear()

    def answered_models(self) -> list[str]:
        return [body["model"] for body in self.chats]


class FakeFleet(httpx.AsyncBaseTransport):
    def __init__(self, *urls: str) -> None:
        self.replicas = {url: FakeReplica(url) for url in urls}

    def __getitem__(self, url: str) -> FakeReplica:
        return self.replicas[url]

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        replica = self.replicas.get(f"{request.url.scheme}://{request.url.netloc.decode()}")
        if replica is None or not replica.reachable:
            raise httpx.ConnectError("connection refused", request=request)
        await request.aread()
        body = json.loads(request.content) if request.content else {}
        path = request.url.path
        if path == "/health":
            replica.health_checks += 1
            return httpx.Response(200 if replica.healthy else 503)
        if path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": _cards(replica)})
        if path == "/v1/load_lora_adapter":
            return _load(replica, body)
        if path == "/v1/unload_lora_adapter":
            name = body["lora_name"]
            replica.unloads.append(name)
            if name not in replica.loaded:
                return _error(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
            del replica.loaded[name]
            return httpx.Response(200, text=f"Success: LoRA adapter '{name}' removed successfully.")
        if path == "/v1/chat/completions":
            return _chat(replica, body)
        return _error(404, "Not Found", "NotFoundError")


def _cards(replica: FakeReplica) -> list[dict[str, Any]]:
    cards = [{"id": replica.model, "object": "model", "root": replica.model, "parent": None}]
    cards += [{"id": name, "object": "model", "root": path, "parent": replica.model}
              for name, path in replica.loaded.items()]
    return cards


def _error(status: int, message: str, kind: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"message": message, "type": kind, "param": None, "code": status}})


def _load(replica: FakeReplica, body: dict[str, Any]) -> httpx.Response:
    name, path = body.get("lora_name"), body.get("lora_path")
    replica.loads.append(name)
    if name in replica.loaded:
        return _error(400, f"The lora adapter '{name}' has already been loaded. If you want to load the adapter "
                      "in place, set 'load_inplace' to True.", "InvalidUserInput")
    if name in replica.refuse_loads:
        return _error(500, f"Loading lora {name} failed: No adapter found for {path}", "InternalServerError")
    replica.loaded[name] = path
    return httpx.Response(200, text=f"Success: LoRA adapter '{name}' added successfully.")


def _chat(replica: FakeReplica, body: dict[str, Any]) -> httpx.Response:
    replica.chats.append(body)
    model = body["model"]
    if model != replica.model and model not in replica.loaded:
        return _error(404, f"The model `{model}` does not exist.", "NotFoundError")
    if replica.reject_next:
        replica.reject_next -= 1
        return _error(400, "This model's maximum context length is 1024 tokens.", "BadRequestError")
    if replica.fail_next:
        replica.fail_next -= 1
        return _error(500, "EngineCore encountered an issue.", "InternalServerError")
    if body.get("stream") and replica.error_event_next:
        replica.error_event_next -= 1
        error = {"error": {"message": "Internal server error", "type": "InternalServerError", "param": None,
                           "code": 500}}
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              content=f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode())
    if body.get("stream"):
        cut, replica.cut_after = replica.cut_after, None
        return httpx.Response(
            200, headers={"content-type": "text/event-stream"}, stream=_Stream(replica, body, cut)
        )
    tokens = _tokens(model, body)
    choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": " ".join(tokens)},
                              "finish_reason": "length"}
    if body.get("logprobs"):
        top = body.get("top_logprobs") or 1
        # entropy of a uniform top-k: ln k
        choice["logprobs"] = {"content": [
            {"token": t, "logprob": -math.log(top),
             "top_logprobs": [{"token": f"t{i}", "logprob": -math.log(top)} for i in range(top)]}
            for t in tokens
        ]}
    usage = {"prompt_tokens": _prompt_tokens(body), "completion_tokens": len(tokens),
             "total_tokens": _prompt_tokens(body) + len(tokens)}
    return httpx.Response(200, json={"id": "chatcmpl-1", "object": "chat.completion", "model": model,
                                     "choices": [choice], "usage": usage})


def _tokens(model: str, body: dict[str, Any]) -> list[str]:
    count = body.get("max_tokens") or 16
    return ([f"[{model}]"] + [WORDS[i % len(WORDS)] for i in range(count)])[:count]


def _prompt_tokens(body: dict[str, Any]) -> int:
    return sum(len(m["content"].split()) + 4 for m in body["messages"])


class _Stream(httpx.AsyncByteStream):
    """An SSE answer; knows whether the client closed it before the end."""

    def __init__(self, replica: FakeReplica, body: dict[str, Any], cut_after: int | None) -> None:
        self.replica, self.body, self.cut_after = replica, body, cut_after
        self.finished = False
        self.closed = False
        replica.open_streams += 1

    async def __aiter__(self) -> AsyncIterator[bytes]:
        body, model = self.body, self.body["model"]
        prompt = _prompt_tokens(body)
        tokens = _tokens(model, body)

        def event(choices: list[dict[str, Any]], done: int) -> bytes:
            data = {"id": f"chatcmpl-{body.get('request_id')}", "object": "chat.completion.chunk", "model": model,
                    "choices": choices,
                    "usage": {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}}
            return f"data: {json.dumps(data)}\n\n".encode()

        yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}], 0)
        for done, token in enumerate(tokens, start=1):
            if self.cut_after is not None and done > self.cut_after:
                raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")
            await asyncio.sleep(self.replica.token_delay)
            text = token if done == 1 else f" {token}"
            finish = "length" if done == len(tokens) else None
            yield event([{"index": 0, "delta": {"content": text}, "finish_reason": finish}], done)
        yield event([], len(tokens))
        yield b"data: [DONE]\n\n"
        self.finished = True

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            self.replica.open_streams -= 1
            if not self.finished:
                self.replica.closed_early.append(self.body.get("request_id"))
