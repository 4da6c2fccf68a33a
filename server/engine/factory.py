"""Choosing the engine named by ``TUNELOOP_ENGINE``."""

from __future__ import annotations

from server.engine.base import ChatEngine
from store.settings import Settings


def build_engine(settings: Settings) -> ChatEngine:
    if settings.engine == "fake":
        from server.engine.fake import FakeChatEngine

        return FakeChatEngine(model=settings.model, delay=0.03)  # visible streaming for UI work
    if settings.engine == "vllm":
        from server.engine.vllm_engine import VllmChatEngine

        return VllmChatEngine(settings)
    if settings.engine == "openai":
        from server.engine.remote import RemoteChatEngine

        return RemoteChatEngine(settings)
    raise ValueError(f"TUNELOOP_ENGINE must be `vllm`, `openai` or `fake`, not {settings.engine!r}")
