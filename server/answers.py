"""Producing assistant answers: engine stream in, stored message out.

An answer is first stored as a ``pending`` message (so an accepted request is
never lost), then claimed and streamed by exactly one caller, which records
the adapter that produced it and, at the end, its text, finish reason and token
counts. A stream that is stopped or whose client goes away aborts the engine
request and keeps the partial text as ``stopped``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import uuid
from collections.abc import AsyncIterator

from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from server.adapters import AdapterRegistry
from server.conversations import chat_context, thread
from server.db import session_scope
from server.engine.base import AdapterRef, ChatEngine, EngineUnavailable, GenerationChunk, SamplingSettings
from server.errors import ApiError
from server.models import Conversation, Message, utcnow
from server.settings import Settings

log = logging.getLogger("tuneloop.answers")

POLL_SECONDS = 0.25
HOST = socket.gethostname()


def process_identity() -> str:
    return f"{HOST}:{os.getpid()}"


class AnswerService:
    def __init__(
        self, settings: Settings, engine: ChatEngine, db: Engine, adapters: AdapterRegistry
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.db = db
        self.adapters = adapters
        self._running: dict[int, str] = {}  # message id -> engine request id

    def web_sampling(self) -> SamplingSettings:
        """Sampling for a browser turn; the random seed makes the answer replayable."""
        return SamplingSettings(
            temperature=self.settings.default_temperature,
            max_tokens=self.settings.default_max_tokens,
            seed=random.randrange(2**31),
        )

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
        adapter = self.adapters.active
        with session_scope(self.db) as session:
            claimed = session.execute(
                update(Message)
                .where(Message.id == message_id, Message.status == "pending")
                .values(
                    status="streaming",
                    adapter_version=adapter.name if adapter else None,
                    claimed_by=process_identity(),
                )
            ).rowcount
            if not claimed:
                return None
            message = session.get(Message, message_id)
            assert message is not None
            conversation = session.get(Conversation, message.conversation_id)
            assert conversation is not None
            context = chat_context(thread(session, conversation, message.parent_id))
            sampling = SamplingSettings(
                **{k: (tuple(v) if k == "stop" else v) for k, v in (message.sampling or {}).items()}
            )
        return context, sampling, adapter

    def _finish(self, message_id: int, text: str, status: str, last: GenerationChunk | None) -> None:
        with session_scope(self.db) as session:
            message = session.get(Message, message_id)
            if message is None:
                return
            message.content = text
            message.status = status
            message.completed_at = utcnow()
            if last is not None:
                message.finish_reason = last.finish_reason
                message.prompt_tokens = last.prompt_tokens
                message.completion_tokens = last.completion_tokens
            elif status == "stopped":
                message.finish_reason = "stopped"
            session.add(message)

    async def stream(self, message_id: int) -> AsyncIterator[GenerationChunk]:
        """Generate the answer for pending message ``message_id``, yielding deltas.

        If another caller is already generating it, wait for that one and yield
        the finished text as a single chunk. Raises EngineUnavailable (503).
        """
        claim = self._claim(message_id)
        if claim is None:
            async for chunk in self._follow(message_id):
                yield chunk
            return
        context, sampling, adapter = claim
        request_id = f"msg-{message_id}-{uuid.uuid4().hex[:8]}"
        self._running[message_id] = request_id
        parts: list[str] = []
        last: GenerationChunk | None = None
        status = "stopped"
        try:
            async for chunk in self.engine.generate(context, sampling, request_id, adapter):
                if chunk.text:
                    parts.append(chunk.text)
                if chunk.finished:
                    last = chunk
                    status = "stopped" if chunk.finish_reason == "abort" else "complete"
                yield chunk
        except (EngineUnavailable, ValueError):
            status = "error"
            raise
        finally:
            self._running.pop(message_id, None)
            # Runs on normal end, on stop (abort) and when the client went away
            # (cancellation), so the partial answer is kept either way.
            self._finish(message_id, "".join(parts), status, last)

    async def _follow(self, message_id: int) -> AsyncIterator[GenerationChunk]:
        while True:
            with Session(self.db) as session:
                message = session.get(Message, message_id)
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
            await asyncio.sleep(POLL_SECONDS)

    async def complete(self, message_id: int) -> Message:
        """Generate to the end (no streaming) and return the stored message."""
        async for _ in self.stream(message_id):
            pass
        with Session(self.db) as session:
            message = session.get(Message, message_id)
            assert message is not None
            return message

    async def stop(self, message_id: int) -> bool:
        """Abort the engine request producing ``message_id``; False if none runs here."""
        request_id = self._running.get(message_id)
        if request_id is None:
            return False
        await self.engine.abort(request_id)
        return True


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reset_interrupted_answers(db: Engine) -> int:
    """Answers left ``streaming`` by a server process on this host that is gone
    go back to ``pending``, so the next view regenerates them (their question was
    accepted: don't lose it). Other hosts' and live processes' answers are left
    alone: several servers may share the database."""
    with session_scope(db) as session:
        rows = session.exec(select(Message).where(Message.status == "streaming")).all()
        reset = 0
        for message in rows:
            host, _, pid = (message.claimed_by or "").rpartition(":")
            if host == HOST and pid.isdigit() and _process_alive(int(pid)):
                continue
            if host and host != HOST:
                continue
            message.status, message.content, message.claimed_by = "pending", "", None
            session.add(message)
            reset += 1
        return reset
