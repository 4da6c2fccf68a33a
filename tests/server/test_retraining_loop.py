"""The retraining loop end to end on the real engine and the real trainer:
feedback through the API -> pairs -> ORPO (a few steps) -> gate -> hot-swap
with no restart -> rollback; a losing candidate; a killed training process;
two retrain requests at once; the scheduler's threshold."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time

import httpx
import pytest
from sqlmodel import Session, select

from server.scheduler import RetrainScheduler
from store.db import session_scope
from store.pairs import build_pairs
from store.tables import AdapterVersion, Message, PreferencePair, TrainingRun
from tests.support.waiting import wait_for

pytestmark = pytest.mark.engine

ADMIN = {"Authorization": "Bearer dev-admin-token"}
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
FAST_TRAINING = {
    "train_max_steps": 3, "train_batch_size": 2, "train_learning_rate": 5e-4,
    "eval_share": 0.4, "replay_fraction": 0.0,
}
QUESTIONS = [
    "Name a fruit.", "Say hello.", "Name a colour.", "What is 1 + 1?", "Name an animal.",
    "Give me a word that rhymes with cat.", "Name a planet.", "What day comes after Monday?",
    "Name a musical instrument.", "Name a country in Europe.", "What is the opposite of hot?",
    "Name a vegetable.", "Name a sport.", "What is 3 times 3?",
]




def give_feedback_until_both_splits(server, headers, eval_share_min: int = 1, train_min: int = 4) -> None:
    """Simulated user: A/B choices through the API (the shorter answer wins),
    until the pair store has held-out and training pairs."""
    with httpx.Client(base_url=server.base_url, timeout=180) as http:
        for question in QUESTIONS:
            made = http.post("/api/comparisons", headers=headers, json={
                "messages": [{"role": "user", "content": question}], "max_tokens": 24, "temperature": 1.0,
            })
            assert made.status_code == 200, made.text
            body = made.json()
            winner = "a" if len(body["a"]["content"]) <= len(body["b"]["content"]) else "b"
            assert http.post(f"/api/comparisons/{body['id']}/choice", json={"winner": winner},
                             headers=headers).status_code == 200
            with session_scope(server.app.state.db) as session:
                build_pairs(session, eval_share=server.app.state.settings.eval_share)
                splits = [p.split for p in session.exec(select(PreferencePair)).all()]
            if splits.count("eval") >= eval_share_min and splits.count("train") >= train_min:
                return
    raise AssertionError(f"feedback gave splits {splits}")


def retrain_and_wait(server, timeout: float = 600) -> dict:
    started = httpx.post(server.base_url + "/api/admin/retrain", headers=ADMIN, timeout=30)
    assert started.status_code == 202, started.text
    run_id = started.json()["run_id"]

    def finished():
        run = httpx.get(f"{server.base_url}/api/admin/runs/{run_id}", headers=ADMIN, timeout=30).json()
        return run if run["status"] not in ("queued", "running") else None

    return wait_for(finished, timeout, f"run {run_id} to finish", interval=1)


def answer(server, headers, **extra) -> httpx.Response:
    return httpx.post(server.base_url + "/v1/chat/completions", headers=headers, timeout=120,
                      json={"messages": PROMPT, "max_tokens": 24, "temperature": 0, **extra})


def judge_the_canary(server, headers, prefer: str = "v1", seed: int = 1000) -> tuple[int, str]:
    """Simulated users on explicit canary A/B turns, picking ``prefer``'s side,
    until the referee decides (a 409: none served any more). The last canary
    answer and the seed it was sampled with (the second sampling's)."""
    last = None
    with httpx.Client(base_url=server.base_url, timeout=180) as http:
        for i in range(40):
            made = http.post("/api/comparisons", headers=headers, json={
                "messages": PROMPT, "max_tokens": 24, "temperature": 0.8, "seed": seed + 2 * i, "canary": True})
            if made.status_code == 409:
                return last
            assert made.status_code == 200, made.text
            body = made.json()
            if body["a"]["adapter"] == body["b"]["adapter"] == "v1":
                return last  # claimed across the promotion: v1 on both sides, it counts for none
            assert {body["a"]["adapter"], body["b"]["adapter"]} == {"v1", None}  # one side each
            side = "a" if (body["a"]["adapter"] or "base") == prefer else "b"
            canary = "a" if body["a"]["adapter"] == "v1" else "b"
            last = (seed + 2 * i + 1, body[canary]["content"])
            assert http.post(f"/api/comparisons/{body['id']}/choice", json={"winner": side},
                             headers=headers).status_code == 200
    raise AssertionError("the canary was not decided after 40 votes")


def test_feedback_trains_a_canary_users_promote_then_swaps_and_rolls_back(live_server):
    server = live_server(**FAST_TRAINING, gate_min_margin_gain=-1e9, gate_sanity_tolerance=10.0,
                         gate_min_held_out_pairs=1,  # a few pairs in a test: the offline gate is forced
                         canary=True, canary_min_votes=8, canary_check_seconds=0.5, watch_answers=0,
                         side_by_side_prompts=1)
    headers = server.headers("user")
    before = answer(server, headers).json()
    assert before["tuneloop"]["adapter"] is None
    give_feedback_until_both_splits(server, headers)

    run = retrain_and_wait(server)
    assert run["status"] == "canary", run
    assert run["adapter_version"] == "v1" and run["parent_version"] is None
    steps = run["metrics"]["steps"]
    assert steps and {"loss", "nll_loss", "log_odds_ratio"} <= set(steps[-1])
    numbers = run["metrics"]["decision"]["numbers"]
    assert numbers and run["metrics"]["candidate"]["pairs"] >= 1
    (shown,) = run["metrics"]["side_by_side"]  # what a product team reads before the canary
    assert shown["prompt"] and shown["candidate"] and shown["active"]

    # users judge v1 against the base model on blind A/B turns (v1 served beside it: a second
    # engine with v1 merged), prefer it, and the referee's sequential test promotes it
    wait_for(lambda: (httpx.get(server.base_url + "/healthz").json()["beside"] or {}).get("adapter") == "v1",
             300, "v1 served beside the base model")
    canary_seed, canary_text = judge_the_canary(server, headers)
    run = httpx.get(f"{server.base_url}/api/admin/runs/{run['id']}", headers=ADMIN, timeout=30).json()
    assert run["status"] == "promoted" and run["metrics"]["canary"]["decided_by"] == "sequential test", run
    assert run["metrics"]["canary"]["verdict"]["low"] >= 0.45

    # the running server swaps to v1 by itself: no restart
    wait_for(lambda: httpx.get(server.base_url + "/healthz").json()["adapter"] == "v1", 60, "the swap to v1")
    after = answer(server, headers).json()
    assert after["tuneloop"]["adapter"] == "v1"
    # what v1 answered beside the base model is what it answers once it serves: the same seed, the same text
    again = answer(server, headers, temperature=0.8, seed=canary_seed).json()
    assert again["choices"][0]["message"]["content"] == canary_text
    with Session(server.app.state.db) as session:
        stored = session.get(Message, after["tuneloop"]["message_id"])
        assert stored.adapter_version == "v1"
        version = session.exec(select(AdapterVersion).where(AdapterVersion.version == 1)).one()
        assert version.status == "active" and os.path.isdir(version.path)

    lineage = httpx.get(server.base_url + "/api/admin/adapters/v1/lineage", headers=ADMIN).json()
    assert lineage["run"]["id"] == run["id"] and lineage["pairs"]
    assert all(p["comparison_id"] for p in lineage["pairs"] if p["role"] == "new")
    assert {p["role"] for p in lineage["pairs"]} >= {"new", "eval"}

    # a stream that begins before a swap finishes on the adapter it started with
    with httpx.Client(base_url=server.base_url, timeout=180) as http:
        body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 200,
                "temperature": 0.8, "stream": True}
        with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as stream:
            streaming_id = int(stream.headers["X-Tuneloop-Message-Id"])
            lines = stream.iter_lines()
            for _ in range(3):
                next(lines)
            rolled = http.post("/api/admin/adapters/rollback", headers=ADMIN)
            assert rolled.status_code == 200 and rolled.json()["active"] is None
            wait_for(lambda: httpx.get(server.base_url + "/healthz").json()["adapter"] is None, 60, "rollback")
            rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    with Session(server.app.state.db) as session:
        streamed = session.get(Message, streaming_id)
    assert streamed.status == "complete" and streamed.adapter_version == "v1"

    # rolled back: temperature 0 gives exactly the answer from before the promotion
    again = answer(server, headers).json()
    assert again["tuneloop"]["adapter"] is None
    assert again["choices"][0]["message"]["content"] == before["choices"][0]["message"]["content"]


def test_a_candidate_that_loses_the_gate_is_not_promoted(live_server):
    # impossible to beat; a few pairs in a test count as evidence so the accuracy rule is the one that refuses
    server = live_server(**FAST_TRAINING, gate_min_accuracy_gain=2.0, gate_min_held_out_pairs=1)
    headers = server.headers("user")
    give_feedback_until_both_splits(server, headers)
    run = retrain_and_wait(server)
    assert run["status"] == "rejected", run
    assert any("accuracy" in reason for reason in run["metrics"]["decision"]["reasons"])
    adapters = httpx.get(server.base_url + "/api/admin/adapters", headers=ADMIN).json()
    assert [(a["version"], a["status"]) for a in adapters] == [("v1", "rejected")]
    assert adapters[0]["metrics"]["candidate"]["preference_accuracy"] is not None
    time.sleep(2 * server.app.state.settings.adapter_poll_seconds)
    assert httpx.get(server.base_url + "/healthz").json()["adapter"] is None


def test_two_retrains_make_one_run_and_a_killed_run_fails_without_touching_serving(live_server):
    server = live_server(**{**FAST_TRAINING, "train_max_steps": 50, "train_epochs": 50})  # long enough to kill
    headers = server.headers("user")
    give_feedback_until_both_splits(server, headers)

    def retrain(_):
        return httpx.post(server.base_url + "/api/admin/retrain", headers=ADMIN, timeout=60)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        responses = list(pool.map(retrain, range(2)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [202, 409], [r.text for r in responses]
    run_id = next(r.json()["run_id"] for r in responses if r.status_code == 202)
    busy = next(r.json() for r in responses if r.status_code == 409)
    assert busy["run_id"] == run_id
    with Session(server.app.state.db) as session:
        assert len(session.exec(select(TrainingRun)).all()) == 1

    def training_pid():
        run = httpx.get(f"{server.base_url}/api/admin/runs/{run_id}", headers=ADMIN).json()
        return run["status"] == "running" and (run["progress"] or {}).get("phase") == "training" and run
    wait_for(training_pid, 300, "training to start")
    with Session(server.app.state.db) as session:
        pid = session.get(TrainingRun, run_id).pid
    os.kill(pid, signal.SIGKILL)

    def failed():
        run = httpx.get(f"{server.base_url}/api/admin/runs/{run_id}", headers=ADMIN).json()
        return run if run["status"] == "failed" else None
    run = wait_for(failed, 60, "the killed run to be marked failed")
    assert "exited with code" in run["error"]
    # serving is untouched, and the next retrain is not blocked
    assert answer(server, headers).status_code == 200
    assert httpx.get(server.base_url + "/healthz").json() == {
        "status": "ok", "engine": "vllm", "model": server.app.state.engine.model, "adapter": None,
        "beside": None}
    again = httpx.post(server.base_url + "/api/admin/retrain", headers=ADMIN, timeout=60)
    assert again.status_code == 202
    with Session(server.app.state.db) as session:
        os.kill(session.get(TrainingRun, again.json()["run_id"]).pid, signal.SIGKILL)


def test_scheduler_runs_only_with_enough_new_pairs(live_server):
    server = live_server(**FAST_TRAINING, min_new_pairs=1000, scheduler=False)
    headers = server.headers("user")
    give_feedback_until_both_splits(server, headers, eval_share_min=0, train_min=1)
    scheduler = RetrainScheduler(server.app.state.settings, server.app.state.db)
    assert scheduler.tick() is None
    with Session(server.app.state.db) as session:
        assert session.exec(select(TrainingRun)).all() == []
    scheduler.settings = server.app.state.settings.model_copy(update={"min_new_pairs": 1})
    run_id = scheduler.tick()
    assert run_id is not None
    with Session(server.app.state.db) as session:
        run = session.get(TrainingRun, run_id)
        assert run.trigger == "schedule"
        os.kill(run.pid, signal.SIGKILL)


@pytest.mark.parametrize("damage", ["nan", "corrupt"])
def test_a_damaged_adapter_is_never_served(live_server, tmp_path, damage):
    import json

    import numpy as np
    from safetensors.numpy import save_file

    server = live_server()
    folder = tmp_path / "v1"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}))
    if damage == "nan":
        save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
                   np.full((8, 576), np.nan, dtype=np.float32)}, str(folder / "adapter_model.safetensors"))
    else:
        (folder / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with session_scope(server.app.state.db) as session:
        session.add(AdapterVersion(version=1, path=str(folder), status="candidate"))
    assert httpx.post(server.base_url + "/api/admin/adapters/v1/activate", headers=ADMIN).status_code == 200

    def failed():
        with Session(server.app.state.db) as session:
            return session.exec(select(AdapterVersion).where(AdapterVersion.version == 1)).one().status == "failed"
    wait_for(failed, 60, "the damaged version to be marked failed")
    assert httpx.get(server.base_url + "/healthz").json()["adapter"] is None
    response = answer(server, server.headers())
    assert response.status_code == 200 and response.json()["tuneloop"]["adapter"] is None
    again = httpx.post(server.base_url + "/api/admin/adapters/v1/activate", headers=ADMIN)
    assert again.status_code == 409 and "failed" in again.json()["error"]["message"]
