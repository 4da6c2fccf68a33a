"""The run page shows the candidate's and the active version's temperature-0
answers side by side (written by trainer/side_by_side.py into the run's
metrics), next to the gate's numbers; the run's JSON carries them too."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from store.db import session_scope
from store.tables import TrainingRun
from tests.conftest import make_settings
from tests.support.admin_data import seed
from tests.support.html import parse

TOKEN = "dev-admin-token"
SHOWN = [
    {"prompt": [{"role": "user", "content": "What is 12 + 30?"}], "active": "12 + 30 = 32",
     "candidate": "42. <script>alert(1)</script>", "same": False},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Norway?"}],
     "active": "Oslo.", "candidate": "Oslo.", "same": True},
]


@pytest.fixture
def app(tmp_path):
    return create_app(make_settings(tmp_path, adapter_poll_seconds=3600))


@pytest.fixture
def admin(app):
    runs = seed(app.state.db, adapters_dir=app.state.settings.adapters_dir).runs
    with TestClient(app) as client:
        assert client.post("/admin/login", data={"token": TOKEN, "next": "/admin"},
                           follow_redirects=False).status_code == 303
        client.runs = runs
        yield client


def store_metrics(app, run_id: int, **metrics) -> None:
    with session_scope(app.state.db) as session:
        run = session.get(TrainingRun, run_id)
        run.metrics = {**run.metrics, **metrics}
        session.add(run)


def test_the_run_page_shows_both_answers_side_by_side_next_to_the_gate(app, admin):
    run_id = admin.runs["promoted"]  # continued v1, made v2
    store_metrics(app, run_id, side_by_side=SHOWN, side_by_side_seconds=12.34)
    doc = parse(admin.get(f"/admin/runs/{run_id}").text)
    assert doc.select_one("section.decision")  # the gate's numbers, on the same page
    section = doc.select_one("section#side-by-side")
    headers = [th.text().strip() for th in section.select("thead th")]
    assert headers == ["Prompt", "v1 (active)", "v2 (candidate)"]
    changed, same = section.select("#side-by-side-table tbody tr")
    assert changed.get("data-same") == "false" and same.get("data-same") == "true"
    assert changed.select_one(".sbs-answer.active").text() == "12 + 30 = 32"
    assert changed.select_one(".sbs-answer.candidate").text() == "42. <script>alert(1)</script>"  # text, not markup
    assert not changed.select("script") and not changed.select(".identical")
    assert same.select_one(".identical").text() == "identical"
    assert [m.text().strip() for m in same.select(".sbs-message")] == ["system Be brief.", "user Capital of Norway?"]
    summary = section.select_one("p").text()
    assert "1 changed, 1 identical" in summary and "12.3 s" in summary

    body = admin.get(f"/api/admin/runs/{run_id}", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert body["metrics"]["side_by_side"] == SHOWN and body["metrics"]["side_by_side_seconds"] == 12.34


def test_a_failed_side_by_side_says_why_and_a_run_without_one_shows_nothing(app, admin):
    run_id = admin.runs["promoted"]
    store_metrics(app, run_id, side_by_side={"error": "FileNotFoundError: adapter v2 has no adapter_config.json"})
    doc = parse(admin.get(f"/admin/runs/{run_id}").text)
    assert "adapter v2 has no adapter_config.json" in doc.select_one("#side-by-side .side-by-side-error").text()
    assert not doc.select("#side-by-side-table")

    store_metrics(app, run_id, side_by_side=[])
    assert "No held-out prompts" in parse(admin.get(f"/admin/runs/{run_id}").text).select_one("#side-by-side").text()
    assert not parse(admin.get(f"/admin/runs/{admin.runs['running']}").text).select("#side-by-side")
