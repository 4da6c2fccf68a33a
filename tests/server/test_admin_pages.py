"""The admin dashboard's pages on the fake engine: sign-in, CSRF, what each
page shows for a known store (tests/support/admin_data.py), and that its
buttons change the database. Assertions use CSS selectors (tests/support/html.py)."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest
from fastapi.testclient import TestClient
from itsdangerous import TimestampSigner
from sqlmodel import Session, select

from server import admin_auth
from server.app import create_app
from server.retraining import StartedCycle
from server.routes.admin import runs as admin_runs
from store.tables import AdapterVersion, ApiKey, TrainingRun
from tests.conftest import make_settings
from tests.support.admin_data import seed
from tests.support.html import parse

TOKEN = "dev-admin-token"
PAGES = ["/admin", "/admin/feedback", "/admin/conversations", "/admin/pairs", "/admin/runs", "/admin/adapters",
         "/admin/keys", "/admin/runs/1", "/admin/adapters/v2/lineage", "/admin/conversations/1", "/admin/leaderboard"]


def dashboard_settings(tmp_path, **overrides):
    """The server follows every activation at once (``data`` seeds servable
    folders for it); the fallback poll stays out of the way."""
    return make_settings(tmp_path, adapter_poll_seconds=3600, **overrides)


@pytest.fixture
def app(tmp_path):
    return create_app(dashboard_settings(tmp_path))


@pytest.fixture
def client(app):
    with TestClient(app) as client:
        yield client


@pytest.fixture
def data(app):
    return seed(app.state.db, adapters_dir=app.state.settings.adapters_dir)


def sign_in(client, token: str = TOKEN, next_url: str = "/admin"):
    return client.post("/admin/login", data={"token": token, "next": next_url}, follow_redirects=False)


@pytest.fixture
def admin(client, data):
    """A signed-in client; ``admin.csrf`` is the session's CSRF token."""
    assert sign_in(client).status_code == 303
    client.csrf = parse(client.get("/admin/keys").text).select_one("meta[name=csrf-token]").get("content")
    return client


def db_get(app, model, *where):
    with Session(app.state.db) as session:
        return list(session.exec(select(model).where(*where)).all())


def adapter_statuses(app) -> dict[str, str]:
    return {row.name: row.status for row in db_get(app, AdapterVersion)}


# --- sign-in ------------------------------------------------------------------------


@pytest.mark.parametrize("path", PAGES)
def test_every_page_redirects_to_login_when_signed_out(client, data, path):
    response = client.get(path, follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"].startswith("/admin/login?next=%2Fadmin")
    htmx = client.get(path, headers={"HX-Request": "true"}, follow_redirects=False)
    assert htmx.status_code == 204 and htmx.headers["HX-Redirect"].startswith("/admin/login?next=")


def test_writes_without_a_session_change_nothing(app, client, data):
    before = adapter_statuses(app)
    for path in ["/admin/adapters/rollback", "/admin/adapters/v3/activate", "/admin/keys", "/admin/runs/retrain"]:
        response = client.post(path, data={"name": "x"}, follow_redirects=False)
        assert response.status_code == 303 and response.headers["location"].startswith("/admin/login")
    assert adapter_statuses(app) == before
    assert db_get(app, ApiKey) == []


def test_wrong_token_is_401_with_a_message_and_no_cookie(client):
    response = sign_in(client, "not-the-token")
    assert response.status_code == 401
    assert admin_auth.ADMIN_COOKIE not in response.headers.get("set-cookie", "")
    error = parse(response.text).select_one("p#login-error.notice.error")
    assert "not the admin token" in error.text() and "TUNELOOP_ADMIN_TOKEN" in error.text()
    empty = sign_in(client, "   ")
    assert empty.status_code == 401 and "Enter the admin token" in parse(empty.text).select_one("#login-error").text()


def test_right_token_sets_a_strict_http_only_cookie_and_goes_to_next(client):
    page = parse(client.get("/admin/login?next=/admin/runs").text)
    assert page.select_one("form[action='/admin/login'] input[name=next]").get("value") == "/admin/runs"
    response = sign_in(client, next_url="/admin/runs")
    assert response.status_code == 303 and response.headers["location"] == "/admin/runs"
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{admin_auth.ADMIN_COOKIE}=")
    for attribute in ("HttpOnly", "SameSite=Strict", "Max-Age=43200", "Path=/"):
        assert attribute in cookie
    assert "Secure" not in cookie  # development over http
    assert client.get("/admin/runs").status_code == 200
    # signed in already: the login page sends you on
    assert client.get("/admin/login?next=/admin/keys", follow_redirects=False).headers["location"] == "/admin/keys"


@pytest.mark.parametrize("target", ["https://evil.example/", "//evil.example/admin", "/admin/login", "/other"])
def test_next_never_leaves_the_dashboard(client, target):
    assert sign_in(client, next_url=target).headers["location"] == "/admin"


def test_cookie_is_secure_in_production(tmp_path):
    settings = dashboard_settings(tmp_path, env="production", admin_token="p" * 24, secret_key="s" * 32)
    with TestClient(create_app(settings), base_url="https://testserver") as client:
        response = sign_in(client, "p" * 24)
        assert response.status_code == 303 and "Secure" in response.headers["set-cookie"]


def test_tampered_expired_or_old_token_sessions_are_refused(app, client, tmp_path, monkeypatch):
    settings = app.state.settings
    good = admin_auth.sign_session(settings)
    assert admin_auth.session_id(settings, good) is not None
    assert admin_auth.session_id(settings, good[:-2] + "xx") is None
    assert admin_auth.session_id(make_settings(tmp_path, admin_token="another-token"), good) is None

    monkeypatch.setattr(TimestampSigner, "get_timestamp", lambda self: int(time.time()) - 13 * 3600)
    expired = admin_auth.sign_session(settings)
    monkeypatch.undo()
    assert admin_auth.session_id(settings, expired) is None
    client.cookies.set(admin_auth.ADMIN_COOKIE, expired)
    assert client.get("/admin/feedback", follow_redirects=False).status_code == 303


def test_sign_out_needs_csrf_and_clears_the_cookie(admin):
    assert admin.post("/admin/logout", follow_redirects=False).status_code == 403
    response = admin.post("/admin/logout", data={"csrf_token": admin.csrf}, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/admin/login"
    assert "Max-Age=0" in response.headers["set-cookie"]
    assert admin.get("/admin/feedback", follow_redirects=False).status_code == 303


# --- CSRF and the JSON admin API ----------------------------------------------------


def test_cookie_writes_without_the_csrf_token_are_refused(app, admin):
    before = adapter_statuses(app)
    assert admin.post("/admin/adapters/v3/activate").status_code == 403
    assert admin.post("/admin/adapters/v3/activate", headers={"X-CSRF-Token": "0" * 64}).status_code == 403
    assert admin.post("/admin/adapters/rollback", data={"csrf_token": "wrong"}).status_code == 403
    assert admin.post("/admin/keys", data={"name": "sneaky"}).status_code == 403
    assert adapter_statuses(app) == before and db_get(app, ApiKey) == []


def test_admin_api_accepts_the_session_cookie_with_csrf_on_writes(app, client, data):
    assert client.get("/api/admin/adapters").status_code == 401
    sign_in(client)
    csrf = parse(client.get("/admin/keys").text).select_one("meta[name=csrf-token]").get("content")
    listed = client.get("/api/admin/adapters")
    assert listed.status_code == 200 and [a["version"] for a in listed.json()] == ["v1", "v2", "v3", "v4"]
    assert client.post("/api/admin/adapters/rollback").status_code == 403
    assert adapter_statuses(app)["v2"] == "active"
    done = client.post("/api/admin/adapters/rollback", headers={"X-CSRF-Token": csrf})
    assert done.status_code == 200 and done.json() == {"active": "v1"}
    # a wrong bearer is refused even with a good cookie; the right one still works
    assert client.get("/api/admin/adapters", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/api/admin/adapters", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


# --- feedback overview ---------------------------------------------------------------


def numbers(doc) -> dict[str, str]:
    return {
        "ratings": doc.select_one("#card-ratings .big").text(),
        "up": doc.select_one("#card-up .big").text(),
        "down": doc.select_one("#card-down .big").text(),
        **{w: doc.select_one(f"#ab-outcomes tr[data-winner={w}] .count").text() for w in ("a", "b", "tie", "both_bad")},
    }


def test_feedback_overview_counts_shares_outcomes_and_days(admin):
    doc = parse(admin.get("/admin/feedback").text)
    assert numbers(doc) == {"ratings": "3", "up": "1", "down": "2", "a": "1", "b": "0", "tie": "0", "both_bad": "1"}
    assert "33%" in doc.select_one("#card-up .label").text() and "67%" in doc.select_one("#card-down .label").text()
    assert "1 open" in doc.select_one("#card-choices").text()
    yesterday = (datetime.now(timezone.utc) - timedelta(days=1)).date().isoformat()
    row = doc.select_one(f"#daily-counts tr[data-day='{yesterday}']")
    assert row.select_one(".up-count").text() == "0" and row.select_one(".down-count").text() == "2"
    assert len(doc.select("#daily-counts tbody tr")) == 30
    chart = doc.select_one("figure.plot svg#chart-feedback-daily")
    assert chart.select("g#series-up") and chart.select("g#series-down")
    assert [a.text() for a in doc.select(".tag-cloud a")] == ["vague 2", "helpful 1", "too-long 1"]
    links = {a.get("href") for a in doc.select(".downloads a")}
    assert links == {"/api/admin/export?format=feedback&file_format=jsonl",
                     "/api/admin/export?format=feedback&file_format=parquet"}


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("tag=vague", {"ratings": "2", "up": "0", "down": "2", "a": "1", "both_bad": "1"}),
        ("adapter=v2", {"ratings": "2", "up": "1", "down": "1", "a": "1", "both_bad": "0"}),
        ("adapter=base", {"ratings": "1", "up": "0", "down": "1", "a": "0", "both_bad": "1"}),
        ("adapter=2&tag=helpful", {"ratings": "1", "up": "1", "down": "0", "a": "1", "both_bad": "0"}),
        ("start={d40}&end={d40}", {"ratings": "1", "up": "1", "down": "0", "a": "0", "both_bad": "0"}),
    ],
)
def test_feedback_filters(admin, query, expected):
    d40 = (datetime.now(timezone.utc) - timedelta(days=40)).date().isoformat()
    doc = parse(admin.get("/admin/feedback?" + query.format(d40=d40)).text)
    got = numbers(doc)
    assert {k: got[k] for k in expected} == expected


def test_feedback_filters_swap_only_the_results_under_htmx(admin):
    headers = {"HX-Request": "true", "HX-Target": "feedback-results"}
    response = admin.get("/admin/feedback?tag=vague", headers=headers)
    assert response.status_code == 200 and "HX-Target" in response.headers["vary"]
    doc = parse(response.text)
    assert not doc.select("html") and not doc.select("nav.admin-nav")
    assert doc.select_one("section#feedback-results #card-down .big").text() == "2"
    full = parse(admin.get("/admin/feedback?tag=vague", headers={"HX-Request": "true", "HX-Boosted": "true"}).text)
    assert full.select("nav.admin-nav a[aria-current=page][href='/admin/feedback']")
    form = full.select_one("form.filters[hx-get='/admin/feedback'][hx-target='#feedback-results']")
    assert form.get("hx-push-url") == "true" and form.select_one("input[name=tag]").get("value") == "vague"


def test_bad_filters_say_what_to_fix(admin):
    response = admin.get("/admin/feedback?start=yesterday&adapter=latest")
    assert response.status_code == 400
    errors = [e.text() for e in parse(response.text).select("#feedback-results .notice.error")]
    assert any("YYYY-MM-DD" in e for e in errors) and any("not an adapter version" in e for e in errors)
    assert parse(response.text).select_one("#card-ratings .big").text() == "3"  # defaults still shown


# --- conversations -------------------------------------------------------------------


def test_conversations_list_answers_with_their_feedback(admin, data):
    doc = parse(admin.get("/admin/conversations").text)
    listed = [int(li.get("data-conversation-id")) for li in doc.select("li.conversation-card")]
    assert data.moon in listed and data.unrated in listed and data.old not in listed  # 40 days: out of range
    moon = doc.select_one(f"li.conversation-card[data-conversation-id='{data.moon}']")
    a2 = moon.select_one(f"li.rated-answer[data-message-id='{data.answers['a2']}']")
    assert a2.select_one(".adapter-version").text() == "base"
    assert a2.select_one(".rating.down") and [t.text() for t in a2.select(".tag")] == ["vague", "too-long"]
    assert a2.select_one(".comment").text() == "rambles"
    a1 = moon.select_one(f"li.rated-answer[data-message-id='{data.answers['a1']}']")
    assert a1.select_one(".adapter-version").text() == "v2" and a1.select_one(".rating.up")
    assert a1.select_one("a.excerpt").get("href") == f"/admin/conversations/{data.moon}#m{data.answers['a1']}"
    assert [w.text() for w in moon.select(".ab-line .winner")] == ["a", "both_bad", "open"]

    rated = parse(admin.get("/admin/conversations?rated=1").text)
    assert [int(li.get("data-conversation-id")) for li in rated.select("li.conversation-card")] == [data.moon]
    tagged = parse(admin.get("/admin/conversations?tag=helpful&adapter=base").text)
    assert tagged.select("li.conversation-card") == [] and tagged.select_one(".empty")


def test_conversation_view_is_read_only_and_shows_every_branch(admin, data):
    doc = parse(admin.get(f"/admin/conversations/{data.moon}").text)
    turns = doc.select("ol.transcript li.turn")
    ids = [int(t.get("data-message-id")) for t in turns]
    assert ids == sorted(ids) and len(ids) == 4
    off = {int(t.get("data-message-id")) for t in doc.select("li.turn.off-thread")}
    assert off == {data.answers["a2"], data.answers["a3"]}  # a1 is the shown branch
    a1 = doc.select_one(f"li#m{data.answers['a1']}")
    assert a1.select_one(".markdown strong").text() == "bright"  # answers render as Markdown
    assert a1.select_one(".feedback-line .comment").text() == "clear and short"
    assert [t.text() for t in a1.select(".ab-tag")] == ["A/B #1 answer A · chosen", "A/B #3 answer A"]
    assert all("sign-out" in form.classes for form in doc.select("form")) and not doc.select("[hx-post]")
    assert admin.get("/admin/conversations/9999").status_code == 404


# --- pairs ------------------------------------------------------------------------


def test_pairs_show_sources_split_and_runs(admin, data):
    doc = parse(admin.get("/admin/pairs").text)
    rows = {int(r.get("data-pair-id")): r for r in doc.select("#pairs-table tbody tr")}
    assert set(rows) == set(data.pairs.values())
    choice = rows[data.pairs["choice"]]
    assert "A/B #" in choice.select_one(".sources").text()
    assert choice.select_one(".split.train")
    assert [a.get("href") for a in choice.select(".runs a.run-link")] == [f"/admin/runs/{data.runs['promoted']}"]
    hrefs = [a.get("href") for a in choice.select(".sources a")]
    assert hrefs == [f"/admin/conversations/{data.moon}#m{data.answers['a1']}",
                     f"/admin/conversations/{data.moon}#m{data.answers['a3']}"]
    thumbs = rows[data.pairs["thumbs"]]
    assert f"#{data.feedback['f1']}" in thumbs.select_one(".sources").text()
    assert "eval" in thumbs.select_one(".runs").text()
    assert "none yet" in rows[data.pairs["import"]].select_one(".runs").text()
    exports = {a.get("href") for a in doc.select(".downloads a")}
    assert "/api/admin/export?format=axolotl&file_format=parquet" in exports and len(exports) == 6

    by_run = parse(admin.get(f"/admin/pairs?run={data.runs['promoted']}&split=eval").text)
    assert [int(r.get("data-pair-id")) for r in by_run.select("#pairs-table tbody tr")] == [data.pairs["thumbs"]]


# --- training runs ------------------------------------------------------------------


def test_run_page_plots_every_orpo_metric_as_inline_svg(admin, data):
    doc = parse(admin.get(f"/admin/runs/{data.runs['promoted']}").text)
    expected = {"loss": ["loss", "nll-loss"], "log-odds": ["log-odds-ratio"], "accuracy": ["rewards-accuracies"],
                "margin": ["rewards-margins"]}
    for slug, series in expected.items():
        svg = doc.select_one(f"figure#plot-{slug} > svg")
        for name in series:
            line = svg.select_one(f"g#series-{name} path")
            assert line.get("d", "").count("L") >= 4, f"{name}: expected a line through 5 steps"
    status = doc.select_one("#run-status")
    assert status.get("data-status") == "promoted" and status.get("hx-trigger") is None
    assert len(doc.select("#step-table tbody tr")) == 5
    assert doc.select_one(".facts a[href='/admin/adapters/v2/lineage']")


def test_status_widget_polls_only_while_the_run_is_going(app, admin, data):
    run_id = data.runs["running"]
    widget = parse(admin.get(f"/admin/runs/{run_id}").text).select_one("#run-status")
    assert widget.get("hx-trigger") == "every 2s" and widget.get("hx-swap") == "outerHTML"
    assert widget.get("hx-get") == f"/admin/runs/{run_id}/status?was=running"
    assert widget.select_one("[role=progressbar]").get("aria-valuenow") == "2"

    polled = admin.get(f"/admin/runs/{run_id}/status?was=running", headers={"HX-Request": "true"})
    assert parse(polled.text).select_one("#run-status").get("hx-trigger") == "every 2s"
    assert "HX-Refresh" not in polled.headers

    with Session(app.state.db) as session:
        run = session.get(TrainingRun, run_id)
        run.status, run.finished_at, run.progress = "rejected", datetime.now(timezone.utc), {"phase": "done"}
        session.add(run)
        session.commit()
    done = admin.get(f"/admin/runs/{run_id}/status?was=running", headers={"HX-Request": "true"})
    finished = parse(done.text).select_one("#run-status")
    assert finished.get("data-status") == "rejected" and finished.get("hx-trigger") is None
    assert done.headers["HX-Refresh"] == "true"  # reload once for the final charts


def test_retrain_now_while_a_run_holds_the_lease_is_409(app, client):
    data = seed(app.state.db, hold_retrain_lease=True)
    sign_in(client)
    csrf = parse(client.get("/admin/runs").text).select_one("form.retrain-form input[name=csrf_token]").get("value")
    runs_before = len(db_get(app, TrainingRun))
    response = client.post("/admin/runs/retrain", data={"csrf_token": csrf})
    assert response.status_code == 409
    notice = parse(response.text).select_one("#retrain-result .notice.error")
    assert "already in progress" in notice.text()
    assert notice.select_one("a").get("href") == f"/admin/runs/{data.runs['running']}"
    htmx = client.post("/admin/runs/retrain", headers={"HX-Request": "true", "X-CSRF-Token": csrf})
    assert htmx.status_code == 409 and parse(htmx.text).select_one("p.notice.error") and "<html" not in htmx.text
    assert len(db_get(app, TrainingRun)) == runs_before  # the refused runs were rolled back


def test_retrain_now_starts_a_cycle_and_opens_its_run(app, admin, monkeypatch):
    calls = []

    def fake_start(settings, db, trigger):
        calls.append(trigger)
        return StartedCycle(run_id=77, process=None, log_path=None)  # type: ignore[arg-type]

    monkeypatch.setattr(admin_runs, "start_cycle", fake_start)
    response = admin.post("/admin/runs/retrain", data={"csrf_token": admin.csrf}, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/admin/runs/77"
    htmx = admin.post("/admin/runs/retrain", headers={"HX-Request": "true", "X-CSRF-Token": admin.csrf})
    assert htmx.status_code == 204 and htmx.headers["HX-Redirect"] == "/admin/runs/77"
    assert calls == ["manual", "manual"]


# --- adapters ------------------------------------------------------------------------


def test_adapter_table_shows_evaluation_gate_and_actions(admin):
    doc = parse(admin.get("/admin/adapters").text)
    rows = {r.get("data-version"): r for r in doc.select("#adapters-table tbody tr")}
    assert list(rows) == ["v4", "v3", "v2", "v1"]
    assert {v: r.get("data-status") for v, r in rows.items()} == {
        "v4": "failed", "v3": "rejected", "v2": "active", "v1": "retired"}
    v3 = rows["v3"]
    cells = [td.text() for td in v3.select("td.num")]
    assert cells[0].startswith("0.750") and "vs 0.500" in cells[0] and cells[2].startswith("2.101")
    assert v3.select_one(".gate .status-rejected") and "sanity NLL rose" in v3.select_one(".reasons").text()
    assert rows["v2"].select_one(".gate .status-promoted")
    # activate: every version but the active and the failed one; it asks first
    forms = {v: r.select(".actions form") for v, r in rows.items()}
    assert [v for v, f in forms.items() if f] == ["v3", "v1"]
    form = forms["v3"][0]
    assert form.get("hx-post") == "/admin/adapters/v3/activate"
    assert form.get("hx-confirm", "").startswith("Activate v3?")
    assert form.get("method") == "get" and form.get("action") == "/admin/adapters/v3/activate"  # no-JS confirm page
    rollback = doc.select_one(".serving form[hx-post='/admin/adapters/rollback']")
    assert "v1" in rollback.get("hx-confirm") and rollback.get("action") == "/admin/adapters/rollback"
    assert doc.select_one("#serving-now").text() == "v2"
    assert rows["v2"].select_one("a[href='/admin/adapters/v2/lineage']").text() == "1 pair"


def test_activate_through_the_confirmation_page_changes_the_db(app, admin):
    confirm = parse(admin.get("/admin/adapters/v3/activate").text)
    form = confirm.select_one("form.confirm-form[method=post][action='/admin/adapters/v3/activate']")
    csrf = form.select_one("input[name=csrf_token]").get("value")
    assert "replacing v2" in confirm.select_one(".confirm-card").text()
    response = admin.post("/admin/adapters/v3/activate", data={"csrf_token": csrf})
    assert response.status_code == 200 and str(response.url).endswith("/admin/adapters?activated=v3")
    assert adapter_statuses(app) == {"v1": "retired", "v2": "retired", "v3": "active", "v4": "failed"}
    doc = parse(response.text)
    assert "v3 is now active" in doc.select_one(".notice.ok").text() and doc.select_one("#serving-now").text() == "v3"


def test_rollback_with_htmx_swaps_the_table_and_changes_the_db(app, admin):
    response = admin.post("/admin/adapters/rollback", headers={"HX-Request": "true", "X-CSRF-Token": admin.csrf})
    assert response.status_code == 200
    doc = parse(response.text)
    assert doc.select_one("section#adapters") and not doc.select("html")
    assert doc.select_one("#serving-now").text() == "v1" and "Rolled back" in doc.select_one(".notice.ok").text()
    assert adapter_statuses(app)["v2"] == "rolled_back" and adapter_statuses(app)["v1"] == "active"
    # again: v1 has nothing before it, so the base model serves
    admin.post("/admin/adapters/rollback", headers={"HX-Request": "true", "X-CSRF-Token": admin.csrf})
    assert "active" not in adapter_statuses(app).values()
    third = admin.post("/admin/adapters/rollback", headers={"HX-Request": "true", "X-CSRF-Token": admin.csrf})
    assert third.status_code == 409 and "nothing to roll back" in parse(third.text).select_one(".notice.error").text()


def test_base_is_a_version_the_dashboard_can_activate(app, admin):
    """``base`` reads as it does in the API and the CLI (store.registry.parse_version)."""
    confirm = parse(admin.get("/admin/adapters/base/activate").text)
    form = confirm.select_one("form.confirm-form[method=post][action='/admin/adapters/base/activate']")
    text = confirm.select_one(".confirm-card").text()
    assert "base model" in text and "replacing v2" in text
    csrf = form.select_one("input[name=csrf_token]").get("value")
    response = admin.post("/admin/adapters/base/activate", data={"csrf_token": csrf})
    assert response.status_code == 200 and str(response.url).endswith("/admin/adapters?activated=base")
    assert "active" not in adapter_statuses(app).values()
    assert "base is now active" in parse(response.text).select_one(".notice.ok").text()
    assert admin.get("/admin/adapters/latest/activate").status_code == 400


def test_failed_or_unknown_versions_are_refused_with_a_reason(app, admin):
    failed = admin.post("/admin/adapters/v4/activate", headers={"HX-Request": "true", "X-CSRF-Token": admin.csrf})
    assert failed.status_code == 409 and "cannot be activated" in parse(failed.text).select_one(".notice.error").text()
    unknown = admin.post("/admin/adapters/v99/activate", data={"csrf_token": admin.csrf})
    assert unknown.status_code == 404 and "there is no adapter v99" in parse(unknown.text).select_one(".notice").text()
    assert admin.post("/admin/adapters/latest/activate", data={"csrf_token": admin.csrf}).status_code == 400
    assert adapter_statuses(app)["v2"] == "active"


def test_lineage_page_lists_chain_evaluation_pairs_and_single_thumbs(admin, data):
    doc = parse(admin.get("/admin/adapters/v2/lineage").text)
    assert [c.text() for c in doc.select("#chain .chain-item")] == ["v2", "v1", "base"]
    roles = {int(r.get("data-pair-id")): r.select("td")[1].text() for r in doc.select("#lineage-pairs tbody tr")}
    assert roles == {data.pairs["choice"]: "new", data.pairs["thumbs"]: "eval"}
    assert doc.select_one("table.evaluation")
    gain = doc.select_one("p.gain").text()  # the interval, not only the two point estimates
    assert "+0.309" in gain and "95 % interval" in gain and "[+0.121, +0.498]" in gain and "7 of 8" in gain
    (thumb,) = doc.select("#lineage-thumbs tbody tr")
    assert int(thumb.get("data-feedback-id")) == data.feedback["f3"] and thumb.select("td")[1].text() == "new"


# --- API keys -----------------------------------------------------------------------


def test_api_key_is_shown_once_works_and_can_be_revoked(app, admin):
    created = admin.post("/admin/keys", data={"name": "mobile-app", "csrf_token": admin.csrf})
    assert created.status_code == 201 and created.headers["cache-control"] == "no-store"
    key = parse(created.text).select_one("#new-key input#new-key-value").get("value")
    assert key.startswith("tl-")
    assert admin.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    listing = admin.get("/admin/keys").text
    assert key not in listing
    row = parse(listing).select_one("#keys-table tbody tr[data-revoked=false]")
    assert row.select("td")[0].text() == "mobile-app" and row.select_one("code").text() == key[:10] + "…"
    key_id = int(row.get("data-key-id"))
    form = row.select_one("form[hx-post]")
    assert form.get("hx-post") == f"/admin/keys/{key_id}/revoke" and "Revoke key" in form.get("hx-confirm")

    confirm = parse(admin.get(f"/admin/keys/{key_id}/revoke").text)
    assert confirm.select_one(f"form.confirm-form[action='/admin/keys/{key_id}/revoke']")
    revoked = admin.post(f"/admin/keys/{key_id}/revoke", headers={"HX-Request": "true", "X-CSRF-Token": admin.csrf})
    assert revoked.status_code == 200
    assert parse(revoked.text).select_one(f"#keys-table tr[data-key-id='{key_id}']").get("data-revoked") == "true"
    assert db_get(app, ApiKey, ApiKey.id == key_id)[0].revoked_at is not None
    assert admin.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    again = admin.post(f"/admin/keys/{key_id}/revoke", data={"csrf_token": admin.csrf})
    assert again.status_code == 409


def test_api_key_needs_a_name(app, admin):
    response = admin.post("/admin/keys", data={"name": "  ", "csrf_token": admin.csrf})
    assert response.status_code == 400
    assert "Give the key a name" in parse(response.text).select_one(".notice.error").text()
    assert db_get(app, ApiKey) == []


def test_dataset_downloads_work_with_the_session_cookie(admin):
    pairs = admin.get("/api/admin/export?format=trl&file_format=jsonl")
    assert pairs.status_code == 200 and pairs.content.strip()
    feedback = admin.get("/api/admin/export?format=feedback&file_format=jsonl")
    assert feedback.status_code == 200 and b"rambles" in feedback.content


def test_pair_and_conversation_filters_answer_htmx_with_their_fragment(admin, data):
    htmx = {"HX-Request": "true", "HX-Target": "pair-results"}
    pairs = parse(admin.get("/admin/pairs?split=eval", headers=htmx).text)
    assert not pairs.select("nav.admin-nav")
    assert [int(r.get("data-pair-id")) for r in pairs.select("section#pair-results tr[data-pair-id]")] == [
        data.pairs["thumbs"]]
    conversations = parse(admin.get(
        "/admin/conversations?tag=vague", headers={"HX-Request": "true", "HX-Target": "conversation-results"}).text)
    assert not conversations.select("nav.admin-nav")
    cards = conversations.select("section#conversation-results li.conversation-card")
    assert [int(c.get("data-conversation-id")) for c in cards] == [data.moon]


def test_long_runs_get_a_moving_average_over_the_noisy_steps():
    from server.plots import ORPO_CHARTS, moving_average, step_chart

    assert moving_average([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 3) == [1.0, 1.5, 2.0, 3.0, 4.0, 5.0]
    loss = next(chart for chart in ORPO_CHARTS if "loss" in chart.keys)
    few = str(step_chart(loss, [{"step": i, "loss": 2.0 - i / 10} for i in range(1, 6)]))
    many = str(step_chart(loss, [{"step": i, "loss": 2.0 + (-1) ** i} for i in range(1, 41)]))
    assert 'id="trend-loss"' not in few and 'id="series-loss"' in few
    assert 'id="trend-loss"' in many and "moving average" in many
