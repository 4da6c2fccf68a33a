"""Hot-swapping LoRA adapters under load: promotion -> first answer from the new version.

Three small LoRA weight sets (PEFT, r=8 on all linear layers,
``init_lora_weights=False``, alpha 2r, so each changes the answers) are written
once; every cycle registers three *new* versions (copies of them: a version is
a new folder, name and id, as the trainer makes) in the app's
``data_dir/adapters/vN``. The server (real vLLM engine) serves N streaming
clients without pause while each cycle does what the trainer and an admin do:

    register vA as candidate (as the trainer does before its gate; servers
    preload it) -> wait --gate s -> promote vA (admin API) ; same for vB, vC ;
    rollback (-> vB), rollback (-> vA), rollback (-> base)

For each swap, from the admin call returning:
- ``first_answer``: until the first answer *recorded as the new version*
  returns -- one-token, temperature-0 probe requests (non-streaming, their own
  API key): one when the call returns, one the moment ``/healthz`` names the
  new version, then one at a time until one comes back naming it. Also
  reported split in two: when that probe was sent (the swap's share) and its
  own latency (the engine's time to first token under this load);
- ``flip``: until ``/healthz`` names the new version (polled every 2 ms).
The admin call itself (which commits the change) is reported apart.

Checked afterwards: no request failed (clients or probes); every answer row is
complete and names an adapter that was in service while its request started;
and its text (greedy decoding) agrees longest with the reference answer of the
weight set of the adapter it names (references computed at the end directly on
the engine for every prompt and weight set; ties, where references share a
prefix, are accepted).

    .venv/bin/python bench/swap.py --quick    # 4 clients, 2 cycles (12 swaps)
    .venv/bin/python bench/swap.py            # 8 clients, 5 cycles (30 swaps)

Prints one JSON line last on stdout; progress and logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (  # noqa: E402
    ADMIN_TOKEN,
    ClientProcess,
    _http_client,
    bench_settings,
    claim_stdout,
    log,
    machine,
    r,
    start_loop_thread,
    start_server,
    start_vllm_engine,
    summary_ms,
    temp_data_dir,
)

PROMPTS = [
    "Tell me about the ocean.",
    "Write a short poem about autumn.",
    "What is the capital of France?",
    "Explain what a computer is.",
    "Describe a cat.",
    "Give me three tips for sleeping well.",
]
WEIGHT_SETS = (1, 2, 3)


def cycle_steps(cycle: int) -> list[tuple[str, int | None, str | None]]:
    """(action, version, expected active name) of cycle ``cycle``: three new
    versions promoted one after the other, then three rollbacks to the base model."""
    a, b, c = (3 * cycle + k for k in WEIGHT_SETS)
    return [("promote", a, f"v{a}"), ("promote", b, f"v{b}"), ("promote", c, f"v{c}"),
            ("rollback", None, f"v{b}"), ("rollback", None, f"v{a}"), ("rollback", None, None)]


def weight_set(name: str | None) -> str | None:
    """The weight set a version was copied from ("v5" -> "v2"); None is the base model."""
    if name is None:
        return None
    return f"v{(int(name[1:]) - 1) % len(WEIGHT_SETS) + 1}"


def common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def make_adapters(model_dir: str, adapters_dir: Path, versions: tuple[int, ...], rank: int = 8) -> dict[int, Path]:
    """Write PEFT LoRA adapters with random (non-zero) weights, one seed each."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = {}
    for version in versions:
        torch.manual_seed(1000 + version)
        base = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", lora_dropout=0.0,
                            init_lora_weights=False, task_type="CAUSAL_LM")
        model = get_peft_model(base, config)
        path = adapters_dir / f"v{version}"
        model.save_pretrained(str(path))
        paths[version] = path.resolve()
        del model, base
    return paths


def register_versions(db, sets: dict[int, Path], adapters_dir: Path, cycles: int) -> None:
    """Rows (status ``training``, as the trainer reserves them) for every
    version of every cycle; versions past the first cycle are copies of a weight set."""
    from store.db import session_scope
    from store.tables import AdapterVersion

    with session_scope(db) as session:
        for version in range(1, 3 * cycles + 1):
            path = adapters_dir / f"v{version}"
            if not path.exists():
                shutil.copytree(sets[int(weight_set(f"v{version}")[1:])], path)
            session.add(AdapterVersion(version=version, path=str(path.resolve()), status="training"))


def mark_candidate(db, version: int) -> None:
    """What the trainer does once a version is trained, before its gate."""
    from store.db import session_scope

    try:
        from store.registry import register_candidate
    except ImportError:  # tuneloop before push swaps (a "before" run): the status alone
        from sqlmodel import select

        from store.tables import AdapterVersion

        def register_candidate(session, number):
            row = session.exec(select(AdapterVersion).where(AdapterVersion.version == number)).one()
            row.status = "candidate"
            session.add(row)

    with session_scope(db) as session:
        register_candidate(session, version)


def body_for(index: int, max_tokens: int, stream: bool = True) -> dict[str, Any]:
    body = {"messages": [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}],
            "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def swap_step(job: dict[str, Any], conn) -> dict[str, Any]:
    """Client job: make one admin call (``job["path"]``), then time the first
    answer recorded as ``job["expected"]`` (probes) and ``/healthz`` naming it."""
    expected = job["expected"]
    result: dict[str, Any] = {"called_at": time.time(), "probes": [], "first_answer_s": None, "flip_s": None,
                              "seen_at": None, "winner_sent_s": None, "winner_latency_s": None}
    async with _http_client(job["base_url"], 8, timeout=120) as client:
        t0 = time.perf_counter()
        resp = await client.post(job["path"], headers=job["admin"])
        t_returned = time.perf_counter()
        result["admin_call_ms"] = r((t_returned - t0) * 1000, 1)
        result["status"] = resp.status_code
        result["active"] = resp.json().get("active") if resp.status_code == 200 else resp.text[:200]
        if resp.status_code != 200 or result["active"] != expected:
            return result
        found, flipped = asyncio.Event(), asyncio.Event()

        async def watch_health() -> None:
            while True:
                if (await client.get("/healthz")).json()["adapter"] == expected:
                    result["flip_s"] = time.perf_counter() - t_returned
                    result["seen_at"] = time.time()
                    flipped.set()
                    return
                await asyncio.sleep(0.002)

        async def probe(index: int) -> None:
            rec: dict[str, Any] = {"ok": False, "probe": True, "prompt_index": index % len(PROMPTS),
                                   "t_start": time.time(), "message_id": None, "error": None, "adapter": None}
            started = time.perf_counter()
            try:
                answer = await client.post("/v1/chat/completions", headers=job["headers"],
                                           json=body_for(index, 1, stream=False))
                if answer.status_code != 200:
                    rec["error"] = f"HTTP {answer.status_code}: {answer.text[:300]}"
                else:
                    data = answer.json()
                    rec["message_id"] = data["tuneloop"]["message_id"]
                    rec["adapter"] = data["tuneloop"]["adapter"]
                    rec["ok"] = True
            except Exception as exc:  # noqa: BLE001 - a failed request is a result
                rec["error"] = f"{type(exc).__name__}: {exc}"
            ended = time.perf_counter()
            rec["latency"] = rec["ttft"] = ended - started
            rec["t_first"] = time.time()
            if rec["ok"] and rec["adapter"] == expected and not found.is_set():
                result["first_answer_s"] = ended - t_returned
                result["winner_sent_s"] = started - t_returned
                result["winner_latency_s"] = ended - started
                found.set()
            result["probes"].append(rec)

        # One probe at once (the swap may be done already), one more the moment
        # /healthz shows it done, then one at a time until one names it.
        health = asyncio.create_task(watch_health())
        probes = [asyncio.create_task(probe(0))]
        deadline = t_returned + 120
        on_found, on_flip = asyncio.create_task(found.wait()), asyncio.create_task(flipped.wait())
        await asyncio.wait({on_found, on_flip}, return_when=asyncio.FIRST_COMPLETED, timeout=120)
        if not found.is_set() and flipped.is_set():
            probes.append(asyncio.create_task(probe(1)))
        while not found.is_set() and time.perf_counter() < deadline:
            pending = {task for task in probes if not task.done()}
            if not pending:
                probes.append(asyncio.create_task(probe(len(probes))))
                continue
            await asyncio.wait(pending | {on_found}, return_when=asyncio.FIRST_COMPLETED,
                               timeout=max(0.0, deadline - time.perf_counter()))
        on_found.cancel()
        on_flip.cancel()
        await asyncio.gather(*probes)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(health, max(1.0, deadline - time.perf_counter()))
    return result


async def references(engine, sets: dict[int, Path], max_tokens: int) -> dict[tuple[int, str | None], str]:
    """Greedy answer of every prompt under every weight set (None = base), directly."""
    import uuid

    from server.engine.base import AdapterRef, SamplingSettings

    sampling = SamplingSettings(temperature=0.0, max_tokens=max_tokens)
    refs: dict[str | None, AdapterRef | None] = {None: None}
    refs.update({f"v{v}": AdapterRef(f"v{v}", v, str(p)) for v, p in sets.items()})

    async def one(prompt_index: int, name: str | None) -> tuple[tuple[int, str | None], str]:
        parts = []
        messages = [{"role": "user", "content": PROMPTS[prompt_index]}]
        async for chunk in engine.generate(messages, sampling, f"bench-ref-{uuid.uuid4().hex[:8]}", refs[name]):
            parts.append(chunk.text)
        return (prompt_index, name), "".join(parts)

    serve = getattr(engine, "serve", None)  # an engine serving merged weights runs one version at a time
    if serve is None:
        pairs = await asyncio.gather(*(one(i, name) for i in range(len(PROMPTS)) for name in refs))
        return dict(pairs)
    answers: dict[tuple[int, str | None], str] = {}
    for name, ref in refs.items():
        await serve(ref)
        answers.update(await asyncio.gather(*(one(i, name) for i in range(len(PROMPTS)))))
    return answers


def served_windows(swaps: list[dict[str, Any]], t_end: float) -> list[tuple[float, float, str | None]]:
    """(from, to, adapter) intervals in wall-clock time, as /healthz reported them."""
    windows = []
    current, since = None, 0.0
    for swap in swaps:
        if swap["seen_at"] is None:
            continue
        windows.append((since, swap["seen_at"], current))
        current, since = swap["expected"], swap["called_at"]
    windows.append((since, t_end, current))
    return windows


def is_loaded(server, version: int | None) -> bool | None:
    """Whether the server had ``version`` loaded and warm before the call (None: it cannot tell)."""
    adapters = server.app.state.adapters
    if version is None or not hasattr(adapters, "is_loaded"):
        return None
    known = getattr(adapters, "_loaded", {}).get(version)
    return known is not None and adapters.is_loaded(known)


def targets(first_answer: dict[str, Any], failed: int) -> dict[str, bool | None]:
    p50, p99 = first_answer["p50"], first_answer["p99"]
    return {"first_answer_p50_le_100ms": None if p50 is None else p50 <= 100,
            "first_answer_p99_le_250ms": None if p99 is None else p99 <= 250,
            "no_failed_requests": failed == 0}


def main() -> int:
    emit = claim_stdout()
    # the engine logs each merged swap's split: "drained in X s, weights reloaded in Y s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(name)s %(asctime)s] %(message)s"))
    logging.getLogger("server.engine").addHandler(handler)
    logging.getLogger("server.engine").setLevel(logging.INFO)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short run (~5 min on 2 cores)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data dir")
    parser.add_argument("--clients", type=int, help="streaming clients (default 4 quick, 8 full)")
    parser.add_argument("--cycles", type=int, help="cycles of 3 promotions + 3 rollbacks (default 2 quick, 5 full)")
    parser.add_argument("--dwell", type=float, help="seconds of traffic on each version (default 2 quick, 5 full)")
    parser.add_argument("--gate", type=float, default=2.0,
                        help="seconds between registering a candidate and promoting it (the gate; default 2)")
    parser.add_argument("--max-tokens", type=int, help="tokens per answer (default 32 quick, 64 full)")
    parser.add_argument("--poll", type=float, default=None,
                        help="adapter_poll_seconds of the server (default: the shipped default)")
    args = parser.parse_args()
    quick = args.quick
    clients = args.clients or (4 if quick else 8)
    cycles = args.cycles or (2 if quick else 5)
    dwell = args.dwell if args.dwell is not None else (2.0 if quick else 5.0)
    max_tokens = args.max_tokens or (32 if quick else 64)

    data_dir = temp_data_dir("swap")
    # the load and the probes are far above one person's rate limits: they measure swaps, not limits
    overrides: dict[str, Any] = {"rate_limits": False, "max_concurrent_generations": 0}
    if args.poll is not None:
        overrides["adapter_poll_seconds"] = args.poll
    settings = bench_settings(data_dir, **overrides)
    log("data dir %s; writing %d LoRA weight sets", data_dir, len(WEIGHT_SETS))
    started = time.monotonic()
    sets = make_adapters(settings.model, settings.adapters_dir, WEIGHT_SETS)
    log("adapters written in %.1f s", time.monotonic() - started)

    client = ClientProcess()
    driver = ClientProcess()
    loop_thread = start_loop_thread()
    engine = start_vllm_engine(settings, loop_thread)
    server = None
    from store.db import make_engine

    writer = make_engine(settings.resolved_database_url)  # the trainer's connections, not the server's pool
    try:
        server = start_server(settings, loop_thread, engine)
        register_versions(writer, sets, settings.adapters_dir, cycles)
        headers = {"Authorization": f"Bearer {server.api_key('bench-swap')}"}
        probe_headers = {"Authorization": f"Bearer {server.api_key('bench-swap-probe')}"}
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

        client.start("bench._common:chat_load", base_url=server.base_url, headers=headers,
                     bodies=[body_for(i, max_tokens) for i in range(len(PROMPTS))], clients=clients)
        time.sleep(dwell)
        swaps: list[dict[str, Any]] = []
        load_started = time.time()
        for cycle in range(cycles):
            for action, version, expected in cycle_steps(cycle):
                if action == "promote":
                    mark_candidate(writer, version)
                    time.sleep(args.gate)
                    path = f"/api/admin/adapters/v{version}/activate"
                else:
                    path = "/api/admin/adapters/rollback"
                preloaded = is_loaded(server, None if expected is None else int(expected[1:]))
                swap = driver.call("bench.swap:swap_step", timeout=300, base_url=server.base_url, admin=admin,
                                   headers=probe_headers, path=path, expected=expected)
                swap.update(action=action, expected=expected, cycle=cycle, preloaded=preloaded)
                if swap["status"] != 200 or swap["active"] != expected:
                    log("swap %s -> %s: admin said %s %s", action, expected, swap["status"], swap["active"])
                log("swap %d: %s -> %s: first answer %s ms, flip %s ms (admin call %s ms, preloaded %s, %d probes)",
                    len(swaps) + 1, action, expected,
                    None if swap["first_answer_s"] is None else round(swap["first_answer_s"] * 1000),
                    None if swap["flip_s"] is None else round(swap["flip_s"] * 1000),
                    swap["admin_call_ms"], preloaded, len(swap["probes"]))
                swaps.append(swap)
                time.sleep(dwell)
        client.send("stop")
        load = client.result(timeout=600)
        load_ended = time.time()
        records = load["records"]
        probes = [rec for swap in swaps for rec in swap["probes"]]
        log("load: %d requests (%d failed) in %.0f s; %d probes (%d failed)", len(records),
            sum(not x["ok"] for x in records), load["wall_s"], len(probes), sum(not x["ok"] for x in probes))

        log("computing reference answers for %d prompts x %d weight sets + base", len(PROMPTS), len(sets))
        refs = loop_thread.run(references(engine, sets, max_tokens), timeout=900)

        # -- checks ------------------------------------------------------------
        from sqlmodel import Session, select

        from store.tables import Message

        by_id = {rec["message_id"]: rec for rec in records + probes if rec["message_id"]}
        with Session(writer) as session:
            rows = session.exec(select(Message).where(Message.role == "assistant")).all()
        windows = served_windows(swaps, load_ended + 1)
        check = {"rows": len(rows), "not_complete": 0, "no_client_record": 0, "adapter_not_in_service": 0,
                 "text_matches_recorded_adapter": 0, "text_matches_other_adapter": 0,
                 "text_tied_with_other_adapter": 0}
        examples: list[str] = []
        for row in rows:
            rec = by_id.get(row.id)
            if row.status != "complete":
                check["not_complete"] += 1
                examples.append(f"message {row.id} status {row.status}")
            if rec is None:
                check["no_client_record"] += 1
                continue
            # in service at some moment between the request's start and its first token
            lo, hi = rec["t_start"] - 0.05, (rec["t_first"] or rec["t_start"] + rec["latency"]) + 0.05
            in_service = {name for (a, b, name) in windows if a <= hi and b >= lo}
            if row.adapter_version not in in_service:
                check["adapter_not_in_service"] += 1
                examples.append(
                    f"message {row.id} says {row.adapter_version}, in service: {sorted(map(str, in_service))}")
            agree = {name: common_prefix(row.content, text)
                     for (i, name), text in refs.items() if i == rec["prompt_index"]}
            best = max(agree.values())
            if agree.get(weight_set(row.adapter_version), -1) < best:
                check["text_matches_other_adapter"] += 1
                winners = sorted(str(n) for n, v in agree.items() if v == best)
                examples.append(f"message {row.id} says {row.adapter_version}, text is {winners}'s")
            elif sum(1 for v in agree.values() if v == best) > 1:
                check["text_tied_with_other_adapter"] += 1
            else:
                check["text_matches_recorded_adapter"] += 1
        distinct = len(set(refs.values()))

        def latencies(key: str, **where: Any) -> list[float]:
            return [s[key] for s in swaps if s[key] is not None
                    and all((s[k] in v) if isinstance(v, tuple) else s[k] == v for k, v in where.items())]

        failed = [rec for rec in records + probes if not rec["ok"]]
        per_adapter: dict[str, int] = {}
        for row in rows:
            per_adapter[str(row.adapter_version)] = per_adapter.get(str(row.adapter_version), 0) + 1
        first_answer = summary_ms(latencies("first_answer_s"))
        ok = (not failed and len(latencies("first_answer_s")) == len(swaps) and check["not_complete"] == 0
              and check["adapter_not_in_service"] == 0 and check["text_matches_other_adapter"] == 0
              and check["no_client_record"] == 0)
        emit({
            "bench": "swap",
            "mode": "quick" if quick else "full",
            "clients": clients,
            "max_tokens": max_tokens,
            "adapter_poll_seconds": settings.adapter_poll_seconds,
            "serving_mode": "merged" if getattr(engine, "merged", False) else "lora",
            "rate_limits": "off",
            "gate_seconds": args.gate,
            "swaps": len(swaps),
            "swaps_seen": len(latencies("first_answer_s")),
            "first_answer_ms": first_answer,
            "first_answer_promotions_ms": summary_ms(latencies("first_answer_s", action="promote")),
            "first_answer_rollbacks_ms": summary_ms(latencies("first_answer_s", action="rollback")),
            "first_answer_first_cycle_ms": summary_ms(latencies("first_answer_s", cycle=0)),
            "first_answer_later_cycles_ms": summary_ms(latencies("first_answer_s", cycle=tuple(range(1, cycles)))),
            # first answer = when the first probe naming it was sent + that probe's own latency under load
            "first_answer_probe_sent_ms": summary_ms(latencies("winner_sent_s")),
            "first_answer_probe_latency_ms": summary_ms(latencies("winner_latency_s")),
            "flip_ms": summary_ms(latencies("flip_s")),
            "preloaded_before_call": sum(1 for s in swaps if s["preloaded"]),
            "admin_call_ms_p50": r(sorted(s["admin_call_ms"] for s in swaps)[len(swaps) // 2], 1) if swaps else None,
            "requests_completed": len(records) + len(probes) - len(failed),
            "probes": len(probes),
            "failed_requests": len(failed),
            "request_ttft_ms": summary_ms([rec["ttft"] for rec in records if rec["ok"]]),
            "probe_latency_ms": summary_ms([rec["latency"] for rec in probes if rec["ok"]]),
            "load_seconds": r(load_ended - load_started, 1),
            "answers_per_adapter": per_adapter,
            "message_check": check,
            "reference_answers_distinct": f"{distinct}/{len(refs)}",
            "targets": targets(first_answer, len(failed)),
            "machine_at_end": machine(),
            "ok": ok,
            "problems": (examples + [rec["error"] for rec in failed])[:10],
        })
        return 0 if ok else 1
    finally:
        if server is not None:
            server.stop()
        client.close()
        driver.close()
        writer.dispose()
        try:
            loop_thread.run(engine.shutdown(), timeout=120)
        except Exception as exc:  # noqa: BLE001
            log("engine shutdown: %s", exc)
        loop_thread.stop()
        if not args.keep:
            shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
