"""Answers a dead server left half-done are regenerated, wherever that server
ran and whatever its host and pid (per-boot claim ids and a presence lease,
which also hold in containers where pid 1 repeats); answers live servers are
streaming are left alone; a viewer of an abandoned answer takes it over
instead of polling forever; a final write that keeps failing is never
acknowledged as an answer."""

from __future__ import annotations

import asyncio
from contextlib import contextmanager
from datetime import timedelta

from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError
from sqlmodel import Session

from server.adapters import AdapterRegistry
from server.answers import AnswerService
from server.app import create_app
from server.engine.fake import FakeChatEngine
from server.identity import create_api_key
from store import leases, presence
from store.conversations import add_message, start_conversation
from store.db import db_now, make_engine, session_scope, upgrade
from store.tables import Message, User
from tests.conftest import make_settings


def _streaming_answers(db, claims: dict[str, str | None]) -> dict[str, int]:
    ids = {}
    with session_scope(db) as session:
        user = User(kind="browser")
        session.add(user)
        session.flush()
        conversation = start_conversation(session, user, "web", "q")
        question = add_message(session, conversation, None, "user", "q")
        for name, claim in claims.items():
            message = add_message(session, conversation, question.id, "assistant", "partial", status="streaming",
                                  claimed_by=claim, sampling={"max_tokens": 4})
            ids[name] = message.id
    return ids


def test_only_answers_of_servers_that_stopped_announcing_are_recovered(database_url):
    upgrade(database_url)
    db = make_engine(database_url)
    alive, gone = presence.new_claim_id(), presence.new_claim_id()
    with session_scope(db) as session:
        presence.announce(session, alive)
        presence.announce(session, gone)
        # the gone server's lease ran out (its container was killed)
        leases.acquire(session, presence.PREFIX + gone, "nobody", 1, now=db_now(session) + timedelta(hours=1))
    claims = {"alive": alive, "gone": gone, "same-pid-other-boot": "host:1:deadbeef", "none": None}
    ids = _streaming_answers(db, claims)
    with session_scope(db) as session:
        assert presence.recover_abandoned_answers(session) == 3
    with Session(db) as session:
        status = {name: session.get(Message, i).status for name, i in ids.items()}
        content = session.get(Message, ids["gone"]).content
    db.dispose()
    assert status == {"alive": "streaming", "gone": "pending", "same-pid-other-boot": "pending", "none": "pending"}
    assert content == ""


async def test_a_viewer_of_an_abandoned_answer_generates_it_itself(tmp_path, monkeypatch):
    monkeypatch.setattr("server.answers.CLAIMER_CHECK_SECONDS", 0.1)
    settings = make_settings(tmp_path)
    settings.data_dir.mkdir(parents=True)
    upgrade(settings.resolved_database_url)
    db = make_engine(settings.resolved_database_url)
    ids = _streaming_answers(db, {"orphan": "crashed-host:7:0badc0de"})
    engine = FakeChatEngine()

    async def view() -> list[str]:
        await engine.start()
        service = AnswerService(settings, engine, db, AdapterRegistry(engine, db))
        return [chunk.text async for chunk in service.stream(ids["orphan"])]

    texts = await asyncio.wait_for(view(), timeout=20)
    with Session(db) as session:
        message = session.get(Message, ids["orphan"])
    db.dispose()
    assert "".join(texts) == message.content and message.status == "complete"
    assert message.claimed_by != "crashed-host:7:0badc0de"


def test_an_answer_whose_final_write_keeps_failing_is_a_503_not_an_empty_200(tmp_path, monkeypatch):
    monkeypatch.setattr("server.answers.FINISH_RETRY_DELAYS", (0.01, 0.01))
    app = create_app(make_settings(tmp_path))
    with session_scope(app.state.db) as session:
        _, key = create_api_key(session, "writes")
    attempts = []

    @contextmanager
    def locked_for_answers(db):
        """Sessions whose UPDATE of an answer's end fails as a locked database does."""
        with session_scope(db) as session:
            execute = session.execute

            def failing(statement, *args, **kwargs):
                if getattr(statement, "is_update", False) and "completed_at" in str(statement):
                    attempts.append(statement)
                    raise OperationalError("UPDATE messages", {}, Exception("database is locked"))
                return execute(statement, *args, **kwargs)

            session.execute = failing
            yield session

    monkeypatch.setattr("server.answers.session_scope", locked_for_answers)
    with TestClient(app) as client:
        response = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                               json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert response.status_code == 503, response.text
    assert "could not be stored" in response.json()["error"]["message"]
    assert len(attempts) == 3  # the first try and two retries
