"""tuneloop over a fleet of vLLM OpenAI servers (``TUNELOOP_ENGINE=openai``):
serving overhead with 1 and 2 replicas, and how long a promotion takes to
reach every replica (issue 15, "Outgrow one machine").

Two ``vllm serve`` replicas are started (``tests/support/vllm_serve.py``: the
packaged model, ``--enable-lora``, run-time LoRA loading; each bound to its own
core list, ``--threads-bind``, with a small KV cache). For 1 replica, then 2,
a tuneloop app (``engine="openai"``, ``engine_urls`` = the first replica, then
both) is served by uvicorn in this process, and at each concurrency (1, 4) the
same prompts (greedy, fixed ``max_tokens``, streamed) are sent from a separate
client process

- ``direct``: to the replicas themselves, ``POST /v1/chat/completions`` on the
  base model (with 2 replicas the requests alternate between them);
- ``tuneloop``: to tuneloop's ``/v1/chat/completions`` with an API key (its
  own routing: conversation affinity, then the least busy replica);

alternating which mode goes first, repetition by repetition. Reported per
replica count and concurrency: output tokens/s (all tokens / wall time), time
to first content token p50/p95, and tuneloop/direct ratios.

Then, with 2 replicas, three promotions (v1, v2, v3: random PEFT LoRAs written
into the app's adapters folder, registered in the database as versions no
server holds yet, then ``POST /api/admin/adapters/vN/activate``, as the admin
API and ``tuneloop adapters activate`` do). From the activate call:
``admin_call_ms`` until it returned; ``replica_listed_ms`` until each replica's
``GET /v1/models`` lists ``vN``; ``first_answer_ms`` until an answer through
tuneloop (1-token probes, one after another) is recorded as ``vN``;
``healthz_ms`` until tuneloop's ``/healthz`` names it; ``all_done_ms``, the
latest of these. ``--preloaded`` registers each version as a candidate first
(as the trainer does before its gate) and waits until every replica holds it,
so the promotion is a pointer flip.

On a 2-core machine the two replicas share the same CPUs (one core each, so
each is slower than one replica on both cores), and tuneloop and the client
run beside them: the 2-replica numbers show tuneloop's overhead and that
routing and promotion work across replicas, not scaling. Compare within one
run only.

    .venv/bin/python bench/fleet.py --quick     # 32 tokens, 1 rep (~8 min on 2 cores)
    .venv/bin/python bench/fleet.py             # 64 tokens, 3 reps of 2 waves

Prints one JSON line last on stdout, also written to ``--out`` (default
``bench/results/fleet.json``; ``fleet-quick.json`` with --quick); progress and
logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (  # noqa: E402
    ADMIN_TOKEN,
    ENGINE_START_TIMEOUT_S,
    REPO,
    ClientProcess,
    _http_client,
    bench_settings,
    claim_stdout,
    log,
    machine,
    pct,
    r,
    start_loop_thread,
    start_server,
    stream_chat,
    temp_data_dir,
)
from bench.serving import PROMPTS, http_body  # noqa: E402
from bench.swap import make_adapters  # noqa: E402
from tests.support.vllm_serve import VllmServer  # noqa: E402

RESULTS = REPO / "bench" / "results"
PROMOTION_TIMEOUT_S = 300.0


def direct_body(index: int, max_tokens: int, model: str) -> dict[str, Any]:
    """The same request as :func:`bench.serving.http_body`, naming the replica's base model."""
    return http_body(index, max_tokens) | {"model": model}


# -- client jobs (run in the ClientProcess) ---------------------------------------


async def round_robin(job: dict[str, Any], conn) -> dict[str, Any]:
    """Client job: ``job["bodies"]`` with ``job["concurrency"]`` in flight
    (closed loop), request i to ``job["base_urls"][i % n]``; per-request
    records and the wall time."""
    urls = job["base_urls"]
    bodies = job["bodies"]
    concurrency = job["concurrency"]
    records: list[dict[str, Any] | None] = [None] * len(bodies)
    next_index = 0
    clients = [_http_client(url, concurrency) for url in urls]
    try:

        async def worker() -> None:
            nonlocal next_index
            while next_index < len(bodies):
                i = next_index
                next_index += 1
                records[i] = await stream_chat(clients[i % len(clients)], job["headers"], bodies[i])
                records[i]["replica"] = urls[i % len(urls)]

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    finally:
        for client in clients:
            await client.aclose()
    return {"records": records, "wall_s": wall}


async def promotion_step(job: dict[str, Any], conn) -> dict[str, Any]:
    """Client job: ``POST`` the activate call for ``job["version"]`` and time,
    from its start, until it returned, until each replica lists the version,
    until an answer through tuneloop is recorded as it, and until ``/healthz``
    names it (each polled for at most ``job["limit_s"]`` seconds)."""
    import httpx

    name = job["version"]
    limit_s = job["limit_s"]
    result: dict[str, Any] = {"version": name, "probes": 0, "probe_errors": [], "replica_listed_ms": {},
                              "first_answer_ms": None, "healthz_ms": None}
    async with _http_client(job["base_url"], 8, timeout=120) as client, httpx.AsyncClient(timeout=10) as plain:
        t0 = time.perf_counter()

        def since() -> float:
            return r((time.perf_counter() - t0) * 1000, 1)

        resp = await client.post(f"/api/admin/adapters/{name}/activate", headers=job["admin"])
        result["admin_call_ms"] = since()
        result["status"] = resp.status_code
        result["active"] = resp.json().get("active") if resp.status_code == 200 else resp.text[:300]
        if resp.status_code != 200 or result["active"] != name:
            return result
        deadline = t0 + limit_s

        async def watch_replica(url: str) -> None:
            while time.perf_counter() < deadline:
                try:
                    cards = (await plain.get(f"{url}/v1/models")).json()["data"]
                    if any(card["id"] == name for card in cards):
                        result["replica_listed_ms"][url] = since()
                        return
                except (httpx.HTTPError, ValueError, KeyError) as exc:
                    result.setdefault("replica_errors", []).append(f"{url}: {type(exc).__name__}: {exc}")
                await asyncio.sleep(0.02)

        async def watch_health() -> None:
            while time.perf_counter() < deadline:
                if (await client.get("/healthz")).json().get("adapter") == name:
                    result["healthz_ms"] = since()
                    return
                await asyncio.sleep(0.01)

        async def probe_answers() -> None:
            body = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 1, "temperature": 0}
            while time.perf_counter() < deadline:
                result["probes"] += 1
                try:
                    answer = await client.post("/v1/chat/completions", headers=job["headers"], json=body)
                    if answer.status_code == 200:
                        if answer.json()["tuneloop"]["adapter"] == name:
                            result["first_answer_ms"] = since()
                            return
                    elif len(result["probe_errors"]) < 3:
                        result["probe_errors"].append(f"HTTP {answer.status_code}: {answer.text[:200]}")
                except httpx.HTTPError as exc:
                    if len(result["probe_errors"]) < 3:
                        result["probe_errors"].append(f"{type(exc).__name__}: {exc}")
                    await asyncio.sleep(0.1)

        await asyncio.gather(*(watch_replica(url) for url in job["replica_urls"]), watch_health(), probe_answers())
    listed = result["replica_listed_ms"]
    result["all_replicas_listed_ms"] = max(listed.values()) if len(listed) == len(job["replica_urls"]) else None
    parts = [result["all_replicas_listed_ms"], result["first_answer_ms"], result["healthz_ms"]]
    result["all_done_ms"] = None if None in parts else max(parts)
    return result


# -- the parent -------------------------------------------------------------------


def mode_stats(runs: list[dict[str, Any]]) -> dict[str, Any]:
    records = [rec for run in runs for rec in run["records"]]
    ok = [rec for rec in records if rec["ok"]]
    tokens = sum(rec["completion_tokens"] or 0 for rec in ok)
    wall = sum(run["wall_s"] for run in runs)
    ttfts = [rec["ttft"] * 1000 for rec in ok if rec["ttft"] is not None]
    stats: dict[str, Any] = {
        "requests": len(records),
        "failed": len(records) - len(ok),
        "completion_tokens": tokens,
        "wall_s": r(wall, 2),
        "tok_s": r(tokens / wall if wall else 0.0, 2),
        "ttft_p50_ms": r(pct(ttfts, 50), 1),
        "ttft_p95_ms": r(pct(ttfts, 95), 1),
        "latency_p50_ms": r(pct([rec["latency"] * 1000 for rec in ok], 50), 0),
        # requests each replica finished during these runs (its /metrics): where the routing sent them
        "per_replica_requests": [sum(counts) for counts in zip(*(run["per_replica"] for run in runs), strict=True)],
    }
    errors = [rec["error"] for rec in records if not rec["ok"]]
    if errors:
        stats["errors"] = errors[:3]
    return stats


def compare(tuneloop: dict[str, Any], direct: dict[str, Any], runs_t: list, runs_d: list) -> dict[str, Any]:
    """tuneloop against the replicas called directly: throughput ratio, TTFT
    ratios and added TTFT at p50, and how many greedy answers came out the same."""
    def ratio(a: float | None, b: float | None) -> float | None:
        return r(a / b, 3) if a is not None and b else None

    pairs = zip([rec for run in runs_t for rec in run["records"]],
                [rec for run in runs_d for rec in run["records"]], strict=True)
    same = sum(1 for a, b in pairs if a["ok"] and b["ok"] and a["text"] == b["text"])
    added = None if None in (tuneloop["ttft_p50_ms"], direct["ttft_p50_ms"]) \
        else r(tuneloop["ttft_p50_ms"] - direct["ttft_p50_ms"], 1)
    return {
        "throughput_ratio": ratio(tuneloop["tok_s"], direct["tok_s"]),
        "ttft_p50_ratio": ratio(tuneloop["ttft_p50_ms"], direct["ttft_p50_ms"]),
        "ttft_p95_ratio": ratio(tuneloop["ttft_p95_ms"], direct["ttft_p95_ms"]),
        "added_ttft_p50_ms": added,
        "identical_answers": f"{same}/{tuneloop['requests']}",
    }


def replica_model(url: str) -> str:
    """The base model's name as the replica serves it (``GET /v1/models``)."""
    import httpx

    cards = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
    return next(card["id"] for card in cards if not card.get("parent"))


def finished_requests(url: str) -> float:
    """Requests the replica has finished since it started (its ``/metrics``)."""
    import re

    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text
    found = re.findall(r"^vllm:request_success_total\{[^}]*\} ([0-9.e+-]+)$", text, re.MULTILINE)
    return sum(float(value) for value in found)


def measure(client: ClientProcess, server, replica_urls: list[str], model: str, levels: list[int], reps: int,
            waves: int, max_tokens: int) -> list[dict[str, Any]]:
    """Both modes at every concurrency level, ``reps`` times, the first mode alternating."""
    headers = {"Authorization": f"Bearer {server.api_key(f'bench-fleet-{len(replica_urls)}')}"}
    log("%d replica(s): warm-up", len(replica_urls))
    warm = list(range(2 * len(replica_urls)))
    client.call("bench.fleet:round_robin", timeout=600, base_urls=replica_urls, headers={},
                bodies=[direct_body(i, 4, model) for i in warm], concurrency=2)
    client.call("bench._common:chat_round", timeout=600, base_url=server.base_url, headers=headers,
                bodies=[http_body(i, 4) for i in warm], concurrency=2)
    results = []
    for level_index, concurrency in enumerate(levels):
        runs: dict[str, list[dict[str, Any]]] = {"direct": [], "tuneloop": []}
        n = max(2, concurrency) * waves
        for rep in range(reps):
            indices = [(rep * n + i) % len(PROMPTS) for i in range(n)]
            order = ["direct", "tuneloop"] if (rep + level_index) % 2 == 0 else ["tuneloop", "direct"]
            for mode in order:
                before = [finished_requests(url) for url in replica_urls]
                if mode == "direct":
                    run = client.call("bench.fleet:round_robin", timeout=1800, base_urls=replica_urls, headers={},
                                      bodies=[direct_body(i, max_tokens, model) for i in indices],
                                      concurrency=concurrency)
                else:
                    run = client.call("bench._common:chat_round", timeout=1800, base_url=server.base_url,
                                      headers=headers, bodies=[http_body(i, max_tokens) for i in indices],
                                      concurrency=concurrency)
                run["per_replica"] = [int(finished_requests(url) - b) for url, b in zip(replica_urls, before,
                                                                                         strict=True)]
                runs[mode].append(run)
                tokens = sum(rec["completion_tokens"] or 0 for rec in run["records"] if rec["ok"])
                log("%d replica(s) c=%d rep %d %-8s %d req, %d tokens in %.1f s = %.1f tok/s (per replica %s)",
                    len(replica_urls), concurrency, rep, mode, len(indices), tokens, run["wall_s"],
                    tokens / run["wall_s"], run["per_replica"])
        stats = {mode: mode_stats(runs[mode]) for mode in runs}
        versus = compare(stats["tuneloop"], stats["direct"], runs["tuneloop"], runs["direct"])
        log("%d replica(s) c=%d: throughput ratio %s, TTFT p50 ratio %s", len(replica_urls), concurrency,
            versus["throughput_ratio"], versus["ttft_p50_ratio"])
        results.append({"concurrency": concurrency, **stats, "tuneloop_vs_direct": versus})
    return results


def register_versions(db, adapters: dict[int, Path], status: str) -> None:
    """Rows for the adapter folders; ``retired`` (never activated) is a
    version no server loads until it is activated."""
    from store.db import session_scope
    from store.tables import AdapterVersion

    with session_scope(db) as session:
        for version, path in adapters.items():
            session.add(AdapterVersion(version=version, path=str(path), status=status))


def wait_until_listed(urls: list[str], name: str, timeout: float) -> float:
    """Seconds until every replica lists ``name`` in ``GET /v1/models``."""
    import httpx

    started = time.monotonic()
    while True:
        held = [any(card["id"] == name for card in httpx.get(f"{url}/v1/models", timeout=10).json()["data"])
                for url in urls]
        if all(held):
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"{name} was not loaded on every replica within {timeout:.0f} s")
        time.sleep(0.05)


def promote(client: ClientProcess, server, replica_urls: list[str], adapters: dict[int, Path],
            preloaded: bool) -> list[dict[str, Any]]:
    from store.db import make_engine, session_scope
    from store.registry import register_candidate

    writer = make_engine(server.app.state.settings.resolved_database_url)  # the trainer's connection, not the app's
    try:
        register_versions(writer, adapters, "retired")
        headers = {"Authorization": f"Bearer {server.api_key('bench-fleet-probe')}"}
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        results = []
        for version in sorted(adapters):
            name = f"v{version}"
            if preloaded:
                with session_scope(writer) as session:
                    register_candidate(session, version)
                seconds = wait_until_listed(replica_urls, name, PROMOTION_TIMEOUT_S)
                log("%s registered as candidate: on every replica %.1f s later", name, seconds)
            step = client.call("bench.fleet:promotion_step", timeout=PROMOTION_TIMEOUT_S + 60,
                               base_url=server.base_url, replica_urls=replica_urls, version=name, admin=admin,
                               headers=headers, limit_s=PROMOTION_TIMEOUT_S)
            log("promotion %s: admin call %s ms, every replica lists it %s ms, first answer %s ms, /healthz %s ms",
                name, step["admin_call_ms"], step.get("all_replicas_listed_ms"), step["first_answer_ms"],
                step["healthz_ms"])
            results.append(step)
        return results
    finally:
        writer.dispose()


def rss_mib(replica: VllmServer) -> float:
    return r(replica.rss_bytes() / 2**20, 0)


def main() -> int:
    emit = claim_stdout()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(name)s %(asctime)s] %(message)s"))
    for name in ("server.engine", "tuneloop.adapters"):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short run (~8 min on 2 cores)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data dir (and the replicas' logs)")
    parser.add_argument("--concurrency", default="1,4", help="comma-separated levels (default 1,4)")
    parser.add_argument("--max-tokens", type=int, help="tokens per answer (default 32 quick, 64 full)")
    parser.add_argument("--reps", type=int, help="repetitions per level, first mode alternating (default 1 quick, 3)")
    parser.add_argument("--waves", type=int, help="requests per run = max(2, concurrency) * waves (default 1 quick, 2)")
    parser.add_argument("--promotions", type=int, default=3, help="adapter versions promoted one after another")
    parser.add_argument("--preloaded", action="store_true",
                        help="register each version as a candidate and wait until every replica holds it first")
    parser.add_argument("--threads-bind", default="0;1",
                        help="VLLM_CPU_OMP_THREADS_BIND of each replica, ';'-separated (default '0;1': a core each)")
    parser.add_argument("--kv-cache-gib", type=float, default=1.0, help="VLLM_CPU_KVCACHE_SPACE of each replica")
    parser.add_argument("--model", help="model folder (default: the packaged SmolLM2-135M-Instruct)")
    parser.add_argument("--out", help="results file (default bench/results/fleet.json; fleet-quick.json with --quick)")
    args = parser.parse_args()
    quick = args.quick
    max_tokens = args.max_tokens or (32 if quick else 64)
    reps = args.reps or (1 if quick else 3)
    waves = args.waves or (1 if quick else 2)
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    binds = [b.strip() for b in args.threads_bind.split(";")]
    if len(binds) != 2:
        raise SystemExit(f"--threads-bind needs two core lists separated by ';', not {args.threads_bind!r}")

    data_dir = temp_data_dir("fleet")
    base = {"max_new_tokens": max(512, max_tokens), "engine": "openai"}
    if args.model:
        base["model"] = args.model
    settings = bench_settings(data_dir, engine_urls="http://127.0.0.1:1", **base)
    log("data dir %s, model %s, max_tokens %d, reps %d, waves %d, levels %s", data_dir, settings.model, max_tokens,
        reps, waves, levels)
    started = time.monotonic()
    adapters = make_adapters(settings.model, settings.adapters_dir, tuple(range(1, args.promotions + 1)))
    log("%d adapters written in %.1f s", len(adapters), time.monotonic() - started)

    replicas = [VllmServer(settings.model, data_dir / "replicas" / f"replica-{i}.log", kv_cache_gib=args.kv_cache_gib,
                           threads_bind=bind) for i, bind in enumerate(binds)]
    client = loop_thread = server = None
    try:
        for replica in replicas:
            replica.start()
        start_seconds = [r(replica.wait_ready(ENGINE_START_TIMEOUT_S), 1) for replica in replicas]
        memory_ready = [rss_mib(replica) for replica in replicas]
        log("replicas ready after %s s (started together), RSS %s MiB", start_seconds, memory_ready)
        urls = [replica.url for replica in replicas]
        model = replica_model(urls[0])

        client = ClientProcess()
        loop_thread = start_loop_thread()
        rounds = []
        promotions: list[dict[str, Any]] = []
        for count in (1, 2):
            fleet = urls[:count]
            settings = bench_settings(data_dir, engine_urls=",".join(fleet), **base)
            server = start_server(settings, loop_thread, ready_timeout=300)
            log("tuneloop serving over %s at %s", fleet, server.base_url)
            levels_out = measure(client, server, fleet, model, levels, reps, waves, max_tokens)
            rounds.append({"replicas": count, "levels": levels_out})
            if count == 2:
                promotions = promote(client, server, fleet, adapters, args.preloaded)
                rounds[-1]["engine_replicas"] = [
                    {k: v for k, v in state.items() if k in ("url", "healthy", "in_rotation", "adapters", "last_error")}
                    for state in server.app.state.engine.replicas()
                ]
            server.stop()
            server = None
        memory_end = [rss_mib(replica) for replica in replicas]

        failed = sum(level[mode]["failed"] for rnd in rounds for level in rnd["levels"] for mode in ("direct",
                                                                                                   "tuneloop"))
        result = {
            "bench": "fleet",
            "mode": "quick" if quick else "full",
            "model": Path(settings.model).name,
            "max_tokens": max_tokens,
            "temperature": 0,
            "reps": reps,
            "waves": waves,
            "replicas": [{"url": replica.url, "threads_bind": bind, "kv_cache_gib": args.kv_cache_gib,
                          "start_s": seconds, "rss_mib_ready": ready, "rss_mib_end": end}
                         for replica, bind, seconds, ready, end in zip(replicas, binds, start_seconds, memory_ready,
                                                                       memory_end, strict=True)],
            "ratios_tuneloop_vs_direct": {
                f"{rnd['replicas']}r_c{level['concurrency']}": {
                    "tok_s": level["tuneloop_vs_direct"]["throughput_ratio"],
                    "ttft_p50": level["tuneloop_vs_direct"]["ttft_p50_ratio"],
                    "ttft_p95": level["tuneloop_vs_direct"]["ttft_p95_ratio"],
                }
                for rnd in rounds for level in rnd["levels"]
            },
            "rounds": rounds,
            "promotion": {
                "kind": "preloaded (candidate first)" if args.preloaded else "cold (no replica held it)",
                "steps": [{k: v for k, v in step.items() if k != "probe_errors" or v} for step in promotions],
                "all_done_ms": [step.get("all_done_ms") for step in promotions],
            },
            "failed_requests": failed,
            "promotions_ok": bool(promotions) and all(step.get("all_done_ms") is not None for step in promotions),
            "machine_at_end": machine(),
            "note": "direct = streamed requests to the vLLM replicas themselves (alternating between them); "
                    "tuneloop = the same requests through tuneloop's /v1/chat/completions, from the same client "
                    "process; on a 2-core machine the two replicas share the CPUs (a core each): the 2-replica "
                    "numbers show overhead and correctness, not scaling",
        }
        out = Path(args.out) if args.out else RESULTS / ("fleet-quick.json" if quick else "fleet.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        emit(result)
        return 0
    finally:
        if server is not None:
            server.stop()
        if client is not None:
            client.close()
        if loop_thread is not None:
            loop_thread.stop()
        for replica in replicas:
            replica.stop()
        if not args.keep:
            shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
