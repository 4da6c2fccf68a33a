"""HTTP contract on the fake engine: errors, limits, identity, CSRF.

The same behaviours with the real engine are covered in tests/server/test_chat_api.py.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.identity import create_api_key
from store.db import session_scope
from tests.conftest import make_settings


@pytest.fixture
def app(tmp_path):
    return create_app(make_settings(tmp_path, max_message_chars=100, max_turns=6, max_request_bytes=4000))


@pytest.fixture
def client(app):
    with TestClient(app) as client:
        yield client


def new_key(app, name="alice") -> dict[str, str]:
    with session_scope(app.state.db) as session:
        _, key = create_api_key(session, name)
    return {"Authorization": f"Bearer {key}"}


def chat(client, headers, text="hello", **extra):
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": 4, **extra}
    return client.post("/v1/chat/completions", json=body, headers=headers)


def test_healthz_names_engine_model_and_adapter(client):
    body = client.get("/healthz").json()
    assert body["status"] == "ok" and body["engine"] == "fake" and body["adapter"] is None


def test_answer_is_stored_and_rateable_by_its_owner_only(app, client):
    alice, bob = new_key(app, "alice"), new_key(app, "bob")
    response = chat(client, alice)
    assert response.status_code == 200
    message_id = int(response.headers["X-Tuneloop-Message-Id"])
    assert response.json()["tuneloop"]["message_id"] == message_id
    assert client.get(f"/api/messages/{message_id}", headers=bob).status_code == 404
    rate = client.post(f"/api/messages/{message_id}/feedback", json={"rating": "up"}, headers=bob)
    assert rate.status_code == 404
    rate = client.post(f"/api/messages/{message_id}/feedback", json={"rating": "up"}, headers=alice)
    assert rate.status_code == 200
    again = client.post(
        f"/api/messages/{message_id}/feedback",
        json={"rating": "down", "comment": "too vague", "tags": ["Vague", "vague"]},
        headers=alice,
    )
    stored = client.get(f"/api/messages/{message_id}", headers=alice).json()
    assert again.status_code == 200
    assert stored["feedback"]["rating"] == "down" and stored["feedback"]["tags"] == ["vague"]


def test_comparison_choice_is_private(app, client):
    alice, bob = new_key(app, "alice"), new_key(app, "bob")
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    made = client.post("/api/comparisons", json=body, headers=alice)
    assert made.status_code == 200
    cid = made.json()["id"]
    assert client.post(f"/api/comparisons/{cid}/choice", json={"winner": "a"}, headers=bob).status_code == 404
    bad = client.post(f"/api/comparisons/{cid}/choice", json={"winner": "c"}, headers=alice)
    assert bad.status_code == 422 and "winner" in bad.json()["error"]["message"]
    assert client.post(f"/api/comparisons/{cid}/choice", json={"winner": "both_bad"}, headers=alice).status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"messages": []}, 422, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, 422, "role"),
        ({"messages": [{"role": "user", "content": "x" * 101}]}, 400, "limit is 100"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, 400, "last message"),
        ({"messages": [{"role": "user", "content": "x"}] * 7}, 400, "TUNELOOP_MAX_TURNS"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}, 400, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": -1}, 422, "temperature"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 9}, 422, "n"),
        ({"messages": [{"role": "user", "content": "x"}], "model": "gpt-9"}, 404, "gpt-9"),
    ],
)
def test_bad_chat_requests_get_a_clear_4xx(app, client, body, status, says):
    response = client.post("/v1/chat/completions", json=body, headers=new_key(app))
    assert response.status_code == status
    assert says in response.json()["error"]["message"]


def test_oversized_body_and_bad_json_and_missing_key(app, client):
    headers = new_key(app)
    as_json = {**headers, "content-type": "application/json"}
    big = client.post("/v1/chat/completions", content=b"x" * 5000, headers=as_json)
    assert big.status_code == 413 and "TUNELOOP_MAX_REQUEST_BYTES" in big.json()["error"]["message"]
    broken = client.post("/v1/chat/completions", content=b"{nope", headers=as_json)
    assert broken.status_code == 422 and "not valid JSON" in broken.json()["error"]["message"]
    anonymous = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert anonymous.status_code == 401
    wrong = client.get("/v1/models", headers={"Authorization": "Bearer tl-nope"})
    assert wrong.status_code == 401 and "unknown, revoked" in wrong.json()["error"]["message"]
    assert client.get("/api/messages/999999", headers=headers).status_code == 404
    assert client.get("/api/messages/not-a-number", headers=headers).status_code == 422


def test_browser_cookie_identity_needs_csrf_for_writes(client):
    page = client.get("/")
    assert page.status_code == 200 and "tuneloop_id" in client.cookies
    token = page.text.split('name="csrf-token" content="')[1].split('"')[0]
    refused = client.post("/c", data={"content": "hi"})
    assert refused.status_code == 403 and "CSRF" in refused.text
    made = client.post("/c", data={"content": "hi", "csrf_token": token}, follow_redirects=False)
    assert made.status_code == 303
    conversation = client.get(made.headers["location"])
    assert conversation.status_code == 200


def test_pages_are_private_to_their_browser(app, tmp_path):
    with TestClient(app) as first, TestClient(app) as second:
        token = first.get("/").text.split('name="csrf-token" content="')[1].split('"')[0]
        posted = first.post("/c", data={"content": "secret", "csrf_token": token}, follow_redirects=False)
        url = posted.headers["location"]
        second.get("/")
        assert second.get(url).status_code == 404
        assert "secret" not in second.get("/").text


def test_dataset_uploads_have_their_own_size_limit(tmp_path):
    """A dataset file may be far larger than a chat request, but not unbounded."""
    app = create_app(make_settings(tmp_path, max_request_bytes=4000, max_import_bytes=20_000))
    admin = {"Authorization": f"Bearer {app.state.settings.admin_token}"}
    record = b'{"prompt": [{"role": "user", "content": "hi"}], "chosen": "x", "rejected": "y"}\n'
    with TestClient(app) as client:
        ok_size = client.post("/api/admin/import", headers=admin, files={"file": ("pairs.jsonl", record * 100)})
        assert ok_size.status_code != 413, ok_size.text  # ~8 KB: over the chat limit, under the upload limit
        too_big = client.post("/api/admin/import", headers=admin, files={"file": ("pairs.jsonl", record * 300)})
        assert too_big.status_code == 413
        assert "TUNELOOP_MAX_IMPORT_BYTES" in too_big.json()["error"]["message"]
