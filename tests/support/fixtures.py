"""Fixtures (a pytest plugin, see tests/conftest.py): the real vLLM engine,
started once per test session, and live servers on it."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from server.engine.loop_thread import EngineThread
from server.engine.vllm_engine import VllmChatEngine
from tests.conftest import REPO, make_settings
from tests.support.live import LiveServer, start_live_server

ENGINE_START_TIMEOUT_S = 600


@pytest.fixture(scope="session")
def engine_loop() -> Iterator[EngineThread]:
    loop_thread = EngineThread().start()
    yield loop_thread
    loop_thread.stop()


@pytest.fixture(scope="session")
def vllm_engine(engine_loop: EngineThread, tmp_path_factory) -> Iterator[VllmChatEngine]:
    model = os.environ.get("TUNELOOP_MODEL", str(REPO / "models/smollm2-135m-instruct"))
    if not Path(model, "config.json").is_file():
        pytest.fail(f"the model folder {model} is missing: run `make test` (it converts the packaged model)")
    settings = make_settings(tmp_path_factory.mktemp("engine"), engine="vllm", model=model)
    engine = VllmChatEngine(settings)
    engine_loop.run(engine.start(), timeout=ENGINE_START_TIMEOUT_S)
    yield engine
    engine_loop.run(engine.shutdown(), timeout=120)


@pytest.fixture
def live_server(tmp_path, vllm_engine, engine_loop) -> Iterator[Callable[..., LiveServer]]:
    """Start a server on the real engine with its own database and settings."""
    servers: list[LiveServer] = []

    def start(**overrides) -> LiveServer:
        settings = make_settings(tmp_path / f"app{len(servers)}", engine="vllm", model=vllm_engine.model, **overrides)
        server = start_live_server(settings, vllm_engine, engine_loop)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
