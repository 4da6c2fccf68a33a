"""One retraining cycle end to end on a real server, as the nightly job runs it:

1. start ``tuneloop serve`` (real vLLM engine, fresh data folder);
2. simulated users make N A/B choices through the HTTP API (the shorter answer wins);
3. ``POST /api/admin/retrain`` and wait for the run;
4. swap latency: from the promotion (the adapter's ``activated_at``) to the first
   chat answer produced by the new adapter.

    .venv/bin/python bench/cycle.py [--quick] [--pairs 50]

Prints one JSON summary line last: cycle seconds, phases, pairs, gate numbers,
swap latency.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
ADMIN = {"Authorization": "Bearer dev-admin-token"}
TOPICS = [
    "a fruit", "a colour", "an animal", "a planet", "a country", "a sport", "a vegetable", "a tool",
    "a musical instrument", "a river", "a city", "a flower", "a bird", "a fish", "a metal", "a tree",
]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def start_server(data_dir: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "TUNELOOP_DATA_DIR": str(data_dir), "TUNELOOP_PORT": str(port),
           "TUNELOOP_SCHEDULER": "false", "TUNELOOP_EVAL_SHARE": "0.1",
           # this measures a cycle's time and the swap, not the gate: ~5 held-out pairs may count as evidence
           "TUNELOOP_GATE_MIN_HELD_OUT_PAIRS": "1",
           # promotion by the offline gate at once: the canary has its own bench (bench/canary.py)
           "TUNELOOP_CANARY": "false", "TUNELOOP_WATCH_ANSWERS": "0"}
    log_file = open(data_dir / "server.log", "w")  # noqa: SIM115 - the server outlives this function
    process = subprocess.Popen([str(REPO / ".venv/bin/tuneloop"), "serve"], cwd=REPO, env=env,
                               stdout=log_file, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(1)
    process.kill()
    raise SystemExit("server did not become ready")


def make_key(data_dir: Path) -> str:
    out = subprocess.run([str(REPO / ".venv/bin/tuneloop"), "keys", "create", "bench-user"], cwd=REPO,
                         env={**os.environ, "TUNELOOP_DATA_DIR": str(data_dir)}, capture_output=True, text=True,
                         check=True)
    return out.stdout.strip().splitlines()[-1]


def give_choices(base: str, key: str, count: int) -> int:
    headers = {"Authorization": f"Bearer {key}"}

    def one(i: int) -> bool:
        question = f"Name {TOPICS[i % len(TOPICS)]} and say one thing about it. ({i})"
        made = httpx.post(f"{base}/api/comparisons", headers=headers, timeout=600, json={
            "messages": [{"role": "user", "content": question}], "max_tokens": 40, "temperature": 1.0})
        body = made.json()
        if body["a"]["content"] == body["b"]["content"]:
            return False
        winner = "a" if len(body["a"]["content"]) <= len(body["b"]["content"]) else "b"
        httpx.post(f"{base}/api/comparisons/{body['id']}/choice", headers=headers, json={"winner": winner},
                   timeout=60).raise_for_status()
        return True

    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # the engine batches them
        return sum(pool.map(one, range(count)))


def parse_time(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 choices instead of 55")
    parser.add_argument("--pairs", type=int, default=None, help="A/B choices to make (default 55: ~50 train pairs)")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    count = args.pairs or (20 if args.quick else 55)
    data_dir = Path(tempfile.mkdtemp(prefix="tuneloop-cycle-"))
    base = f"http://127.0.0.1:{args.port}"
    log(f"data in {data_dir}")
    started = time.monotonic()
    server = start_server(data_dir, args.port)
    log(f"server ready in {time.monotonic() - started:.1f} s")
    try:
        key = make_key(data_dir)
        t0 = time.monotonic()
        choices = give_choices(base, key, count)
        feedback_s = time.monotonic() - t0
        log(f"{choices} A/B choices in {feedback_s:.1f} s")
        run_id = httpx.post(f"{base}/api/admin/retrain", headers=ADMIN, timeout=60).json()["run_id"]
        while True:
            run = httpx.get(f"{base}/api/admin/runs/{run_id}", headers=ADMIN, timeout=60).json()
            if run["status"] not in ("queued", "running"):
                break
            time.sleep(0.5)
        log(f"run {run_id}: {run['status']}")
        swap_ms = None
        if run["status"] == "promoted":
            adapters = httpx.get(f"{base}/api/admin/adapters", headers=ADMIN).json()
            active = next(a for a in adapters if a["status"] == "active")
            promoted_at = parse_time(active["activated_at"])
            headers = {"Authorization": f"Bearer {key}"}
            while True:
                answer = httpx.post(f"{base}/v1/chat/completions", headers=headers, timeout=120, json={
                    "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}).json()
                if answer["tuneloop"]["adapter"] == active["version"]:
                    swap_ms = (time.time() - promoted_at) * 1000
                    break
                time.sleep(0.05)
        metrics = run.get("metrics") or {}
        summary = {
            "benchmark": "cycle", "choices": choices, "feedback_seconds": round(feedback_s, 1),
            "status": run["status"],
            "cycle_seconds": round(parse_time(run["finished_at"]) - parse_time(run["started_at"]), 1),
            "pairs": metrics.get("pairs"), "train": metrics.get("train"),
            "gate": (metrics.get("decision") or {}).get("numbers"),
            "reasons": (metrics.get("decision") or {}).get("reasons"),
            "swap_latency_ms": round(swap_ms, 1) if swap_ms is not None else None,
            "note": "swap latency = adapter activated_at -> first answer produced by it (includes the 1 s DB poll)",
        }
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
