"""``GET /metrics``: Prometheus text with requests, tokens, time to first token,
feedback events, pairs, runs by outcome and the active adapter (fake engine;
tests/server/test_chat_api.py reads the same series on the real engine)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from server.app import create_app
from server.identity import create_api_key
from store.db import session_scope
from store.tables import AdapterVersion, PreferencePair, TrainingRun
from tests.conftest import make_settings


def samples(client: TestClient) -> dict[tuple[str, frozenset], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    found = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(found, name: str, **labels) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
def app(tmp_path, database_url):
    return create_app(make_settings(tmp_path, database_url=database_url))


def test_requests_tokens_and_feedback_are_counted(app):
    with session_scope(app.state.db) as session:
        _, key = create_api_key(session, "metrics")
    headers = {"Authorization": f"Bearer {key}"}
    with TestClient(app) as client:
        before = samples(client)
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True}
        with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
            assert response.status_code == 200
            message_id = int(response.headers["X-Tuneloop-Message-Id"])
            "".join(response.iter_text())
        client.post(f"/api/messages/{message_id}/feedback", json={"rating": "down"}, headers=headers)
        client.post("/api/messages/999999/feedback", json={"rating": "up"}, headers=headers)  # 404
        after = samples(client)

    route = "/v1/chat/completions"
    assert value(after, "tuneloop_http_requests_total", method="POST", route=route, status="200") == 1
    assert value(after, "tuneloop_http_requests_total", method="POST",
                 route="/api/messages/{message_id}/feedback", status="404") == 1
    assert value(after, "tuneloop_generated_tokens_total", adapter="base") == 5
    assert value(after, "tuneloop_answers_total", status="complete", adapter="base") == 1
    assert value(after, "tuneloop_time_to_first_token_seconds_count", adapter="base") == 1
    assert value(after, "tuneloop_generation_tokens_per_second_count", adapter="base") == 1
    assert value(after, "tuneloop_feedback_events_total", kind="thumbs_down") == 1
    assert value(after, "tuneloop_feedback_events_total", kind="thumbs_up") == 0  # the 404 is not an event
    assert value(after, "tuneloop_feedback", rating="down") == 1
    assert value(before, "tuneloop_feedback", rating="down") == 0
    assert value(after, "tuneloop_engine_ready") == 1
    assert value(after, "tuneloop_database_up") == 1


def test_pairs_runs_and_adapters_come_from_the_database(app):
    with session_scope(app.state.db) as session:
        run = TrainingRun(status="promoted")
        session.add(run)
        session.add(TrainingRun(status="failed"))
        session.add(TrainingRun(status="failed"))
        session.flush()
        session.add(AdapterVersion(version=3, path="/nowhere", status="active", training_run_id=run.id))
        for i, split in enumerate(["train", "train", "eval"]):
            session.add(PreferencePair(
                content_hash=f"h{i}", prompt=[{"role": "user", "content": "q"}], chosen="a", rejected="b",
                source="comparison", split=split,
            ))
    # no lifespan (no `with`): the adapter watcher must not try to load the bogus v3
    found = samples(TestClient(app))
    assert value(found, "tuneloop_training_runs", status="failed") == 2
    assert value(found, "tuneloop_training_runs", status="promoted") == 1
    assert value(found, "tuneloop_preference_pairs", split="train", source="comparison") == 2
    assert value(found, "tuneloop_preference_pairs", split="eval", source="comparison") == 1
    assert value(found, "tuneloop_adapter_versions", status="active") == 1
    assert value(found, "tuneloop_active_adapter_version") == 3
    # this server has not loaded it: it still serves the base model
    assert value(found, "tuneloop_served_adapter_version") == 0
