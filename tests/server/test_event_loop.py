"""No database call on the event loop: one slow query there would stall every
stream this server is sending. Every SQL statement a chat session causes is
recorded with whether an event loop was running in its thread; handlers and
dependencies must run them in the thread pool."""

from __future__ import annotations

import asyncio

from fastapi.testclient import TestClient
from sqlalchemy import event
from sqlmodel import Session, col, select

from server.app import create_app
from server.identity import create_api_key
from store.db import session_scope
from store.tables import Comparison, Message
from tests.conftest import make_settings
from tests.support.html import parse


def _watch(db) -> list[str]:
    on_loop: list[str] = []

    @event.listens_for(db, "before_cursor_execute")
    def record(conn, cursor, statement, parameters, context, executemany) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # a worker thread: fine
        on_loop.append(" ".join(statement.split())[:80])

    return on_loop


def test_chat_pages_and_api_never_query_on_the_event_loop(tmp_path):
    app = create_app(make_settings(tmp_path, ab_rate=1.0))  # every turn an A/B pair
    with session_scope(app.state.db) as session:
        _, key = create_api_key(session, "loop-watch")
    api = {"Authorization": f"Bearer {key}"}
    on_loop = _watch(app.state.db)

    with TestClient(app) as client:
        token = parse(client.get("/").text).select_one('meta[name="csrf-token"]').get("content")
        htmx = {"HX-Request": "true", "X-CSRF-Token": token}
        # pages without JavaScript: new chat, next turn, regenerate (answers made before the redirect)
        made = client.post("/c", data={"content": "hi", "csrf_token": token}, follow_redirects=False)
        assert made.status_code == 303
        conversation_id = int(made.headers["location"].rsplit("/", 1)[1])
        assert client.get(made.headers["location"]).status_code == 200
        with Session(app.state.db) as session:
            comparison = session.exec(select(Comparison)).one()
        assert client.post(f"/comparisons/{comparison.id}/choice", data={"winner": "a"}, headers=htmx).is_success
        posted = client.post(f"/c/{conversation_id}/messages", data={"content": "more", "csrf_token": token},
                             follow_redirects=False)
        assert posted.status_code == 303
        # pages with htmx: the turn's answers stream over SSE
        assert client.post(f"/c/{conversation_id}/messages", data={"content": "again"}, headers=htmx).is_success
        with Session(app.state.db) as session:
            pending = session.exec(select(Message.id).where(Message.status == "pending")).all()
        assert pending
        for message_id in pending:
            assert "event: done" in client.get(f"/answers/{message_id}/stream").text
        last = max(pending)
        assert client.post(f"/answers/{last}/feedback", data={"rating": "up"}, headers=htmx).is_success
        assert client.post(f"/answers/{last}/regenerate", headers=htmx).is_success
        with Session(app.state.db) as session:
            newest = session.exec(select(Message.id).order_by(col(Message.id).desc())).first()
        assert client.post(f"/answers/{newest}/stop", headers=htmx).status_code == 204
        assert client.post(f"/answers/{last}/regenerate", data={"csrf_token": token},
                           follow_redirects=False).status_code == 303
        assert client.post("/c", data={"content": "new"}, headers=htmx).status_code == 204
        # the API
        body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
        answer = client.post("/v1/chat/completions", json=body, headers=api)
        assert answer.status_code == 200
        message_id = answer.json()["tuneloop"]["message_id"]
        assert client.post(f"/api/messages/{message_id}/feedback", json={"rating": "up"}, headers=api).is_success
        pair = client.post("/api/comparisons", json=body, headers=api)
        assert pair.status_code == 200
        assert client.post(f"/api/comparisons/{pair.json()['id']}/choice", json={"winner": "b"},
                           headers=api).is_success

    assert on_loop == [], f"SQL ran on the event loop: {on_loop}"
