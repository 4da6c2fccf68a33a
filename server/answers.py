"""Producing assistant answers: engine stream in, stored message out.

An answer is first stored as a ``pending`` message (so an accepted request is
never lost), then claimed and streamed by exactly one caller, which records
the adapter that produced it and, at the end, its text, finish reason and token
counts. A stream that is stopped or whose client goes away aborts the engine
request and keeps the partial text as ``stopped``.

Every generation holds one of its identity's generation slots
(``TUNELOOP_MAX_CONCURRENT_GENERATIONS``) for as long as it really runs: the
slot is taken before anything is claimed or stored (RateLimited, 429, if none
is free) and given back when the job's task ends -- complete, failed, stopped,
or cancelled because its listener went away.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator

from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, select

from server.ab_selection import AbDecision, AbSelector
from server.adapters import AdapterRegistry
from server.engine.base import AdapterRef, ChatEngine, EngineUnavailable, GenerationChunk, SamplingSettings
from server.errors import ApiError
from server.metrics import Metrics
from server.rate_limit import GenerationSlots, SlotLease
from store.conversations import chat_context, start_turn, thread
from store.db import session_scope
from store.errors import NotStored
from store.presence import RENEW_S, announce, recover_abandoned_answers, withdraw
from store.settings import Settings
from store.tables import Conversation, Message, User, utcnow

log = logging.getLogger("tuneloop.answers")

POLL_SECONDS = 0.25
CLAIMER_CHECK_SECONDS = 2.0  # how often a viewer checks that the process generating its answer lives
FINISH_RETRY_DELAYS = (0.2, 0.5, 1.0, 2.0, 4.0, 8.0)  # a locked or restarting database, ~16 s in all
AB_CONTRAST = 0.3  # how much hotter the second answer of a browser A/B turn is sampled
MAX_TEMPERATURE = 2.0  # the API's own limit
_NOTHING = object()




class AnswerService:
    def __init__(
        self, settings: Settings, engine: ChatEngine, db: Engine, adapters: AdapterRegistry,
        metrics: Metrics | None = None, slots: GenerationSlots | None = None,
    ) -> None:
        self.settings = settings
        self.slots = slots or GenerationSlots(0)
        self.engine = engine
        self.db = db
        self.adapters = adapters
        self.metrics = metrics
        # New at every boot (see store.presence); the adapter registry records
        # this process's load failures under the same id.
        self.claim_id = adapters.replica
        self._running: dict[int, AnswerJob] = {}  # message id -> the job generating it here
        self.ab_selector = AbSelector(engine, settings.ab_rate, settings.ab_selection)

    def announce(self) -> int:
        """Renew this process's presence and recover answers abandoned by dead
        ones (run at start-up and every ``store.presence.RENEW_S``)."""
        with session_scope(self.db) as session:
            announce(session, self.claim_id)
        with session_scope(self.db) as session:
            return recover_abandoned_answers(session)

    async def keep_presence(self, first_delay: float = RENEW_S) -> None:
        await asyncio.sleep(first_delay)
        while True:
            try:
                recovered = await asyncio.to_thread(self.announce)
                if recovered:
                    log.info("%d answers abandoned by a stopped server will be regenerated", recovered)
            except asyncio.CancelledError:
                raise
            except Exception:  # a busy database: try again on the next tick
                log.exception("presence renewal failed; retrying")
            await asyncio.sleep(RENEW_S)

    def withdraw(self) -> None:
        with session_scope(self.db) as session:
            withdraw(session, self.claim_id)

    def web_sampling(self, contrast: bool = False) -> SamplingSettings:
        """Sampling for a browser turn; the random seed makes the answer replayable.
        ``contrast``: the second answer of an A/B turn, sampled AB_CONTRAST hotter
        so the two differ more often (near-identical answers teach nothing)."""
        return SamplingSettings(
            temperature=min(MAX_TEMPERATURE, self.settings.default_temperature + (AB_CONTRAST if contrast else 0.0)),
            max_tokens=self.settings.default_max_tokens,
            seed=random.randrange(2**31),
        )

    async def decide_ab(self, context: list[dict[str, str]]) -> AbDecision:
        """Whether the answer to ``context`` is an A/B turn (``server.ab_selection``:
        TUNELOOP_AB_SELECTION at TUNELOOP_AB_RATE), probed on the adapter that
        would answer; counted in ``tuneloop_ab_decisions_total``. Never raises for
        the engine's sake and waits at most ``ab_selection.PROBE_TIMEOUT_S``."""
        decision = self._versus_challenger() or await self.ab_selector.decide(context, self.adapters.active)
        if self.metrics is not None:
            self.metrics.ab_decision(decision.basis, decision.compare)
        return decision

    def _versus_challenger(self) -> AbDecision | None:
        """While a canary (or a watch) runs here, TUNELOOP_CANARY_AB_RATE of the
        turns pit the active version against it (``store.canary``); with
        TUNELOOP_CANARY_TRAFFIC a share of the rest is answered by the canary alone."""
        challenger = self.adapters.challenger()
        if challenger is None:
            return None
        rate = self.settings.canary_ab_rate
        role = self.adapters.beside_role or "canary"
        if random.random() < rate:
            return AbDecision(True, rate, role, challenger=challenger.name)
        if role == "canary" and random.random() < self.settings.canary_traffic:
            return AbDecision(False, rate, role, challenger=challenger.name)
        return None

    def check_context_fits(self, messages: list[dict[str, str]], max_tokens: int) -> None:
        limit = self.settings.max_model_len
        try:
            prompt_tokens = self.engine.count_prompt_tokens(messages)
        except EngineUnavailable:
            return  # the generation itself will answer 503
        if prompt_tokens + max_tokens > limit:
            raise ApiError(
                400,
                f"the conversation is {prompt_tokens} tokens and the answer may take {max_tokens}; "
                f"together they exceed the model's context of {limit} tokens. "
                "Start a new chat or send a shorter history.",
                "messages",
            )

    def _claim(
        self, message_id: int
    ) -> tuple[list[dict[str, str]], SamplingSettings, AdapterRef | None] | None:
        """Mark a pending message as streaming and pin the adapter it will be
        produced by (the active one now: a swap mid-stream doesn't affect it).
        None if someone else has claimed it."""
        with session_scope(self.db) as session:
            requested = session.exec(select(Message.adapter_version).where(Message.id == message_id)).first()
            adapter = self._producer(requested)
            claimed = session.execute(
                update(Message)
                .where(Message.id == message_id, Message.status == "pending")
                .values(
                    status="streaming",
                    adapter_version=adapter.name if adapter else None,
                    claimed_by=self.claim_id,
                )
            ).rowcount
            if not claimed:
                return None
            message = session.get(Message, message_id)
            assert message is not None
            conversation = session.get(Conversation, message.conversation_id)
            assert conversation is not None
            context = chat_context(thread(session, conversation, message.parent_id))
            sampling = SamplingSettings.from_json(message.sampling or {})
        return context, sampling, adapter

    def _producer(self, requested: str | None) -> AdapterRef | None:
        """The adapter that answers a message: the active one, or the version a
        canary or watch turn asked for (``store.conversations.start_turn``) if it
        is still served beside it here; else the active one, and the message
        records that (such a comparison pits one version against itself and
        counts for neither)."""
        challenger = self.adapters.challenger()
        if requested is not None and challenger is not None and requested == challenger.name:
            return challenger
        return self.adapters.active

    def _finish(self, message_id: int, text: str, status: str, last: GenerationChunk | None) -> None:
        """Store the answer's end: one UPDATE, no ORM load (it runs once per answer
        on a busy server), retried while the database is locked or away. Raises
        NotStored when every retry failed (the message stays ``streaming``
        and is recovered as abandoned once this process is gone)."""
        values: dict = {"content": text, "status": status, "completed_at": utcnow()}
        if last is not None:
            values |= {"finish_reason": last.finish_reason, "prompt_tokens": last.prompt_tokens,
                       "completion_tokens": last.completion_tokens}
            if "served_adapter" in last.extra:  # a swap came between pinning and generating
                values["adapter_version"] = last.extra["served_adapter"]
        elif status == "stopped":
            values["finish_reason"] = "stopped"
        for delay in (*FINISH_RETRY_DELAYS, None):
            try:
                with session_scope(self.db) as session:
                    session.execute(update(Message).where(Message.id == message_id).values(**values))
                return
            except OperationalError as exc:
                if delay is None:
                    raise NotStored(
                        f"answer {message_id} was generated but could not be stored ({exc.orig}); retry shortly"
                    ) from exc
                log.warning("storing answer %d failed (%s); retrying in %.1f s", message_id, exc.orig, delay)
                time.sleep(delay)

    async def start(self, message_id: int, lease: SlotLease | None = None) -> AnswerJob | None:
        """Claim pending message ``message_id`` and start generating it in a task
        of its own, which gives one slot of ``lease`` back when it ends. None if
        another caller has claimed it (the slot is given back at once)."""
        try:
            claim = await asyncio.to_thread(self._claim, message_id)
        except BaseException:
            if lease is not None:
                lease.release()
            raise
        if claim is None:
            if lease is not None:
                lease.release()
            return None
        job = AnswerJob(self, *claim, lease=lease)
        job.bind(message_id)
        return job

    async def stream(self, message_id: int, owner: int | None = None) -> AsyncIterator[GenerationChunk]:
        """Generate the answer for pending message ``message_id``, yielding deltas;
        the generation holds one of ``owner``'s generation slots.

        If another caller is already generating it, wait for that one and yield
        the finished text as a single chunk. Raises EngineUnavailable (503), and
        RateLimited when ``owner`` has no free slot.
        """
        while True:
            job = await self.start(message_id, self.slots.take(owner) if owner is not None else None)
            if job is not None:
                break
            abandoned = False
            async for chunk in self._follow(message_id):
                if chunk is None:  # its process died: claim it here
                    abandoned = True
                    break
                yield chunk
            if not abandoned:
                return
        async for chunk in job.chunks():
            yield chunk

    async def start_api_answers(
        self, user_id: int, history: list[dict[str, str]], samplings: list[SamplingSettings]
    ) -> tuple[list[int], list[AnswerJob]]:
        """Answers for an API request: the engine starts on them at once, while the
        request and its answers (already claimed by this process, adapter pinned)
        are stored off the event loop -- the database write hides behind the
        prompt's prefill instead of adding to the time to the first token.
        If storing fails, the generations are aborted and the error raised
        (nothing was accepted). Each answer holds one of ``user_id``'s
        generation slots: RateLimited, before anything starts, if they are not free."""
        adapter = self.adapters.active
        lease = self.slots.take(user_id, len(samplings))
        try:
            jobs = [AnswerJob(self, history, sampling, adapter, lease) for sampling in samplings]
        except BaseException:
            lease.close()
            raise
        try:
            ids = await asyncio.to_thread(self._store_claimed, user_id, history, samplings, adapter)
        except BaseException:
            for job in jobs:
                job.cancel()
            raise
        for job, message_id in zip(jobs, ids, strict=True):
            ended = job.bind(message_id)
            if ended is not None:  # generation ended before the message was stored: store it now
                await asyncio.to_thread(self._finish, message_id, *ended)
        return ids, jobs

    def _store_claimed(
        self, user_id: int, history: list[dict[str, str]], samplings: list[SamplingSettings],
        adapter: AdapterRef | None,
    ) -> list[int]:
        """Store an API request's history and its answers as one conversation;
        the answers are siblings, already ``streaming`` and claimed here."""
        with session_scope(self.db) as session:
            turn = start_turn(
                session, session.get(User, user_id), None, history, [s.to_json() for s in samplings],
                max_turns=self.settings.max_turns, source="api",
                claimed_by=self.claim_id, adapter_version=adapter.name if adapter else None,
            )
            return [a.id for a in turn.answers]  # type: ignore[misc]

    async def _follow(self, message_id: int) -> AsyncIterator[GenerationChunk | None]:
        """Wait for another caller's answer; the finished text as one chunk, or
        None once the process generating it is found dead (the answer is back
        to ``pending``, for the caller to claim)."""
        last_check = time.monotonic()
        while True:
            message = await asyncio.to_thread(self._read, message_id)
            if message is None:
                return
            if message.status in ("complete", "stopped", "error"):
                yield GenerationChunk(
                    text=message.content,
                    finished=True,
                    finish_reason=message.finish_reason,
                    prompt_tokens=message.prompt_tokens,
                    completion_tokens=message.completion_tokens,
                )
                return
            if message.status == "pending":
                yield None
                return
            if time.monotonic() - last_check > CLAIMER_CHECK_SECONDS and message_id not in self._running:
                last_check = time.monotonic()
                if await asyncio.to_thread(self._recover, message_id):
                    yield None
                    return
            await asyncio.sleep(POLL_SECONDS)

    def _read(self, message_id: int) -> Message | None:
        with Session(self.db, expire_on_commit=False) as session:
            return session.get(Message, message_id)

    def _recover(self, message_id: int) -> bool:
        with session_scope(self.db) as session:
            return recover_abandoned_answers(session, [message_id]) > 0

    async def complete(self, message_id: int, lease: SlotLease | None = None) -> Message:
        """Generate to the end (no streaming) and return the stored message; the
        generation holds one slot of ``lease`` (given back at once if another
        caller is generating it: this then waits for that one)."""
        job = await self.start(message_id, lease)
        if job is not None:
            await job.wait()
        else:
            async for _ in self.stream(message_id):
                pass
        return await asyncio.to_thread(self.stored, message_id)

    def stored(self, message_id: int) -> Message:
        with Session(self.db, expire_on_commit=False) as session:
            message = session.get(Message, message_id)
            assert message is not None
            session.expunge(message)
            return message

    async def stop(self, message_id: int) -> bool:
        """Abort the engine request producing ``message_id``; False if none runs here."""
        job = self._running.get(message_id)
        if job is None:
            return False
        await self.engine.abort(job.request_id)
        return True


class AnswerJob:
    """One answer generated by a task of its own.

    The task reads the engine stream to the end and stores the result, whether
    or not anyone is listening: an answer whose client never started reading is
    still completed and kept. A listener that goes away early cancels the job:
    the engine request is aborted and the partial text kept as ``stopped``
    (the same as the stop button). Chunks reach listeners through a queue.
    One slot of ``lease`` is given back when the task ends, however it ends
    (a done callback: it runs even for a task cancelled before it started).
    """

    def __init__(
        self, service: AnswerService, context: list[dict[str, str]], sampling: SamplingSettings,
        adapter: AdapterRef | None, lease: SlotLease | None = None,
    ) -> None:
        self.service = service
        self.adapter = adapter
        self.request_id = f"ans-{uuid.uuid4().hex[:12]}"
        self.message_id: int | None = None
        self._result: tuple[str, str, GenerationChunk | None] | None = None  # text, status, last chunk
        self._queue: asyncio.Queue[GenerationChunk | BaseException | None] = asyncio.Queue()
        self._task = asyncio.create_task(self._run(context, sampling))
        if lease is not None:
            self._task.add_done_callback(lambda _task: lease.release())

    def bind(self, message_id: int) -> tuple[str, str, GenerationChunk | None] | None:
        """Tell the job which stored message it produces (it may start before).
        Returns the result to store now if the generation already ended."""
        self.message_id = message_id
        if self._result is None:
            self.service._running[message_id] = self
            return None
        return self._result

    def cancel(self) -> None:
        self._task.cancel()

    async def _run(self, context: list[dict[str, str]], sampling: SamplingSettings) -> None:
        service = self.service
        started = time.perf_counter()
        first_token: float | None = None
        parts: list[str] = []
        last: GenerationChunk | None = None
        status = "stopped"
        try:
            async for chunk in service.engine.generate(context, sampling, self.request_id, self.adapter):
                if chunk.text:
                    if first_token is None:
                        first_token = time.perf_counter()
                    parts.append(chunk.text)
                if chunk.finished:
                    last = chunk
                    status = "stopped" if chunk.finish_reason == "abort" else "complete"
                self._queue.put_nowait(chunk)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # EngineUnavailable, ValueError: the listener re-raises it
            status = "error"
            self._queue.put_nowait(exc)
        finally:
            # On normal end, on stop (abort) and when the listener went away
            # (cancellation): the partial answer is kept either way. If the
            # message isn't stored yet, bind() stores the result.
            self._result = ("".join(parts), status, last)
            try:
                if self.message_id is not None:
                    service._running.pop(self.message_id, None)
                    # Off the event loop, which streams the other answers; shielded
                    # so a second cancellation cannot drop the write.
                    await asyncio.shield(asyncio.to_thread(service._finish, self.message_id, *self._result))
            except NotStored as exc:  # the listener learns it (a 503), never an empty 200
                log.error("%s", exc)
                self._queue.put_nowait(exc)
            finally:
                if service.metrics is not None:
                    adapter_name = self.adapter.name if self.adapter else None
                    if last is not None:
                        adapter_name = last.extra.get("served_adapter", adapter_name)
                    service.metrics.observe_answer(
                        adapter_name, status, started, first_token,
                        last.completion_tokens if last else None, time.perf_counter(),
                    )
                self._queue.put_nowait(None)

    async def chunks(self) -> AsyncIterator[GenerationChunk]:
        """The answer's chunks as they come; raises what the engine raised.

        Chunks that queued up while the listener was busy (a loaded server) come
        out as one: the same text in fewer events, so a slow consumer catches up
        instead of falling further behind."""
        finished = False
        held: object = _NOTHING  # an end marker or error met while merging
        try:
            while True:
                item = await self._queue.get() if held is _NOTHING else held
                held = _NOTHING
                if item is None:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                texts = [item.text]
                while not item.finished and not self._queue.empty():
                    following = self._queue.get_nowait()
                    if not isinstance(following, GenerationChunk):
                        held = following
                        break
                    texts.append(following.text)
                    item = following
                yield item if len(texts) == 1 else dataclasses.replace(item, text="".join(texts))
        finally:
            if not finished:
                self._task.cancel()  # the listener went away: stop generating

    async def wait(self) -> None:
        """Until the answer is generated and stored (raises what the engine raised)."""
        async for _ in self.chunks():
            pass
