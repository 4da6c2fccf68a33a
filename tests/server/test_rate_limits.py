"""Rate limits (per identity and per client address) and the cap on answers
generating at once per identity: 429 with ``Retry-After``, in the OpenAI
error shape for the API and as the error fragment for pages. The shared test
settings turn both off; every test here turns on what it checks."""

from __future__ import annotations

import time

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from server.app import create_app
from server.engine.base import EngineUnavailable
from server.engine.fake import FakeChatEngine
from server.engine.loop_thread import EngineThread
from server.identity import create_api_key
from store.db import session_scope
from store.settings import Settings
from store.tables import Comparison, Conversation, Message
from tests.conftest import make_settings
from tests.support.html import parse
from tests.support.live import start_live_server

CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
ALICE = ("198.51.100.10", 40000)
BOB = ("198.51.100.20", 40000)


def limited(tmp_path, **overrides) -> Settings:
    values = {
        "rate_limits": True, "rate_limit_chat": "1000/minute", "rate_limit_compare": "1000/minute",
        "rate_limit_feedback": "1000/minute", "rate_limit_per_address": "1000/minute",
    }
    return make_settings(tmp_path, **{**values, **overrides})


def new_key(app, name: str) -> tuple[dict[str, str], int]:
    with session_scope(app.state.db) as session:
        row, key = create_api_key(session, name)
        return {"Authorization": f"Bearer {key}"}, row.user_id


def csrf(client: TestClient) -> str:
    return parse(client.get("/").text).select_one('meta[name="csrf-token"]').get("content")


def assert_429(response, says: str) -> None:
    assert response.status_code == 429, response.text
    retry_after = int(response.headers["Retry-After"])
    assert 1 <= retry_after <= 60
    error = response.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == 429
    assert says in error["message"] and "retry" in error["message"]


# --- per identity --------------------------------------------------------------


def test_chat_over_the_per_identity_limit_is_429_with_retry_after(tmp_path):
    app = create_app(limited(tmp_path, rate_limit_chat="2/minute"))
    with TestClient(app, client=ALICE) as client:
        alice, _ = new_key(app, "alice")
        bob, _ = new_key(app, "bob")
        assert [client.post("/v1/chat/completions", json=CHAT, headers=alice).status_code for _ in range(2)] == [
            200, 200
        ]
        refused = client.post("/v1/chat/completions", json=CHAT, headers=alice)
        assert_429(refused, "too many chat requests (limit 2 per 1 minute)")
        # another identity from the same address has its own count
        assert client.post("/v1/chat/completions", json=CHAT, headers=bob).status_code == 200
    with Session(app.state.db) as session:  # the refused request stored nothing
        assert len(session.exec(select(Message).where(Message.role == "assistant")).all()) == 3


def test_feedback_and_comparisons_have_their_own_limits(tmp_path):
    app = create_app(limited(tmp_path, rate_limit_feedback="2/minute", rate_limit_compare="1/minute"))
    with TestClient(app, client=ALICE) as client:
        headers, _ = new_key(app, "alice")
        message_id = client.post("/v1/chat/completions", json=CHAT, headers=headers).json()["tuneloop"]["message_id"]
        thumbs = [
            client.post(f"/api/messages/{message_id}/feedback", json={"rating": r}, headers=headers)
            for r in ("up", "down", "up")
        ]
        assert [t.status_code for t in thumbs[:2]] == [200, 200]
        assert_429(thumbs[2], "too many feedback requests")

        comparison = client.post("/api/comparisons", json=CHAT, headers=headers)
        assert comparison.status_code == 200
        assert_429(client.post("/api/comparisons", json=CHAT, headers=headers), "too many compare requests")
        # the A/B choice is feedback: its limit is already spent
        choice = client.post(f"/api/comparisons/{comparison.json()['id']}/choice", json={"winner": "a"},
                             headers=headers)
        assert_429(choice, "too many feedback requests")
        # chat is counted apart from both
        assert client.post("/v1/chat/completions", json=CHAT, headers=headers).status_code == 200


def test_pages_get_the_429_as_their_error_fragment(tmp_path):
    app = create_app(limited(tmp_path, rate_limit_chat="1/minute", rate_limit_feedback="1/minute"))
    with TestClient(app, client=ALICE) as client:
        token = csrf(client)
        htmx = {"HX-Request": "true", "X-CSRF-Token": token}
        # without JavaScript: the answer is generated before the redirect
        first = client.post("/c", data={"content": "hi", "csrf_token": token}, follow_redirects=False)
        assert first.status_code == 303
        again = client.post("/c", data={"content": "hi again"}, headers=htmx)
        assert again.status_code == 429 and int(again.headers["Retry-After"]) >= 1
        alert = parse(again.text).select_one('.error[role="alert"]')
        assert "too many chat requests" in alert.text()
        with Session(app.state.db) as session:
            answer = session.exec(select(Message).where(Message.role == "assistant")).one()
        # regenerating is a chat turn too
        assert client.post(f"/answers/{answer.id}/regenerate", headers=htmx).status_code == 429
        assert client.post(f"/answers/{answer.id}/feedback", data={"rating": "up"}, headers=htmx).status_code == 200
        thumbs = client.post(f"/answers/{answer.id}/feedback", data={"rating": "down"}, headers=htmx)
        assert thumbs.status_code == 429 and "too many feedback requests" in thumbs.text


# --- per address -----------------------------------------------------------------


def test_the_per_address_limit_counts_every_identity_together(tmp_path):
    app = create_app(limited(tmp_path, rate_limit_per_address="3/minute"))
    with TestClient(app, client=ALICE) as client, TestClient(app, client=BOB) as elsewhere:
        keys = [new_key(app, f"bot{i}")[0] for i in range(4)]
        statuses = [client.post("/v1/chat/completions", json=CHAT, headers=h).status_code for h in keys[:3]]
        assert statuses == [200, 200, 200]
        assert_429(client.post("/v1/chat/completions", json=CHAT, headers=keys[3]), "requests from your address")
        # the same key from another address is fine
        assert elsewhere.post("/v1/chat/completions", json=CHAT, headers=keys[3]).status_code == 200


def test_cookieless_visitors_from_one_address_share_its_limit(tmp_path):
    """Throwing the cookie away makes a new anonymous identity, not a new allowance."""
    app = create_app(limited(tmp_path, rate_limit_per_address="2/minute"))
    statuses = []
    for _ in range(3):
        with TestClient(app, client=ALICE) as visitor:  # a fresh client: no cookie
            htmx = {"HX-Request": "true", "X-CSRF-Token": csrf(visitor)}
            statuses.append(visitor.post("/c", data={"content": "hi"}, headers=htmx).status_code)
    assert statuses == [204, 204, 429]


def test_x_forwarded_for_is_honoured_only_from_a_trusted_proxy(tmp_path):
    app = create_app(limited(tmp_path, rate_limit_per_address="2/minute", trusted_proxies="10.0.0.0/8"))
    with TestClient(app, client=("10.0.0.2", 40000)) as proxy, TestClient(app, client=ALICE) as direct:
        headers, _ = new_key(app, "behind-proxy")

        def via_proxy(address: str):
            return proxy.post("/v1/chat/completions", json=CHAT, headers={**headers, "X-Forwarded-For": address})

        assert [via_proxy("203.0.113.1").status_code for _ in range(2)] == [200, 200]
        assert_429(via_proxy("203.0.113.1"), "requests from your address")
        assert via_proxy("203.0.113.2").status_code == 200  # another client behind the same proxy
        # a client forging the header for itself changes nothing: it is not a proxy
        forged = [
            direct.post("/v1/chat/completions", json=CHAT, headers={**headers, "X-Forwarded-For": f"192.0.2.{i}"})
            for i in range(3)
        ]
        assert [r.status_code for r in forged] == [200, 200, 429]


def test_limits_are_off_with_tuneloop_rate_limits_false(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELOOP_RATE_LIMITS", "false")
    tight = limited(tmp_path, rate_limit_chat="1/minute", rate_limit_per_address="1/minute")
    settings = Settings(**tight.model_dump(exclude={"rate_limits"}))  # rate_limits from the environment
    assert settings.rate_limits is False
    app = create_app(settings)
    with TestClient(app, client=ALICE) as client:
        headers, _ = new_key(app, "alice")
        assert {client.post("/v1/chat/completions", json=CHAT, headers=headers).status_code for _ in range(3)} == {200}


# --- answers generating at once --------------------------------------------------


def test_a_held_slot_refuses_the_next_generation_until_released(tmp_path):
    app = create_app(make_settings(tmp_path, max_concurrent_generations=1))
    slots = app.state.generation_slots
    with TestClient(app, client=ALICE) as client:
        headers, user_id = new_key(app, "alice")
        other, _ = new_key(app, "bob")
        held = slots.take(user_id)
        refused = client.post("/v1/chat/completions", json=CHAT, headers=headers)
        assert_429(refused, "you already have 1 answer being generated and may have at most 1 at once")
        assert client.post("/v1/chat/completions", json=CHAT, headers=other).status_code == 200  # per identity
        held.release()
        assert client.post("/v1/chat/completions", json=CHAT, headers=headers).status_code == 200
        assert slots.held(user_id) == 0  # the finished answer gave its slot back
    with Session(app.state.db) as session:  # the refused request stored nothing
        assert len(session.exec(select(Message).where(Message.role == "assistant")).all()) == 2


def test_several_answers_at_once_take_a_slot_each(tmp_path):
    app = create_app(make_settings(tmp_path, max_concurrent_generations=2))
    with TestClient(app, client=ALICE) as client:
        headers, user_id = new_key(app, "alice")
        assert client.post("/v1/chat/completions", json={**CHAT, "n": 2}, headers=headers).status_code == 200
        too_many = client.post("/v1/chat/completions", json={**CHAT, "n": 3}, headers=headers)
        assert too_many.status_code == 400 and "ask for fewer" in too_many.json()["error"]["message"]
        with app.state.generation_slots.hold(user_id):  # a comparison needs two
            assert_429(client.post("/api/comparisons", json=CHAT, headers=headers), "at most 2 at once")
        assert client.post("/api/comparisons", json=CHAT, headers=headers).status_code == 200
        assert app.state.generation_slots.held(user_id) == 0
    with Session(app.state.db) as session:
        assert len(session.exec(select(Comparison)).all()) == 1


def test_page_answers_hold_a_slot_while_they_stream(tmp_path):
    app = create_app(make_settings(tmp_path, max_concurrent_generations=1))
    slots = app.state.generation_slots
    with TestClient(app, client=ALICE) as client:
        htmx = {"HX-Request": "true", "X-CSRF-Token": csrf(client)}
        assert client.post("/c", data={"content": "hi"}, headers=htmx).status_code == 204
        with Session(app.state.db) as session:
            answer = session.exec(select(Message).where(Message.role == "assistant")).one()
        with slots.hold(_owner(app, answer)):
            refused = client.get(f"/answers/{answer.id}/stream", headers=htmx)
            assert refused.status_code == 429 and "being generated" in refused.text
            # and no new turn is accepted while every slot is busy
            assert client.post("/c", data={"content": "more"}, headers=htmx).status_code == 429
        streamed = client.get(f"/answers/{answer.id}/stream")
        assert streamed.status_code == 200 and "event: done" in streamed.text
        with Session(app.state.db) as session:
            assert session.get(Message, answer.id).status == "complete"
        assert slots.held(_owner(app, answer)) == 0


def _owner(app, message: Message) -> int:
    with Session(app.state.db) as session:
        return session.get(Conversation, message.conversation_id).user_id


def test_an_engine_failure_gives_the_slot_back(tmp_path):
    app = create_app(make_settings(tmp_path, max_concurrent_generations=1))

    async def failing(*args, **kwargs):
        raise EngineUnavailable("the engine died")
        yield  # pragma: no cover - makes this an async generator

    with TestClient(app, client=ALICE) as client:
        headers, user_id = new_key(app, "alice")
        app.state.engine.generate = failing
        assert client.post("/v1/chat/completions", json=CHAT, headers=headers).status_code == 503
        assert app.state.generation_slots.held(user_id) == 0


@pytest.fixture
def slow_server(tmp_path):
    loop = EngineThread().start()
    engine = FakeChatEngine(delay=0.05)
    loop.run(engine.start())
    server = start_live_server(make_settings(tmp_path, max_concurrent_generations=1), engine, loop)
    yield server
    server.stop()
    loop.stop()


def _held_becomes(slots, user_id: int, count: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while slots.held(user_id) != count:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_the_slot_is_held_while_generating_and_freed_when_the_client_goes_away(slow_server):
    """A 200-token answer at 20 tokens/s takes 10 s: the slot is taken for as long
    as it streams, and given back as soon as the listener disconnects."""
    app = slow_server.app
    slots = app.state.generation_slots
    with session_scope(app.state.db) as session:
        row, key = create_api_key(session, "streamer")
        user_id = row.user_id
    headers = {"Authorization": f"Bearer {key}"}
    body = {**CHAT, "max_tokens": 200, "stream": True}
    url = slow_server.base_url + "/v1/chat/completions"
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", url, json=body, headers=headers) as response:
            assert response.status_code == 200
            next(response.iter_lines())  # the answer has begun
            assert slots.held(user_id) == 1
            second = client.post(url, json=body, headers=headers)
            assert second.status_code == 429 and int(second.headers["Retry-After"]) >= 1
        started = time.monotonic()
        assert _held_becomes(slots, user_id, 0), "the slot outlived the client that went away"
        assert time.monotonic() - started < 5  # long before the answer would have finished
        assert client.post(url, json={**CHAT, "stream": True}, headers=headers).status_code == 200
