"""A change to what serves reaches running servers at once, pushed, not polled:
the poll is set to a minute here, so only the signal can make a swap fast.
Candidates are preloaded while the gate decides and the rollback target stays
loaded, so promotion and rollback are pointer flips (no load at the switch);
answers in flight across a swap keep the version they started on. Live
servers (uvicorn on uvloop, as in production) on the fake engine, on SQLite
and PostgreSQL; the changes come from another database engine, as from the
trainer or the CLI."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest
from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlmodel import Session

from server.engine.base import AdapterRef
from server.engine.fake import FakeChatEngine
from server.engine.loop_thread import EngineThread
from store.db import make_engine, session_scope
from store.registry import activate, register_candidate, rollback
from store.tables import AdapterVersion, Message
from tests.conftest import make_settings
from tests.support.adapter_folders import servable_folder
from tests.support.live import LiveServer, start_live_server

ADMIN = {"Authorization": "Bearer dev-admin-token"}
SWAP_BOUND_S = 2.0  # the poll is 60 s: only the push gets a swap in under this


class CountingEngine(FakeChatEngine):
    """The fake engine, counting the adapter loads it was asked for."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__(delay=delay)
        self.loads: list[str] = []

    async def load_adapter(self, adapter: AdapterRef) -> None:
        self.loads.append(adapter.name)
        await super().load_adapter(adapter)


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> float:
    """Seconds until ``predicate()`` is true; fails after ``timeout``."""
    started = time.perf_counter()
    while not predicate():
        if time.perf_counter() - started > timeout:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(0.005)
    return time.perf_counter() - started


@dataclass
class Running:
    server: LiveServer
    engine: CountingEngine
    writer: Engine  # another process's connection pool: the trainer's, the CLI's

    @property
    def url(self) -> str:
        return self.server.base_url

    def change(self, what: Callable[[Session], object]) -> float:
        """Commit ``what(session)`` from the other pool; the time it committed."""
        with session_scope(self.writer) as session:
            what(session)
        return time.perf_counter()

    def serving(self) -> str | None:
        return httpx.get(self.url + "/healthz").json()["adapter"]


@pytest.fixture
def serve(tmp_path, database_url) -> Iterator[Callable[..., Running]]:
    """``serve(delay=0.0, **settings)``: a live server on a fresh fake engine,
    polling once a minute, with v1 and v2 trained (status ``training``)."""
    loop_thread = EngineThread(name="push-test-loop").start()
    running: list[Running] = []

    def start(delay: float = 0.0, **overrides) -> Running:
        engine = CountingEngine(delay=delay)
        loop_thread.run(engine.start())
        values = {"database_url": database_url, "adapter_poll_seconds": 60.0, **overrides}
        server = start_live_server(make_settings(tmp_path / "app", **values), engine, loop_thread)
        this = Running(server, engine, make_engine(database_url))
        running.append(this)
        with session_scope(this.writer) as session:
            for v in (1, 2):
                folder = servable_folder(tmp_path / "adapters" / f"v{v}")
                session.add(AdapterVersion(version=v, path=str(folder), status="training"))
        return this

    yield start
    for this in running:
        this.server.stop()
        this.writer.dispose()
    loop_thread.stop()


def promote(session: Session, version: int) -> None:
    register_candidate(session, version)
    activate(session, version)


def answer(running: Running, headers: dict[str, str], **body) -> dict:
    response = httpx.post(running.url + "/v1/chat/completions", headers=headers, timeout=30, json={
        "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_promotion_and_rollback_reach_a_running_server_at_once(serve):
    app = serve()
    headers = app.server.headers("user")
    assert app.serving() is None

    # the trainer registers v1 and the gate decides: the server preloads it meanwhile
    app.change(lambda s: register_candidate(s, 1))
    wait_for(lambda: app.engine.preloaded == ["v1"], SWAP_BOUND_S, "preloading the candidate v1")
    committed = app.change(lambda s: activate(s, 1))
    wait_for(lambda: app.serving() == "v1", SWAP_BOUND_S, "the promotion of v1")
    first = answer(app, headers)
    assert time.perf_counter() - committed < SWAP_BOUND_S
    assert first["tuneloop"]["adapter"] == "v1" and first["choices"][0]["message"]["content"].startswith("[v1]")
    assert app.engine.loads == ["v1"]  # loaded once, while the gate decided: the promotion was a flip

    app.change(lambda s: register_candidate(s, 2))
    wait_for(lambda: app.engine.preloaded == ["v1", "v2"], SWAP_BOUND_S, "preloading the candidate v2")
    app.change(lambda s: activate(s, 2))
    wait_for(lambda: app.serving() == "v2", SWAP_BOUND_S, "the promotion of v2")

    # rollback is a flip too: v1 stayed loaded as the rollback target
    app.change(rollback)
    wait_for(lambda: app.serving() == "v1", SWAP_BOUND_S, "the rollback to v1")
    assert answer(app, headers)["tuneloop"]["adapter"] == "v1"
    assert app.engine.loads == ["v1", "v2"]

    # the admin API (in the server's own process) signals the same way
    rolled = httpx.post(app.url + "/api/admin/adapters/rollback", headers=ADMIN)
    assert rolled.status_code == 200 and rolled.json()["active"] is None
    wait_for(lambda: app.serving() is None, SWAP_BOUND_S, "the rollback to the base model")
    activated = httpx.post(app.url + "/api/admin/adapters/v2/activate", headers=ADMIN)
    assert activated.status_code == 200
    wait_for(lambda: app.serving() == "v2", SWAP_BOUND_S, "activating v2 again")
    assert app.engine.loads == ["v1", "v2"]


def test_answers_in_flight_across_a_swap_keep_their_version(serve):
    app = serve(delay=0.02)
    headers = app.server.headers("user")
    app.change(lambda s: promote(s, 1))
    wait_for(lambda: app.serving() == "v1", SWAP_BOUND_S, "activating v1")

    body = {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 40, "stream": True}
    with httpx.Client(base_url=app.url, timeout=30) as http, \
            http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as stream:
        streaming_id = int(stream.headers["X-Tuneloop-Message-Id"])
        lines = stream.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        app.change(lambda s: promote(s, 2))
        wait_for(lambda: app.serving() == "v2", SWAP_BOUND_S, "the swap to v2 while v1 streams")
        during = answer(app, headers)
        rest = [line for line in lines if line.startswith("data: ")]
    assert during["tuneloop"]["adapter"] == "v2" and during["choices"][0]["message"]["content"].startswith("[v2]")
    assert rest[-1] == "data: [DONE]"
    text = "".join(
        choice["delta"].get("content") or ""
        for line in [first, *rest[:-1]] for choice in json.loads(line[6:]).get("choices") or []
    )
    assert text.startswith("[v1]") and len(text.split()) == 40
    with Session(app.writer) as session:
        streamed = session.get(Message, streaming_id)
        assert streamed.status == "complete" and streamed.adapter_version == "v1" and streamed.content == text


def test_a_change_that_signals_nothing_is_caught_by_the_poll(serve):
    app = serve(adapter_poll_seconds=0.3)

    def quietly_activate_v1(session):  # as restoring a backup would: no signal
        session.execute(update(AdapterVersion).where(AdapterVersion.version == 1).values(status="active"))

    app.change(quietly_activate_v1)
    wait_for(lambda: app.serving() == "v1", 3.0, "the poll noticing v1")
