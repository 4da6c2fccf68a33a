"""Hardening: secrets off loopback, security headers, API docs switch, odd inputs
get 4xx (SQLite and PostgreSQL), bounded lists, half-sent bodies, the trainer's
settings file."""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import time

import pytest
from fastapi.testclient import TestClient

from server import cli, retraining
from server.app import create_app
from server.engine.fake import FakeChatEngine
from server.identity import create_api_key
from store import run_process
from store.db import make_engine, session_scope, upgrade
from store.settings import Settings
from tests.conftest import REPO, make_settings
from tests.support.live import start_live_server

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'self'; form-action 'self'"
)
BEYOND_64_BITS = 2**64 + 1
BEYOND_32_BITS = 3_000_000_000  # PostgreSQL's id columns are 32-bit


def _key(app) -> dict[str, str]:
    with session_scope(app.state.db) as session:
        _, key = create_api_key(session, "prober")
    return {"Authorization": f"Bearer {key}"}


def _csrf(client: TestClient) -> str:
    return client.get("/").text.split('name="csrf-token" content="')[1].split('"')[0]


# --- 1. secrets off loopback ---------------------------------------------------


@pytest.fixture
def serve_env(tmp_path, monkeypatch):
    """``tuneloop serve`` with the app and uvicorn replaced: records what would run."""
    for name in [n for n in os.environ if n.startswith("TUNELOOP_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("TUNELOOP_DATA_DIR", str(tmp_path / "data"))
    served: list[dict] = []
    monkeypatch.setattr("server.app.create_app", lambda settings: object())
    monkeypatch.setattr("uvicorn.run", lambda app, **kwargs: served.append(kwargs))
    return served


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "tuneloop.example"])
def test_serve_refuses_default_secrets_off_loopback(serve_env, host, capsys):
    assert cli.main(["serve", "--host", host]) == 1
    err = capsys.readouterr().err.strip()
    assert serve_env == [] and "\n" not in err
    assert host in err and "TUNELOOP_ADMIN_TOKEN" in err and "TUNELOOP_SECRET_KEY" in err


def test_serve_refuses_short_secrets_from_the_environment(serve_env, monkeypatch, capsys):
    monkeypatch.setenv("TUNELOOP_HOST", "0.0.0.0")
    monkeypatch.setenv("TUNELOOP_ADMIN_TOKEN", "t" * 15)
    monkeypatch.setenv("TUNELOOP_SECRET_KEY", "s" * 40)
    assert cli.main(["serve"]) == 1
    err = capsys.readouterr().err
    assert "TUNELOOP_ADMIN_TOKEN" in err and "TUNELOOP_SECRET_KEY" not in err and serve_env == []


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.1.1", "::1", "localhost"])
def test_serve_on_loopback_keeps_development_secrets(serve_env, host):
    assert cli.main(["serve", "--host", host]) == 0
    assert serve_env[0]["host"] == host


def test_serve_off_loopback_with_long_secrets(serve_env, monkeypatch):
    monkeypatch.setenv("TUNELOOP_ADMIN_TOKEN", "t" * 16)
    monkeypatch.setenv("TUNELOOP_SECRET_KEY", "s" * 32)
    assert cli.main(["serve", "--host", "0.0.0.0"]) == 0
    assert serve_env[0]["host"] == "0.0.0.0"


def test_unsafe_secrets_is_the_one_rule(tmp_path):
    weak = make_settings(tmp_path, admin_token="t" * 15, secret_key="s" * 31)
    assert weak.unsafe_secrets("127.0.0.1") == []
    problems = weak.unsafe_secrets("10.0.0.1")
    assert len(problems) == 2 and "16" in problems[0] and "32" in problems[1]
    with pytest.raises(ValueError, match="TUNELOOP_SECRET_KEY"):
        make_settings(tmp_path, env="production", admin_token="t" * 16, secret_key="s" * 31)


# --- 2. security headers, no inline script or style ----------------------------


@pytest.fixture
def client(tmp_path):
    with TestClient(create_app(make_settings(tmp_path)), raise_server_exceptions=False) as client:
        yield client


@pytest.mark.parametrize("path", ["/", "/healthz", "/static/app.js", "/admin/login", "/api/messages/1"])
def test_every_response_has_security_headers(client, path):
    response = client.get(path)
    assert response.headers["content-security-policy"] == CSP
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "same-origin"
    assert response.headers["x-frame-options"] == "DENY"


INLINE = {
    "inline script": re.compile(r"<script(?![^>]*\bsrc=)[^>]*>", re.I),
    "style element": re.compile(r"<style\b", re.I),
    "style attribute": re.compile(r"\sstyle=", re.I),
    "event handler attribute": re.compile(r"\son[a-z]+=", re.I),
    "htmx hx-on (needs eval)": re.compile(r"\s(hx|data-hx)-on", re.I),
    "javascript: URL": re.compile(r"javascript:", re.I),
}


@pytest.mark.parametrize("template", sorted((REPO / "web/templates").rglob("*.html")), ids=lambda p: p.name)
def test_templates_hold_under_the_strict_policy(template):
    text = template.read_text()
    found = [what for what, pattern in INLINE.items() if pattern.search(text)]
    assert found == []


def test_scripts_never_insert_server_text_as_html():
    scripts = sorted((REPO / "web/static").glob("*.js"))
    assert scripts
    for script in scripts:
        text = script.read_text()
        assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write", text), script.name


def test_rendered_admin_bars_hold_under_the_strict_policy(tmp_path):
    from tests.support.admin_data import seed

    app = create_app(make_settings(tmp_path, adapter_poll_seconds=3600))
    with TestClient(app) as client:
        data = seed(app.state.db)
        form = {"token": app.state.settings.admin_token, "next": "/admin"}
        assert client.post("/admin/login", data=form, follow_redirects=False).status_code == 303
        pages = [client.get("/admin/feedback").text, client.get(f"/admin/runs/{data.runs['running']}").text]
    for page in pages:  # the share bar, the A/B outcome bars, a run's progress bar
        assert not INLINE["style attribute"].search(page) and "<rect" in page


# --- 3. API docs can be turned off ----------------------------------------------


def test_api_docs_can_be_turned_off(tmp_path):
    with TestClient(create_app(make_settings(tmp_path / "on"))) as on:
        assert on.get("/openapi.json").status_code == 200 and on.get("/docs").status_code == 200
    with TestClient(create_app(make_settings(tmp_path / "off", api_docs=False))) as off:
        for path in ("/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect"):
            assert off.get(path).status_code == 404, path


# --- 4. ids beyond the database's range, bad form values -----------------------


@pytest.fixture
def any_db_client(tmp_path, database_url):
    app = create_app(make_settings(tmp_path, database_url=database_url))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield app, client


@pytest.mark.parametrize("big", [BEYOND_64_BITS, 2**63, BEYOND_32_BITS, -BEYOND_64_BITS])
def test_ids_beyond_the_database_range_are_not_found(any_db_client, big):
    app, client = any_db_client
    api, admin = _key(app), {"Authorization": f"Bearer {app.state.settings.admin_token}"}
    token = _csrf(client)
    calls = [
        ("GET", f"/api/messages/{big}", api, None, None),
        ("POST", f"/api/messages/{big}/feedback", api, {"rating": "up"}, None),
        ("POST", f"/api/comparisons/{big}/choice", api, {"winner": "a"}, None),
        ("GET", f"/api/admin/runs/{big}", admin, None, None),
        ("GET", f"/c/{big}", {}, None, None),
        ("GET", f"/answers/{big}/stream", {}, None, None),
        ("POST", f"/c/{big}/messages", {}, None, {"content": "hi", "csrf_token": token}),
        ("POST", f"/answers/{big}/feedback", {}, None, {"rating": "up", "csrf_token": token}),
        ("POST", f"/comparisons/{big}/choice", {}, None, {"winner": "a", "csrf_token": token}),
    ]
    for action in ("stop", "regenerate", "select"):
        calls.append(("POST", f"/answers/{big}/{action}", {}, None, {"csrf_token": token}))
    for method, path, headers, body, form in calls:
        response = client.request(method, path, headers=headers, json=body, data=form, follow_redirects=False)
        assert response.status_code == 404, (path, response.text)
        error = response.json()["error"]
        assert error["code"] == 404 and str(big) in error["message"], path


def test_values_the_database_refuses_are_a_client_error(any_db_client, database_url):
    """PostgreSQL refuses a negative LIMIT and NUL characters in text; SQLite takes both."""
    app, client = any_db_client
    refused = 400 if database_url.startswith("postgresql") else 200
    admin = {"Authorization": f"Bearer {app.state.settings.admin_token}"}
    negative = client.get("/api/admin/runs?limit=-1", headers=admin)
    assert negative.status_code == refused, negative.text
    nul = client.post(
        "/v1/chat/completions", headers=_key(app), json={"messages": [{"role": "user", "content": "a\x00b"}]}
    )
    assert nul.status_code == refused, nul.text
    if refused == 400:
        assert "NUL" in nul.json()["error"]["message"] and "nothing was saved" in nul.json()["error"]["message"]


def test_bad_form_values_on_pages_are_4xx(client):
    token = _csrf(client)
    made = client.post("/c", data={"content": "hi", "csrf_token": token}, follow_redirects=False)
    assert made.status_code == 303
    answer = 2  # the first conversation's answer
    cases = [
        ({"rating": "up", "tags": "x" * 41}, 422, "tags"),
        ({"rating": "up", "tags": ",".join(f"t{i}" for i in range(11))}, 422, "tags"),
        ({"rating": "meh"}, 400, "thumbs"),
        ({"rating": "up", "comment": "c" * 2001}, 422, "comment"),
    ]
    for form, status, says in cases:
        response = client.post(f"/answers/{answer}/feedback", data={**form, "csrf_token": token})
        assert response.status_code == status, (form, response.text)
        assert says in response.json()["error"]["message"]
    choice = client.post("/comparisons/1/choice", data={"winner": "x", "csrf_token": token})
    assert 400 <= choice.status_code < 500
    long = client.post("/c", data={"content": "x" * 200_000, "csrf_token": token})
    assert long.status_code in (413, 422)
    html = client.post(
        f"/answers/{answer}/feedback", data={"rating": "up", "tags": "y" * 41, "csrf_token": token},
        headers={"HX-Request": "true"},
    )
    assert html.status_code == 422 and "tags" in html.text and html.headers["content-type"].startswith("text/html")


# --- 5. list parameters are bounded ---------------------------------------------


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ({"stop": ["x" * 65]}, "stop"),
        ({"stop": "x" * 65}, "stop"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 33}]}, "content"),
    ],
)
def test_list_parameters_are_bounded(tmp_path, extra, says):
    app = create_app(make_settings(tmp_path))
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}
    with TestClient(app) as client:
        headers = _key(app)
        refused = client.post("/v1/chat/completions", json=body, headers=headers)
        assert refused.status_code == 422 and says in refused.json()["error"]["message"]
        if "messages" in extra:
            compare = client.post("/api/comparisons", json={"messages": extra["messages"]}, headers=headers)
            assert compare.status_code == 422
        fine = {"stop": ["x" * 64] * 4, "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 32}]}
        assert client.post("/v1/chat/completions", json={**body, **fine}, headers=headers).status_code == 200


def test_messages_are_bounded_by_max_turns(tmp_path):
    app = create_app(make_settings(tmp_path, max_turns=4))
    messages = ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}] * 3)[:-1]
    with TestClient(app) as client:
        response = client.post("/v1/chat/completions", json={"messages": messages}, headers=_key(app))
    assert response.status_code == 400 and "TUNELOOP_MAX_TURNS" in response.json()["error"]["message"]


# --- 6. half-sent requests -------------------------------------------------------


@pytest.fixture
def live(tmp_path, engine_loop):
    servers = []

    def start(**overrides):
        engine = FakeChatEngine(delay=overrides.pop("token_delay", 0.0))
        engine_loop.run(engine.start(), timeout=10)
        server = start_live_server(make_settings(tmp_path, **overrides), engine, engine_loop)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def _port(server) -> int:
    return int(server.base_url.rsplit(":", 1)[1])


def test_half_sent_body_is_answered_408_and_closed(live):
    server = live(body_timeout_seconds=1)
    with socket.create_connection(("127.0.0.1", _port(server)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Content-Length: 200\r\n\r\n" + b'{"messages": ['
        )
        started = time.monotonic()
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
        waited = time.monotonic() - started
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"TUNELOOP_BODY_TIMEOUT_SECONDS" in reply
    assert 0.8 < waited < 5


def test_slow_answers_outlive_the_body_timeout(live):
    """The timeout is on reading the body, not on the response: a stream that
    lasts longer than it is not cut."""
    import httpx

    server = live(body_timeout_seconds=0.5, token_delay=0.2)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "stream": True}
    with httpx.Client(base_url=server.base_url, timeout=20) as http:
        started = time.monotonic()
        response = http.post("/v1/chat/completions", json=body, headers=server.headers())
    assert response.status_code == 200 and response.text.rstrip().endswith("data: [DONE]")
    assert time.monotonic() - started > 1.0


# --- 7. the trainer's settings file ------------------------------------------------


class _ExitedProcess:
    pid = 4242

    def __init__(self, *args, **kwargs) -> None:
        settings_path = args[0][args[0].index("--settings") + 1]
        self.seen_mode = stat.S_IMODE(os.stat(settings_path).st_mode)
        self.settings_path = settings_path
        _ExitedProcess.last = self

    def wait(self, timeout=None) -> int:
        return 0

    def poll(self) -> int:
        return 0


def test_trainer_settings_file_is_private_and_removed(tmp_path, monkeypatch):
    settings = make_settings(tmp_path, database_url=f"sqlite:///{tmp_path / 's.db'}")
    upgrade(settings.resolved_database_url)
    db = make_engine(settings.resolved_database_url)
    monkeypatch.setattr(subprocess, "Popen", _ExitedProcess)
    old = os.umask(0o022)
    try:
        started = retraining.start_cycle(settings, db, "manual")
    finally:
        os.umask(old)
    process = _ExitedProcess.last
    assert process.seen_mode == 0o600
    started.watcher.join(timeout=10)
    assert not os.path.exists(process.settings_path)


def test_settings_file_holds_what_the_trainer_reads(tmp_path):
    settings = make_settings(tmp_path, database_url="postgresql+psycopg://u:pw@db/x")
    path = run_process.settings_file(settings, 7)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Settings.model_validate_json(path.read_text()).database_url == settings.database_url


# --- 8. the admin check before an upload is read --------------------------------------


def _upload_headers(server, authorization: str) -> bytes:
    return (
        "POST /api/admin/import HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-data; boundary=xx\r\n"
        f"Content-Length: 100000000\r\n{authorization}\r\n\r\n"
    ).encode()


@pytest.mark.parametrize("authorization", ["Authorization: Bearer wrong-token", "Cookie: tuneloop_admin=forged"])
def test_upload_without_admin_rights_is_refused_before_its_body(live, authorization):
    server = live()
    with socket.create_connection(("127.0.0.1", _port(server)), timeout=5) as sock:
        sock.sendall(_upload_headers(server, authorization) + b"--xx\r\n")  # and then nothing
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 401"), reply[:200]
    assert b"TUNELOOP_ADMIN_TOKEN" in reply


def test_admins_still_upload_with_token_or_session(tmp_path):
    app = create_app(make_settings(tmp_path))
    record = b'{"prompt": [{"role": "user", "content": "hi"}], "chosen": "x", "rejected": "y"}\n'
    token = app.state.settings.admin_token
    with TestClient(app) as client:
        bearer = client.post(
            "/api/admin/import", headers={"Authorization": f"Bearer {token}"}, files={"file": ("a.jsonl", record)}
        )
        assert bearer.status_code == 200 and bearer.json()["added"] == 1
        client.post("/admin/login", data={"token": token, "next": "/admin"})
        csrf = client.get("/admin/keys").text.split('name="csrf-token" content="')[1].split('"')[0]
        other = record.replace(b"hi", b"yo")
        session = client.post("/api/admin/import", headers={"X-CSRF-Token": csrf}, files={"file": ("b.jsonl", other)})
        assert session.status_code == 200 and session.json()["added"] == 1
        no_csrf = client.post("/api/admin/import", files={"file": ("c.jsonl", record)})
        assert no_csrf.status_code == 403
