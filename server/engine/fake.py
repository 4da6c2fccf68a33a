"""A fake engine for fast unit tests and UI work: deterministic canned answers.

It streams the words of an answer made from the prompt, honours ``max_tokens``,
``seed`` and abort, and records adapters it was asked to load. Its uncertainty
about a prompt is a stable hash of the last message, unless a test sets it
(``uncertainties``, ``probe_delay``, ``probe_fails``). It is never used where a
test claims to exercise the real engine.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
from collections.abc import AsyncIterator

from server.engine.base import (
    PROBE_TOKENS,
    PROBE_TOP_LOGPROBS,
    AdapterLoadError,
    AdapterRef,
    EngineUnavailable,
    GenerationChunk,
    SamplingSettings,
)

WORDS = [
    "the", "model", "answers", "with", "a", "few", "plain", "words", "so", "tests", "can", "watch", "them",
    "stream", "in",
]


class FakeChatEngine:
    name = "fake"

    def __init__(self, model: str = "fake-model", delay: float = 0.0) -> None:
        self.model = model
        self.delay = delay
        self.loaded: dict[str, AdapterRef] = {}
        self.preloaded: list[str] = []  # names, in the order preload_adapter was asked for them
        self.aborted: set[str] = set()
        self.serving: AdapterRef | None = None  # what serve() was last told
        # uncertainty(): by the last message's text, else a hash of it; how long
        # a probe takes; whether it raises EngineUnavailable; the probes asked for.
        self.uncertainties: dict[str, float] = {}
        self.probe_delay = 0.0
        self.probe_fails = False
        self.probes: list[str] = []
        self._ready = False

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def state(self) -> str:
        return "ready" if self._ready else "stopped"

    async def start(self) -> None:
        self._ready = True

    async def shutdown(self) -> None:
        self._ready = False

    def count_prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        return sum(len(m["content"].split()) + 4 for m in messages)

    async def uncertainty(
        self, messages: list[dict[str, str]], adapter: AdapterRef | None = None, tokens: int = PROBE_TOKENS
    ) -> float:
        """``uncertainties[last text]`` if set, else a stable value in
        [0, ln PROBE_TOP_LOGPROBS) from a hash of the last message."""
        if not self._ready or self.probe_fails:
            raise EngineUnavailable("fake engine not started" if not self._ready else "fake probe failure")
        last = messages[-1]["content"]
        self.probes.append(last)
        await asyncio.sleep(self.probe_delay)
        if last in self.uncertainties:
            return self.uncertainties[last]
        digest = int.from_bytes(hashlib.sha256(last.encode()).digest()[:8], "big")
        return digest / 2**64 * math.log(PROBE_TOP_LOGPROBS)

    async def generate(
        self,
        messages: list[dict[str, str]],
        sampling: SamplingSettings,
        request_id: str,
        adapter: AdapterRef | None = None,
    ) -> AsyncIterator[GenerationChunk]:
        if not self._ready:
            raise EngineUnavailable("fake engine not started")
        rng = random.Random(sampling.seed if sampling.temperature > 0 else 0)
        prefix = [f"[{adapter.name}]"] if adapter else []
        words = prefix + [rng.choice(WORDS) for _ in range(sampling.max_tokens)]
        produced = 0
        for word in words[: sampling.max_tokens]:
            if request_id in self.aborted:
                break
            await asyncio.sleep(self.delay)
            produced += 1
            yield GenerationChunk(text=("" if produced == 1 else " ") + word)
        reason = "abort" if request_id in self.aborted else "length"
        yield GenerationChunk(
            text="",
            finished=True,
            finish_reason=reason,
            prompt_tokens=self.count_prompt_tokens(messages),
            completion_tokens=produced,
        )

    async def abort(self, request_id: str) -> None:
        self.aborted.add(request_id)

    async def load_adapter(self, adapter: AdapterRef) -> None:
        if "corrupt" in adapter.path:
            raise AdapterLoadError(f"cannot load {adapter.path}")
        self.loaded[adapter.name] = adapter

    async def serve(self, adapter: AdapterRef | None) -> None:
        self.serving = adapter

    async def preload_adapter(self, adapter: AdapterRef) -> bool:
        await self.load_adapter(adapter)
        self.preloaded.append(adapter.name)
        return True
