"""The leaderboard page and its JSON (server/routes/admin/leaderboard.py) on a
seeded store, on SQLite and PostgreSQL: the query reads the right votes and
thumbs, the ranking and notes reach both answers, and an empty store gets a
page that says so. The statistics themselves: tests/store/test_leaderboard.py."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from store.db import session_scope
from store.leaderboard import ANCHOR_SCORE, wilson_interval
from store.tables import AdapterVersion, Comparison, Conversation, Feedback, Message, User
from tests.conftest import make_settings
from tests.support.html import parse


@pytest.fixture
def app(tmp_path, database_url):
    return create_app(make_settings(tmp_path, database_url=database_url, adapter_poll_seconds=3600))


@pytest.fixture
def client(app):
    with TestClient(app) as client:
        yield client


@pytest.fixture
def admin(client):
    token = client.app.state.settings.admin_token
    assert client.post("/admin/login", data={"token": token, "next": "/admin"},
                       follow_redirects=False).status_code == 303
    return client


def bearer(client) -> dict[str, str]:
    return {"Authorization": f"Bearer {client.app.state.settings.admin_token}"}


# (A's version, B's version, winner), in the order they were decided
VOTES = (
    [("v2", "base", "a"), ("base", "v2", "b")] * 4 + [("v2", "base", "b")]  # v2 beats base 8 of 9
    + [("v1", "base", "a"), ("base", "v1", "b"), ("v1", "base", "a"), ("base", "v1", "b"),
       ("v1", "base", "b"), ("base", "v1", "tie")]  # v1 beats base 4 of 6, one tie
    + [("v2", "v1", "a"), ("v1", "v2", "b"), ("v2", "v1", "a"), ("v1", "v2", "both_bad")]  # v2 over v1
    + [("v3", "v3", "a"), ("v3", "v3", "b")]  # v3 only ever met itself
)


def seed(db) -> None:
    """The votes above; an open comparison (base vs v3) and a caller-written
    answer that must not count; thumbs: v2 3 up 1 down, base 1 up 2 down. v2 is
    active, v1 and v3 served before; v4 was rejected and never served."""
    now = datetime.now(timezone.utc).replace(microsecond=0)
    with session_scope(db) as s:
        user = User(kind="browser")
        s.add(user)
        s.flush()
        conversation = Conversation(user_id=user.id, title="Votes")
        s.add(conversation)
        s.flush()
        question = Message(conversation_id=conversation.id, role="user", content="Why is the sky blue?")
        s.add(question)
        s.flush()

        def answer(version: str, text: str = "Rayleigh scattering.") -> Message:
            row = Message(conversation_id=conversation.id, parent_id=question.id, role="assistant", content=text,
                          adapter_version=None if version == "base" else version)
            s.add(row)
            s.flush()
            return row

        for i, (left, right, winner) in enumerate(VOTES):
            when = now - timedelta(hours=len(VOTES) - i)
            s.add(Comparison(user_id=user.id, conversation_id=conversation.id, message_a_id=answer(left).id,
                             message_b_id=answer(right, "Because of scattering.").id, winner=winner,
                             created_at=when, decided_at=when))
        s.add(Comparison(user_id=user.id, conversation_id=conversation.id, message_a_id=answer("base").id,
                         message_b_id=answer("v3").id))
        s.add(Message(conversation_id=conversation.id, parent_id=question.id, role="assistant", content="x",
                      adapter_version="v9", caller_written=True))
        for version, rating in [("v2", "up"), ("v2", "up"), ("v2", "up"), ("v2", "down"),
                                ("base", "up"), ("base", "down"), ("base", "down")]:
            s.add(Feedback(message_id=answer(version).id, user_id=user.id, rating=rating))
        s.add_all([
            AdapterVersion(version=1, path="/adapters/v1", status="retired", activated_at=now - timedelta(days=2)),
            AdapterVersion(version=2, path="/adapters/v2", status="active", parent_version=1,
                           activated_at=now - timedelta(days=1)),
            AdapterVersion(version=3, path="/adapters/v3", status="rolled_back", parent_version=2,
                           activated_at=now - timedelta(hours=1)),
            AdapterVersion(version=4, path="/adapters/v4", status="rejected", parent_version=2),
        ])


def test_json_ranks_the_versions_with_intervals_thumbs_and_notes(app, client):
    seed(app.state.db)
    assert client.get("/api/admin/leaderboard").status_code == 401
    board = client.get("/api/admin/leaderboard", headers=bearer(client)).json()

    assert [v["version"] for v in board["versions"]] == ["v2", "v1", "base", "v3"]
    rows = {v["version"]: v for v in board["versions"]}
    assert [rows[v]["rank"] for v in ("v2", "v1", "base")] == [1, 2, 3] and rows["v3"]["rank"] is None
    assert board["votes"] == 19 and board["same_version_votes"] == 2
    assert board["anchor"]["version"] == "base" and rows["base"]["score"] == ANCHOR_SCORE
    assert rows["v2"]["score"] > rows["v1"]["score"] > ANCHOR_SCORE
    low, high = rows["v2"]["interval"]
    assert low <= rows["v2"]["score"] <= high
    assert (rows["v2"]["wins"], rows["v2"]["losses"], rows["v2"]["ties"], rows["v2"]["votes"]) == (11, 1, 1, 13)
    assert (rows["v1"]["wins"], rows["v1"]["losses"], rows["v1"]["ties"]) == (4, 4, 2)
    assert [v["version"] for v in board["versions"] if v["active"]] == ["v2"]

    assert rows["v2"]["thumbs"]["up"] == 3 and rows["v2"]["thumbs"]["total"] == 4
    assert rows["v2"]["thumbs"]["up_rate"] == 0.75
    expected = wilson_interval(3, 4)
    assert rows["v2"]["thumbs"]["interval"] == pytest.approx([expected.low, expected.high], abs=1e-4)
    assert rows["v1"]["thumbs"] == {"up": 0, "down": 0, "total": 0, "up_rate": None, "interval": None}

    assert rows["v3"]["score"] is None and rows["v3"]["same_version_votes"] == 2
    assert "only compared with itself" in rows["v3"]["note"]
    assert "v4" not in rows and "v9" not in rows  # never served; an API caller's text
    assert board["position"]["interval"][0] <= board["position"]["log_odds"] <= board["position"]["interval"][1]
    assert board["length"] is not None
    history = board["history"]
    assert len(history) == 12 and history[-1]["votes"] == 19
    assert history[-1]["scores"] == {v: rows[v]["score"] for v in ("base", "v1", "v2")}


def test_page_shows_the_table_the_effects_and_the_chart(app, admin):
    seed(app.state.db)
    doc = parse(admin.get("/admin/leaderboard").text)
    assert doc.select_one("nav.admin-nav a[aria-current=page]").get("href") == "/admin/leaderboard"
    rows = doc.select("#leaderboard-table tbody tr")
    assert [r.get("data-version") for r in rows] == ["v2", "v1", "base", "v3"]
    assert [r.select_one("td.rank").text() for r in rows] == ["1", "2", "3", "—"]
    active = doc.select("#leaderboard-table tr.active-row")
    assert len(active) == 1 and active[0].get("data-version") == "v2"
    assert rows[2].select_one("td.score").text() == "1000"
    assert rows[2].select_one("td.score-interval").text() == "anchor"
    assert rows[0].select_one("td.up-rate").text() == "75 %" and rows[0].select_one("td.thumbs").text() == "4"
    assert "only compared with itself" in rows[3].select_one("td.note").text()
    assert rows[3].select_one("td.score").text() == "—"
    assert doc.select("#leaderboard-summary") and doc.select("#leaderboard-empty") == []
    assert {r.get("data-effect") for r in doc.select("#leaderboard-effects tr")} == {"position", "length"}
    chart = doc.select_one("figure#plot-leaderboard svg#chart-leaderboard")
    assert chart is not None
    for version in ("base", "v1", "v2"):
        assert chart.select(f"g#series-{version} path"), version
    assert not chart.select("g#series-v3")


def test_an_empty_store_says_there_are_no_votes_between_versions(app, admin):
    page = admin.get("/admin/leaderboard")
    assert page.status_code == 200
    doc = parse(page.text)
    assert "No A/B votes between different versions yet" in doc.select_one("#leaderboard-empty").text()
    assert doc.select("#plot-leaderboard") == []
    assert [r.get("data-version") for r in doc.select("#leaderboard-table tbody tr")] == ["base"]
    board = admin.get("/api/admin/leaderboard", headers=bearer(admin)).json()
    assert board["votes"] == 0 and board["position"] is None and board["history"] == []
    assert [(v["version"], v["score"], v["note"]) for v in board["versions"]] == [
        ("base", None, "no A/B votes against another version yet")]
