"""API answers start on the engine while the request is being stored: the
store must not lose an answer that finishes first, and a failed store must
abort the generation (fake engine; the real engine runs the same path in
tests/server/test_chat_api.py)."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, select

from server.answers import AnswerService
from server.app import create_app
from server.identity import create_api_key
from store.db import session_scope
from store.tables import Message
from tests.conftest import make_settings

BODY = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 6, "temperature": 0}


def _app_and_key(tmp_path):
    app = create_app(make_settings(tmp_path))
    with session_scope(app.state.db) as session:
        _, key = create_api_key(session, "jobs")
    return app, {"Authorization": f"Bearer {key}"}


def test_an_answer_that_finishes_before_its_request_is_stored_is_kept(tmp_path, monkeypatch):
    app, headers = _app_and_key(tmp_path)
    original = AnswerService._store_claimed

    def slow_store(self, *args):
        time.sleep(0.3)  # the fake engine is done long before this returns
        return original(self, *args)

    monkeypatch.setattr(AnswerService, "_store_claimed", slow_store)
    with TestClient(app) as client:
        response = client.post("/v1/chat/completions", json=BODY, headers=headers)
    assert response.status_code == 200
    text = response.json()["choices"][0]["message"]["content"]
    with Session(app.state.db) as session:
        answer = session.get(Message, int(response.headers["X-Tuneloop-Message-Id"]))
    assert (answer.status, answer.content, answer.completion_tokens) == ("complete", text, 6)
    assert answer.claimed_by and answer.finish_reason == "length"


def test_a_failed_store_aborts_the_generation_and_keeps_nothing(tmp_path, monkeypatch):
    app, headers = _app_and_key(tmp_path)
    engine = app.state.engine
    engine.delay = 0.05  # still generating when the store fails
    generate, outcomes = engine.generate, []

    async def watched_generate(*args, **kwargs):
        finished = False
        try:
            async for chunk in generate(*args, **kwargs):
                finished = chunk.finished
                yield chunk
        finally:
            outcomes.append("finished" if finished else "stopped early")

    engine.generate = watched_generate

    def failing_store(self, *args):
        raise OperationalError("INSERT", {}, Exception("database is locked"))

    monkeypatch.setattr(AnswerService, "_store_claimed", failing_store)
    with TestClient(app) as client:
        response = client.post("/v1/chat/completions", json={**BODY, "stream": True}, headers=headers)
        time.sleep(0.8)  # longer than the whole generation would take
    assert response.status_code == 503 and "nothing was saved" in response.json()["error"]["message"]
    assert outcomes == ["stopped early"]  # the generation was cancelled, not run to the end
    with Session(app.state.db) as session:
        assert session.exec(select(Message)).all() == []
