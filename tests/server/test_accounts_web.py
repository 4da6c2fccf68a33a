"""Accounts on the web: who a browser is, sign-up/in/out, sessions revoked,
the admin dashboard for admin accounts, single sign-on from a trusted proxy,
and keys that act as an account (issue 11, part 1)."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func
from sqlmodel import Session, select

from server.app import create_app
from server.identity import BrowserSession, create_api_key, sign_browser_session
from store import accounts
from store.db import session_scope
from store.tables import Conversation, User
from tests.conftest import make_settings

PASSWORD = "correct horse battery"


def csrf_of(response) -> str:
    return re.search(r'<meta name="csrf-token" content="([^"]*)"', response.text).group(1)


def users(app) -> list[User]:
    with Session(app.state.db) as session:
        return list(session.exec(select(User).order_by(User.id)).all())


def make_app(tmp_path, **overrides):
    return create_app(make_settings(tmp_path, secret_key="s" * 40, **overrides))


@pytest.fixture
def app(tmp_path):
    return make_app(tmp_path)


def sign_up(client, username, password=PASSWORD):
    token = csrf_of(client.get("/signup"))
    return client.post("/signup", data={"csrf_token": token, "username": username, "password": password})


def sign_in(client, username, password=PASSWORD, next="/"):
    token = csrf_of(client.get("/login"))
    data = {"csrf_token": token, "username": username, "password": password, "next": next}
    return client.post("/login", data=data, follow_redirects=False)


def start_chat(client, text="hello"):
    token = csrf_of(client.get("/"))
    return client.post("/c", data={"csrf_token": token, "content": text}, follow_redirects=False)


def test_looking_creates_no_identity_and_the_first_write_creates_one(app):
    with TestClient(app) as client:
        for _ in range(5):
            assert TestClient(app).get("/").status_code == 200  # cookie-less visitors
        assert users(app) == []
        assert start_chat(client).status_code == 303
        assert start_chat(client, "again").status_code == 303
    rows = users(app)
    assert [u.kind for u in rows] == ["browser"]
    with Session(app.state.db) as session:
        assert session.exec(select(func.count()).select_from(Conversation)).one() == 2


def test_a_cookie_signed_with_another_secret_is_a_new_visitor(app):
    with session_scope(app.state.db) as session:
        victim = accounts.create_account(session, "victim", PASSWORD)
        victim_id = victim.id
    forged = sign_browser_session("dev-secret-change-me", BrowserSession("x" * 24, victim_id))
    with TestClient(app) as client:
        client.cookies.set("tuneloop_id", forged, domain="testserver.local")
        page = client.get("/")
        assert "victim" not in page.text and 'href="/login"' in page.text
        start_chat(client)
    with Session(app.state.db) as session:
        owners = session.exec(select(Conversation.user_id)).all()
    assert owners and victim_id not in owners


def test_first_sign_up_is_the_admin_later_ones_wait_for_approval(app):
    with TestClient(app) as first, TestClient(app) as second:
        assert sign_up(first, "founder").status_code == 200  # redirected to the dashboard
        assert first.get("/admin/users").status_code == 200
        assert "founder" in first.get("/").text
        pending = sign_up(second, "newcomer")
        assert pending.status_code == 202 and "waiting for an administrator" in pending.text
        refused = sign_in(second, "newcomer")
        assert refused.status_code == 401 and "approval" in refused.text
        admin_page = first.get("/admin/users")
        newcomer = next(u for u in users(app) if u.username == "newcomer")
        token = csrf_of(admin_page)
        approved = first.post(f"/admin/users/{newcomer.id}/status", data={"csrf_token": token, "status": "active"})
        assert approved.status_code == 200 and "newcomer is approved" in approved.text
        assert sign_in(second, "newcomer").status_code == 303
        assert "newcomer" in second.get("/").text
        # a plain user is no admin
        assert second.get("/admin/users", follow_redirects=False).status_code == 303
    roles = {u.username: (u.role, u.status) for u in users(app) if u.kind == "account"}
    assert roles == {"founder": ("admin", "active"), "newcomer": ("user", "active")}


def test_closed_sign_up_is_refused_after_the_first_account(tmp_path):
    app = make_app(tmp_path, signup="closed")
    with TestClient(app) as client:
        assert sign_up(client, "founder").status_code == 200
        client.cookies.clear()
        refused = sign_up(client, "intruder")
        assert refused.status_code == 400 and "closed" in refused.text


def test_sign_in_rotates_the_session_and_sign_out_everywhere_revokes_copies(app):
    with session_scope(app.state.db) as session:
        accounts.create_account(session, "alice", PASSWORD)
    with TestClient(app) as client, TestClient(app) as thief:
        client.get("/")
        before = client.cookies.get("tuneloop_id")
        assert sign_in(client, "alice").status_code == 303
        after = client.cookies.get("tuneloop_id")
        assert after != before
        thief.cookies.set("tuneloop_id", after)
        assert "alice" in thief.get("/").text
        token = csrf_of(client.get("/"))
        assert client.post("/logout/everywhere", data={"csrf_token": token}, follow_redirects=False).status_code == 303
        assert "alice" not in thief.get("/").text
        assert "alice" not in client.get("/").text


def test_sign_in_needs_the_pages_csrf_token(app):
    with session_scope(app.state.db) as session:
        accounts.create_account(session, "alice", PASSWORD)
    with TestClient(app) as client:
        client.get("/login")
        forged = client.post("/login", data={"username": "alice", "password": PASSWORD}, follow_redirects=False)
        assert forged.status_code == 403


def test_failed_sign_ins_are_throttled_even_with_the_right_password_afterwards(app):
    with session_scope(app.state.db) as session:
        accounts.create_account(session, "alice", PASSWORD)
    with TestClient(app) as client:
        for _ in range(10):
            assert sign_in(client, "alice", "wrong password").status_code == 401
        refused = sign_in(client, "alice")
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 0
        assert "too many failed sign-ins" in refused.text


def test_a_disabled_account_is_signed_out_and_its_keys_stop(app):
    with session_scope(app.state.db) as session:
        accounts.create_account(session, "root", PASSWORD, admin=True)
        alice = accounts.create_account(session, "alice", PASSWORD)
        _, key = create_api_key(session, "alice-laptop", alice)
        alice_id = alice.id
    headers = {"Authorization": f"Bearer {key}"}
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    with TestClient(app) as admin, TestClient(app) as client:
        sign_in(client, "alice")
        assert client.post("/v1/chat/completions", json=body, headers=headers).status_code == 200
        sign_in(admin, "root", next="/admin/users")
        token = csrf_of(admin.get("/admin/users"))
        admin.post(f"/admin/users/{alice_id}/status", data={"csrf_token": token, "status": "disabled"})
        assert "alice" not in client.get("/").text
        assert client.post("/v1/chat/completions", json=body, headers=headers).status_code == 401
    with Session(app.state.db) as session:
        owners = set(session.exec(select(Conversation.user_id)).all())
    assert owners == {alice_id}  # the key's chat was alice's


def test_anonymous_off_sends_visitors_to_sign_in(tmp_path):
    app = make_app(tmp_path, anonymous="off")
    with TestClient(app) as client:
        page = client.get("/", follow_redirects=False)
        assert page.status_code == 303 and page.headers["location"].startswith("/login")
        token = csrf_of(client.get("/login"))
        refused = client.post("/c", data={"csrf_token": token, "content": "hi"}, follow_redirects=False)
        assert refused.status_code == 401
    assert users(app) == []


def test_single_sign_on_header_is_believed_only_from_a_trusted_proxy(tmp_path):
    app = make_app(tmp_path, trusted_user_header="X-Forwarded-User", trusted_proxies="10.0.0.0/8")
    header = {"X-Forwarded-User": "carol@example.com"}
    with TestClient(app, client=("203.0.113.7", 5000)) as outsider:
        assert "carol" not in outsider.get("/", headers=header).text
        start_chat(outsider)
    assert all(u.username != "carol@example.com" for u in users(app))
    with TestClient(app, client=("10.1.2.3", 5000)) as proxied:
        assert "carol@example.com" in proxied.get("/", headers=header).text
        token = csrf_of(proxied.get("/", headers=header))
        proxied.post("/c", data={"csrf_token": token, "content": "hi"}, headers=header)
    carol = next(u for u in users(app) if u.username == "carol@example.com")
    assert carol.kind == "account" and carol.role == "user" and carol.status == "active"
    with Session(app.state.db) as session:
        carols = select(func.count()).select_from(Conversation).where(Conversation.user_id == carol.id)
        assert session.exec(carols).one() == 1


def test_admin_excludes_a_user_and_sees_what_their_feedback_reached(app):
    with session_scope(app.state.db) as session:
        accounts.create_account(session, "root", PASSWORD, admin=True)
        mallory = accounts.create_account(session, "mallory", PASSWORD)
        mallory_id = mallory.id
    with TestClient(app) as admin:
        sign_in(admin, "root")
        token = csrf_of(admin.get("/admin/users"))
        data = {"csrf_token": token, "kind": "user", "id": str(mallory_id), "excluded": "true", "back": "/admin/users"}
        done = admin.post("/admin/exclusions", data=data)
        assert done.status_code == 200 and f"user {mallory_id} is excluded" in done.text
        row = re.search(rf'<tr data-user-id="{mallory_id}"[^>]*>', done.text).group(0)
        assert 'data-excluded="true"' in row
        listed = admin.get("/api/admin/users").json()
        assert {"username": "mallory", "excluded_from_training": True}.items() <= next(
            a for a in listed["accounts"] if a["id"] == mallory_id
        ).items()
    with Session(app.state.db) as session:
        assert session.get(User, mallory_id).excluded_from_training is True
