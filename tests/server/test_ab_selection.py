"""Choosing A/B turns by the model's uncertainty (server.ab_selection) on the
fake engine, whose uncertainty about a prompt a test sets: the long-run share
of A/B turns stays TUNELOOP_AB_RATE, uncertain prompts are compared more
often, and a probe that fails or is slow decides at random. Then the browser
turn and ``POST /api/comparisons`` with ``only_if_selected``.

The real engine's probe is tested in tests/server/test_vllm_engine.py."""

from __future__ import annotations

import asyncio
import math
import random
import time

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlmodel import Session, select

from server.ab_selection import AbSelector, scale_for_rate
from server.app import create_app
from server.engine.fake import FakeChatEngine
from server.engine.vllm_engine import top_logprobs_entropy
from server.identity import create_api_key
from store.db import session_scope
from store.tables import Comparison, Message
from tests.conftest import make_settings
from tests.support.html import parse

SURE, UNSURE = "What is 2 + 2?", "Tell me something surprising."


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


async def started_engine(**uncertainties: float) -> FakeChatEngine:
    engine = FakeChatEngine()
    await engine.start()
    engine.uncertainties.update(uncertainties)
    return engine


# --- the rule -------------------------------------------------------------------


def test_scale_keeps_the_mean_probability_at_the_rate_even_when_some_clip():
    values = [0.1] * 90 + [5.0] * 10  # a few very uncertain prompts: c*u clips at 1 for them
    scale = scale_for_rate(0.2, values)
    assert sum(min(1.0, scale * u) for u in values) / len(values) == pytest.approx(0.2)
    naive = 0.2 / (sum(values) / len(values))  # rate / mean u: the clipped ones lose budget
    assert sum(min(1.0, naive * u) for u in values) / len(values) < 0.19
    assert scale_for_rate(0.2, [0.0, 0.0]) is None
    assert scale_for_rate(0.9, [1.0, 0.0]) == math.inf  # only half the turns can be chosen at all


@pytest.mark.parametrize("shape", ["uniform", "heavy_tail"])
def test_the_long_run_share_of_ab_turns_is_the_rate(shape):
    rng = random.Random(7)
    draw = (lambda: rng.uniform(0.0, 3.0)) if shape == "uniform" else (lambda: rng.paretovariate(1.2) * 0.1)
    selector = AbSelector(FakeChatEngine(), 0.2, "uncertainty", rng=random.Random(1))
    decisions = [selector.decide_for(draw()) for _ in range(20_000)]
    share = sum(d.compare for d in decisions) / len(decisions)
    assert share == pytest.approx(0.2, abs=0.01)
    assert {d.basis for d in decisions} == {"uncertainty"}


def test_uncertain_prompts_are_compared_more_often_at_the_same_budget():
    async def scenario() -> dict[str, list[bool]]:
        engine = await started_engine(**{SURE: 0.3, UNSURE: 1.2})
        selector = AbSelector(engine, 0.2, "uncertainty", rng=random.Random(3))
        chosen: dict[str, list[bool]] = {SURE: [], UNSURE: []}
        prompts = [UNSURE if i % 4 == 0 else SURE for i in range(4000)]  # a quarter are uncertain
        for prompt in prompts:
            chosen[prompt].append((await selector.decide(ask(prompt))).compare)
        return chosen

    chosen = asyncio.run(scenario())
    sure, unsure = (sum(c) / len(c) for c in (chosen[SURE], chosen[UNSURE]))
    overall = (sum(chosen[SURE]) + sum(chosen[UNSURE])) / 4000
    assert overall == pytest.approx(0.2, abs=0.02)
    # mean u = 0.525: p = 0.2 * u / 0.525, i.e. 0.457 for the uncertain, 0.114 for the others
    assert unsure == pytest.approx(0.457, abs=0.05)
    assert sure == pytest.approx(0.114, abs=0.02)


def test_random_mode_and_the_edge_rates_never_probe():
    async def scenario() -> FakeChatEngine:
        engine = await started_engine()
        for rate, mode in ((0.5, "random"), (0.0, "uncertainty"), (1.0, "uncertainty")):
            decisions = [await AbSelector(engine, rate, mode).decide(ask(UNSURE)) for _ in range(50)]
            assert {d.basis for d in decisions} == {"random"}
            assert {d.compare for d in decisions} == ({False, True} if rate == 0.5 else {rate == 1.0})
        return engine

    assert asyncio.run(scenario()).probes == []


def test_a_failing_probe_falls_back_to_the_plain_rate():
    async def scenario() -> tuple[list, AbSelector]:
        engine = await started_engine()
        engine.probe_fails = True
        selector = AbSelector(engine, 0.3, "uncertainty", rng=random.Random(5))
        return [await selector.decide(ask(UNSURE)) for _ in range(2000)], selector

    decisions, selector = asyncio.run(scenario())
    assert {(d.basis, d.probability, d.uncertainty) for d in decisions} == {("fallback", 0.3, None)}
    assert sum(d.compare for d in decisions) / len(decisions) == pytest.approx(0.3, abs=0.03)
    assert not selector.recent  # a failed probe says nothing about how uncertain prompts are


def test_a_slow_probe_is_given_up_quickly_and_the_turn_decided_at_random():
    async def scenario():
        engine = await started_engine()
        engine.probe_delay = 30.0
        selector = AbSelector(engine, 0.5, "uncertainty", timeout_s=0.1)
        started = time.monotonic()
        decision = await selector.decide(ask(UNSURE))
        return decision, time.monotonic() - started

    decision, took = asyncio.run(scenario())
    assert decision.basis == "fallback" and decision.probability == 0.5
    assert took < 2.0


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="uncertainty"):
        AbSelector(FakeChatEngine(), 0.2, "smart")


def test_top_k_entropy_is_renormalised():
    assert top_logprobs_entropy([0.0]) == 0.0
    assert top_logprobs_entropy([math.log(0.1)] * 2) == pytest.approx(math.log(2))  # a top-2 of 0.1 each: 50/50
    peaked = top_logprobs_entropy([math.log(0.9), math.log(0.05), math.log(0.05)])
    assert 0 < peaked < top_logprobs_entropy([math.log(0.4), math.log(0.3), math.log(0.3)]) < math.log(3)


# --- where it is used -------------------------------------------------------------


def primed(app, uncertainties: dict[str, float]) -> FakeChatEngine:
    """The app's fake engine with these uncertainties, and a selector whose recent
    turns averaged 1.0: at rate 0.2 an uncertainty of 50 is compared for sure (it clips at p = 1), 0 never."""
    engine = app.state.engine
    engine.uncertainties.update(uncertainties)
    app.state.answers.ab_selector.recent.extend([1.0] * 200)
    return engine


def counted(client: TestClient) -> dict[tuple[str, str], float]:
    found = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "tuneloop_ab_decisions_total":
                found[(sample.labels["basis"], sample.labels["compared"])] = sample.value
    return found


def test_browser_turns_become_ab_turns_by_uncertainty(tmp_path):
    app = create_app(make_settings(tmp_path, ab_rate=0.2, ab_selection="uncertainty"))
    with TestClient(app) as client:
        engine = primed(app, {SURE: 0.0, UNSURE: 50.0})
        token = parse(client.get("/").text).select_one('meta[name="csrf-token"]').get("content")
        first = client.post("/c", data={"content": UNSURE, "csrf_token": token}, follow_redirects=False)
        conversation = first.headers["location"]
        second = client.post(f"{conversation}/messages", data={"content": SURE, "csrf_token": token},
                             follow_redirects=False)
        assert first.is_redirect and second.is_redirect
        decisions = counted(client)
    with Session(app.state.db) as session:
        (comparison,) = session.exec(select(Comparison)).all()
        answers = session.exec(select(Message).where(Message.role == "assistant")).all()
        question = session.get(Message, session.get(Message, comparison.message_a_id).parent_id)
    assert len(answers) == 3  # the uncertain turn twice, the sure one once
    assert question.content == UNSURE
    assert engine.probes == [UNSURE, SURE]  # each turn probed once, on its own question
    assert decisions == {("uncertainty", "true"): 1, ("uncertainty", "false"): 1}


def test_the_probe_sees_the_whole_conversation(tmp_path):
    app = create_app(make_settings(tmp_path, ab_rate=0.2, ab_selection="uncertainty"))
    seen: list[list[dict[str, str]]] = []
    with TestClient(app) as client:
        engine = primed(app, {})
        probe = engine.uncertainty

        async def recording(messages, adapter=None, tokens=4):
            seen.append(messages)
            return await probe(messages, adapter, tokens)

        engine.uncertainty = recording
        token = parse(client.get("/").text).select_one('meta[name="csrf-token"]').get("content")
        conversation = client.post("/c", data={"content": "first", "csrf_token": token},
                                   follow_redirects=False).headers["location"]
        client.post(f"{conversation}/messages", data={"content": "second", "csrf_token": token})
    assert [m["content"] for m in seen[1] if m["role"] == "user"] == ["first", "second"]
    assert [m["role"] for m in seen[1]] == ["user", "assistant", "user"]


@pytest.fixture
def api(tmp_path):
    app = create_app(make_settings(tmp_path, ab_rate=0.2, ab_selection="uncertainty"))
    with session_scope(app.state.db) as session:
        _, key = create_api_key(session, "alice")
    with TestClient(app) as client:
        yield app, client, {"Authorization": f"Bearer {key}"}


def test_only_if_selected_answers_once_when_the_server_passes_the_context_over(api):
    app, client, alice = api
    primed(app, {SURE: 0.0, UNSURE: 50.0})

    passed = client.post("/api/comparisons", json={"messages": ask(SURE), "max_tokens": 3, "only_if_selected": True},
                         headers=alice)
    assert passed.status_code == 200
    body = passed.json()
    assert body["id"] is None and body["b"] is None and body["a"]["content"]
    assert body["selection"] == {"compare": False, "probability": 0.0, "basis": "uncertainty", "uncertainty": 0.0,
                                 "challenger": None}
    thumb = client.post(f"/api/messages/{body['a']['message_id']}/feedback", json={"rating": "up"}, headers=alice)
    assert thumb.status_code == 200

    chosen = client.post("/api/comparisons", json={"messages": ask(UNSURE), "max_tokens": 3,
                                                   "only_if_selected": True}, headers=alice)
    body = chosen.json()
    assert chosen.status_code == 200 and body["id"] is not None and body["b"]["content"]
    assert body["selection"]["compare"] is True and body["selection"]["probability"] == 1.0
    choice = client.post(f"/api/comparisons/{body['id']}/choice", json={"winner": "a"}, headers=alice)
    assert choice.status_code == 200

    plain = client.post("/api/comparisons", json={"messages": ask(SURE), "max_tokens": 3}, headers=alice).json()
    assert plain["id"] is not None and plain["b"] is not None and "selection" not in plain  # the flag is opt-in
    with Session(app.state.db) as session:
        assert len(session.exec(select(Comparison)).all()) == 2


def test_only_if_selected_still_answers_when_the_probe_fails(api):
    app, client, alice = api
    app.state.engine.probe_fails = True
    made = [client.post("/api/comparisons", json={"messages": ask(UNSURE), "max_tokens": 2, "only_if_selected": True},
                        headers=alice) for _ in range(12)]
    assert {m.status_code for m in made} == {200}
    assert {m.json()["selection"]["basis"] for m in made} == {"fallback"}
    decisions = counted(client)
    assert decisions.get(("fallback", "false"), 0) + decisions.get(("fallback", "true"), 0) == 12


def test_only_if_selected_must_be_a_boolean(api):
    _, client, alice = api
    bad = client.post("/api/comparisons", json={"messages": ask(SURE), "only_if_selected": "maybe"}, headers=alice)
    assert bad.status_code == 422 and "only_if_selected" in bad.json()["error"]["message"]
