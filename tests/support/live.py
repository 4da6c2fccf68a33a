"""A real HTTP server for tests: uvicorn serving a fresh app (own database) on
the loop that owns the shared engine, so many apps can share one vLLM engine."""

from __future__ import annotations

import concurrent.futures
import socket
import time
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI

from server.app import create_app
from server.engine.base import ChatEngine
from server.engine.loop_thread import EngineThread
from server.identity import create_api_key
from store.db import session_scope
from store.settings import Settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LiveServer:
    app: FastAPI
    base_url: str
    server: uvicorn.Server
    loop_thread: EngineThread
    serving: concurrent.futures.Future

    def api_key(self, name: str = "tester") -> str:
        with session_scope(self.app.state.db) as session:
            _, key = create_api_key(session, name)
        return key

    def headers(self, name: str = "tester") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key(name)}"}

    def stop(self) -> None:
        self.server.should_exit = True
        self.serving.result(timeout=30)


def start_live_server(settings: Settings, engine: ChatEngine, loop_thread: EngineThread) -> LiveServer:
    # The session's engine outlives each test's app: a new app starts on the
    # base model, so the engine must too (a previous test may have left an
    # adapter merged into its weights).
    loop_thread.run(engine.serve(None), timeout=120)
    loop_thread.run(engine.serve_beside(None), timeout=120)  # nor a canary beside it
    app = create_app(settings, engine=engine)
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan="on",
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    serving = loop_thread.submit(server.serve())
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("test server did not start within 30 s")
        if serving.done():
            serving.result()  # raises why it failed
        time.sleep(0.02)
    return LiveServer(app=app, base_url=f"http://127.0.0.1:{port}", server=server,
                      loop_thread=loop_thread, serving=serving)
