"""A fake engine for fast unit tests and UI work: deterministic canned answers.

It streams the words of an answer made from the prompt, honours ``max_tokens``,
``seed`` and abort, and records adapters it was asked to load. An answer from
an adapter starts with ``[name]``: by default every adapter is answerable, as
in an engine serving LoRAs; ``merged=True`` mimics the merged serving mode
(only what :meth:`serve` serves and what :meth:`serve_beside` put beside it
answer as themselves; a request naming another version is answered by the
served one, and its final chunk says so in ``extra["served_adapter"]``).
``beside_dead`` mimics a dead beside engine. Its uncertainty
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

    def __init__(self, model: str = "fake-model", delay: float = 0.0, merged: bool = False) -> None:
        self.model = model
        self.delay = delay
        self.merged = merged
        self.loaded: dict[str, AdapterRef] = {}
        self.preloaded: list[str] = []  # names, in the order preload_adapter was asked for them
        self.aborted: set[str] = set()
        self.serving: AdapterRef | None = None  # what serve() was last told
        # serve_beside(): the names it was asked for (None: released), in order;
        # beside_dead: requests for the adapter beside raise EngineUnavailable.
        self.beside_calls: list[str | None] = []
        self.beside_dead = False
        self._beside: AdapterRef | None = None
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
        self._check_beside_alive(adapter)
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
        self._check_beside_alive(adapter)
        served = adapter
        if self.merged and adapter is not None and adapter != self._beside:
            served = self.serving
        rng = random.Random(sampling.seed if sampling.temperature > 0 else 0)
        prefix = [f"[{served.name}]"] if served else []
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
            extra={"served_adapter": served.name if served else None} if served != adapter else {},
        )

    async def abort(self, request_id: str) -> None:
        self.aborted.add(request_id)

    async def load_adapter(self, adapter: AdapterRef) -> None:
        if "corrupt" in adapter.path:
            raise AdapterLoadError(f"cannot load {adapter.path}")
        self.loaded[adapter.name] = adapter

    async def serve(self, adapter: AdapterRef | None) -> None:
        self.serving = adapter

    async def serve_beside(self, adapter: AdapterRef | None) -> None:
        """Record ``adapter`` as the one beside (None: none); refuses as
        :meth:`load_adapter` does, and raises EngineUnavailable before start."""
        if adapter is not None:
            if not self._ready:
                raise EngineUnavailable("fake engine not started")
            await self.load_adapter(adapter)
        self._beside = adapter
        self.beside_calls.append(adapter.name if adapter else None)

    def serving_beside(self) -> AdapterRef | None:
        return None if self.beside_dead or not self._ready else self._beside

    def _check_beside_alive(self, adapter: AdapterRef | None) -> None:
        if self.beside_dead and adapter is not None and adapter == self._beside:
            raise EngineUnavailable(f"the fake engine beside serving {adapter.name} is dead")

    async def preload_adapter(self, adapter: AdapterRef) -> bool:
        await self.load_adapter(adapter)
        self.preloaded.append(adapter.name)
        return True
