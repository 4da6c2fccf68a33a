"""The online canary and the post-promotion watch, through a live server (the
fake engine; SQLite and PostgreSQL): users judge a candidate against the
active version on blind A/B turns, and the referee promotes, rejects or rolls
back by the sequential test of ``store.sequential`` -- with nobody watching.
The real engine's side (a second version served beside the merged one) is in
tests/server/test_serve_beside.py and tests/server/test_retraining_loop.py."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from server.engine.fake import FakeChatEngine
from server.engine.loop_thread import EngineThread
from store.canary import start_canary, start_watch
from store.db import make_engine, session_scope
from store.registry import activate, get_version
from store.tables import AdapterVersion, Message
from tests.conftest import make_settings
from tests.support.adapter_folders import servable_folder
from tests.support.live import LiveServer, start_live_server

ADMIN = {"Authorization": "Bearer dev-admin-token"}
CANARY_SETTINGS = {
    "canary": True, "canary_ab_rate": 1.0, "canary_check_seconds": 0.1, "canary_min_votes": 8,
    "adapter_poll_seconds": 0.5, "watch_answers": 0,
}


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(0.05)
    return value


@dataclass
class App:
    server: LiveServer
    writer: Engine  # another process's pool: the trainer's, the CLI's

    @property
    def url(self) -> str:
        return self.server.base_url

    def change(self, what: Callable[[Session], object]) -> None:
        with session_scope(self.writer) as session:
            what(session)

    def version(self, number: int) -> AdapterVersion:
        with Session(self.writer) as session:
            return get_version(session, number)

    def trials(self) -> dict:
        response = httpx.get(self.url + "/api/admin/canary", headers=ADMIN)
        assert response.status_code == 200, response.text
        return response.json()

    def beside(self) -> str | None:
        beside = httpx.get(self.url + "/healthz").json()["beside"]
        return beside["adapter"] if beside else None

    def serving(self) -> str | None:
        return httpx.get(self.url + "/healthz").json()["adapter"]


@pytest.fixture
def app(tmp_path, database_url) -> Iterator[Callable[..., App]]:
    """``app(**settings)``: a live server on the fake engine with v1..v3 trained
    and judged by no one yet (status ``retired``), the canary switched on."""
    loop_thread = EngineThread(name="canary-test-loop").start()
    started: list[App] = []

    def start(**overrides) -> App:
        engine = FakeChatEngine()
        loop_thread.run(engine.start())
        values = {"database_url": database_url, **CANARY_SETTINGS, **overrides}
        this = App(start_live_server(make_settings(tmp_path / "app", **values), engine, loop_thread),
                   make_engine(database_url))
        started.append(this)
        with session_scope(this.writer) as session:
            for v in (1, 2, 3):
                folder = servable_folder(tmp_path / "adapters" / f"v{v}")
                session.add(AdapterVersion(version=v, path=str(folder), status="retired"))
        return this

    yield start
    for this in started:
        this.server.stop()
        this.writer.dispose()
    loop_thread.stop()


def make_canary(app: App, version: int, against: str = "base") -> None:
    app.change(lambda s: start_canary(s, get_version(s, version), against))
    wait_for(lambda: app.beside() == f"v{version}", 10, f"v{version} served beside the active version")


def canary_turn(app: App, headers: dict[str, str], prefer: str | None) -> dict | None:
    """One explicit canary A/B turn; the user picks the side whose answer came
    from ``prefer`` (a version name, or "base"), or "tie" when None. None when
    no canary is served any more (the referee decided since the last vote)."""
    response = httpx.post(app.url + "/api/comparisons", headers=headers, timeout=30, json={
        "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 4, "canary": True})
    if response.status_code == 409:
        return None
    assert response.status_code == 200, response.text
    turn = response.json()
    versions = {side: turn[side]["adapter"] or "base" for side in ("a", "b")}
    winner = "tie" if prefer is None else next(side for side, version in versions.items() if version == prefer)
    chosen = httpx.post(f"{app.url}/api/comparisons/{turn['id']}/choice", headers=headers,
                        json={"winner": winner})
    assert chosen.status_code == 200, chosen.text
    return versions


def test_a_canary_users_prefer_is_promoted_and_one_they_dislike_is_rejected(app):
    server = app()
    users = [server.server.headers(f"user{i}") for i in range(4)]
    make_canary(server, 1)

    sides = set()
    for i in range(40):
        versions = canary_turn(server, users[i % 4], prefer="v1")
        if versions is None or len(set(versions.values())) == 1:
            break  # decided (a turn claimed across the promotion is v1 on both sides: it counts for none)
        assert sorted(versions.values()) == ["base", "v1"]  # one side each, every time
        sides.add(versions["a"])
    assert sides == {"base", "v1"} or len(sides) == 1 and i < 12  # sides at random (too few turns to insist)
    wait_for(lambda: server.serving() == "v1", 10, "the promotion of v1")
    promoted = server.version(1)
    assert promoted.status == "active"
    decision = promoted.metrics["canary"]
    assert decision["status"] == "promoted" and decision["decided_by"] == "sequential test"
    assert decision["verdict"]["low"] > 0.5 - 0.05 and decision["verdict"]["votes"] >= 8
    assert server.trials()["canary"] is None

    # v2 against v1: users keep preferring v1 -> rejected, v1 serves on
    make_canary(server, 2, against="v1")
    for i in range(80):
        if canary_turn(server, users[i % 4], prefer="v1") is None:
            break
    wait_for(lambda: server.version(2).status == "rejected", 10, "the rejection of v2")
    rejected = server.version(2).metrics["canary"]
    assert rejected["decided_by"] == "sequential test" and rejected["verdict"]["high"] < 0.5
    assert server.serving() == "v1"
    wait_for(lambda: server.beside() is None, 10, "v2 no longer served beside")
    assert httpx.post(server.url + "/api/comparisons", headers=users[0], json={
        "messages": [{"role": "user", "content": "Hi"}], "canary": True}).status_code == 409


def test_one_user_cannot_decide_a_canary(app):
    server = app(canary_votes_per_user=5)
    make_canary(server, 1)
    one = server.server.headers("enthusiast")
    for _ in range(20):
        canary_turn(server, one, prefer="v1")
    time.sleep(0.5)  # several referee looks
    canary = server.trials()["canary"]
    assert canary["version"] == "v1" and canary["votes"] == 5 and canary["outcome"] == "continue"
    assert server.version(1).status == "canary"


def test_ties_count_as_no_preference_and_an_undecided_canary_ends_at_its_time_limit(app):
    server = app(canary_max_hours=2 / 3600)  # two seconds
    make_canary(server, 1)
    users = [server.server.headers(f"user{i}") for i in range(3)]
    for i in range(6):
        canary_turn(server, users[i % 3], prefer=None)
    canary = server.trials()["canary"]
    if canary is not None:  # not yet at the limit: the ties so far
        assert canary["ties"] == canary["votes"] and canary["estimate"] == pytest.approx(0.5)
    wait_for(lambda: server.version(1).status == "rejected", 10, "the time limit")
    decision = server.version(1).metrics["canary"]
    assert decision["decided_by"] == "time limit" and "TUNELOOP_CANARY_DEFAULT" in decision["reason"]
    assert server.serving() is None


def test_an_admin_ends_a_canary_by_hand_and_activating_another_version_ends_it(app):
    server = app(canary_min_votes=1000)
    assert httpx.post(server.url + "/api/admin/canary/promote", headers=ADMIN).status_code == 409
    assert httpx.post(server.url + "/api/admin/canary/maybe", headers=ADMIN).status_code == 409
    make_canary(server, 1)
    ended = httpx.post(server.url + "/api/admin/canary/promote", headers=ADMIN, json={"note": "looks right"})
    assert ended.status_code == 200, ended.text
    assert ended.json()["outcome"] == "promoted"
    wait_for(lambda: server.serving() == "v1", 10, "the hand promotion")
    assert server.version(1).metrics["canary"]["reason"] == "ended by an admin (promoted): looks right"

    make_canary(server, 2, against="v1")
    server.change(lambda s: activate(s, 3))  # someone activates another version meanwhile
    wait_for(lambda: server.version(2).status == "rejected", 10, "the canary judged against another version")
    assert "active version changed" in server.version(2).metrics["canary"]["decided_by"]


def test_a_promotion_users_dislike_is_rolled_back_automatically_once(app):
    server = app(watch_answers=30, canary_min_votes=8)
    users = [server.server.headers(f"user{i}") for i in range(4)]

    def rate(rating: str, count: int) -> None:
        for i in range(count):
            response = httpx.post(server.url + "/v1/chat/completions", headers=users[i % 4], timeout=30,
                                  json={"messages": [{"role": "user", "content": f"Question {i}"}], "max_tokens": 4})
            assert response.status_code == 200, response.text
            message_id = response.json()["tuneloop"]["message_id"]
            assert httpx.post(f"{server.url}/api/messages/{message_id}/feedback", headers=users[i % 4],
                              json={"rating": rating}).status_code == 200

    rate("up", 24)  # the base model's baseline: liked

    def promote_watched(session: Session) -> None:
        row = activate(session, 1)
        start_watch(row, "base", server.server.app.state.settings)

    server.change(promote_watched)
    wait_for(lambda: server.serving() == "v1", 10, "v1 serving")
    assert server.trials()["watch"]["baseline_up_rate"] == 1.0
    rate("down", 24)
    wait_for(lambda: server.version(1).status == "rolled_back", 10, "the automatic rollback of v1")
    watch = server.version(1).metrics["watch"]
    assert watch["status"] == "rolled_back" and "thumbs-up rate dropped" in watch["reason"]
    assert server.serving() is None
    # once: activated again by hand, it is not watched (nor rolled back) again
    server.change(lambda s: activate(s, 1))
    wait_for(lambda: server.serving() == "v1", 10, "v1 activated by hand")
    assert server.trials()["watch"] is None
    with Session(server.writer) as session:
        answers = session.exec(select(Message).where(Message.adapter_version == "v1")).all()
    assert len(answers) >= 8


def test_a_watched_promotion_that_loses_to_the_previous_version_on_ab_turns_is_rolled_back(app):
    server = app(watch_answers=30)
    users = [server.server.headers(f"user{i}") for i in range(4)]
    server.change(lambda s: activate(s, 1))

    def promote_watched(session: Session) -> None:
        start_watch(activate(session, 2), "v1", server.server.app.state.settings)

    server.change(promote_watched)
    wait_for(lambda: server.serving() == "v2" and server.beside() == "v1", 10, "v2 serving, v1 beside it")
    assert httpx.get(server.url + "/healthz").json()["beside"]["role"] == "watch"
    for i in range(80):
        versions = canary_turn(server, users[i % 4], prefer="v1")
        if versions is None or server.serving() == "v1":
            break  # rolled back (a turn that was claimed across the rollback is v1 on both sides: it counts for none)
        assert sorted(versions.values()) == ["v1", "v2"]
    wait_for(lambda: server.serving() == "v1", 10, "the automatic rollback to v1")
    watch = server.version(2).metrics["watch"]
    assert watch["status"] == "rolled_back" and "lost to v1 on A/B turns" in watch["reason"]


def test_web_turns_during_a_canary_are_blind_ab_turns_sampled_alike(app):
    server = app()
    make_canary(server, 1)
    page = httpx.Client(base_url=server.url, follow_redirects=True)
    first = page.get("/")
    assert first.status_code == 200
    token = re.search(r'<meta name="csrf-token" content="([^"]*)"', first.text).group(1)
    sent = page.post("/c", data={"content": "Name a fruit.", "csrf_token": token})
    assert sent.status_code == 200, sent.text[:500]
    with Session(server.writer) as session:
        answers = session.exec(select(Message).where(Message.role == "assistant")).all()
    assert len(answers) == 2
    assert sorted(a.adapter_version or "base" for a in answers) == ["base", "v1"]
    assert answers[0].sampling["temperature"] == answers[1].sampling["temperature"]
    # blind: the page names no version (the fake engine's answer itself starts "[v1]")
    assert sent.text.count("[v1]") == 1 and sent.text.count("v1") == 1


def test_the_cli_shows_and_ends_a_canary(tmp_path, monkeypatch, capsys):
    from server.cli import main
    from store.db import upgrade

    monkeypatch.setenv("TUNELOOP_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("TUNELOOP_DATABASE_URL", raising=False)
    (tmp_path / "data").mkdir()
    url = f"sqlite:///{tmp_path / 'data' / 'tuneloop.db'}"
    upgrade(url)
    db = make_engine(url)
    assert main(["canary", "reject"]) == 1
    assert "no canary is running" in capsys.readouterr().err
    with session_scope(db) as session:
        session.add(AdapterVersion(version=1, path=str(servable_folder(tmp_path / "v1")), status="retired"))
    with session_scope(db) as session:
        start_canary(session, get_version(session, 1), "base")
    assert main(["canary", "status"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["canary"]["version"] == "v1" and shown["canary"]["votes"] == 0 and shown["watch"] is None
    assert main(["canary", "promote", "--note", "read the answers"]) == 0
    assert "canary promoted" in capsys.readouterr().out
    with Session(db) as session:
        row = get_version(session, 1)
        assert row.status == "active" and row.metrics["canary"]["decided_by"] == "admin"
    db.dispose()


def test_training_waits_while_users_judge_a_canary(tmp_path):
    from store.db import upgrade
    from store.run_lease import open_run
    from store.tables import TrainingRun
    from trainer.cycle import run_cycle

    settings = make_settings(tmp_path, canary=True)
    settings.data_dir.mkdir(parents=True)
    upgrade(settings.resolved_database_url)
    db = make_engine(settings.resolved_database_url)
    with session_scope(db) as session:
        session.add(AdapterVersion(version=1, path=str(servable_folder(tmp_path / "v1")), status="retired"))
    with session_scope(db) as session:
        start_canary(session, get_version(session, 1), "base")
    run_id = open_run(db, "schedule")
    assert run_cycle(settings, run_id) == "skipped"
    with Session(db) as session:
        run = session.get(TrainingRun, run_id)
        assert run.status == "skipped" and "v1 is a canary" in run.metrics["reason"]
        assert get_version(session, 1).status == "canary"
    assert open_run(db, "manual")  # the run gave its lease back
    db.dispose()


def test_canary_traffic_answers_single_turns_with_the_canary(app):
    server = app(canary_ab_rate=0.0, canary_traffic=1.0)
    make_canary(server, 1)
    headers = server.server.headers("user")
    response = httpx.post(server.url + "/api/comparisons", headers=headers, timeout=30, json={
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "only_if_selected": True})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["b"] is None and body["selection"]["basis"] == "canary" and body["selection"]["compare"] is False
    assert body["a"]["adapter"] == "v1" and body["a"]["content"].startswith("[v1]")
