"""Hot-swapping LoRA adapters under load.

Three small LoRA versions (PEFT, r=8 on all linear layers,
``init_lora_weights=False``, alpha 2r, so each changes the answers) are written to the
app's ``data_dir/adapters/vN`` and registered as ``AdapterVersion`` rows. The
server (real vLLM engine) then serves N streaming clients without pause while
the admin API repeatedly activates and rolls back:

    activate v1, v2, v3, rollback (-> v2), rollback (-> v1), rollback (-> base), ...

Swap latency = from the admin call returning to ``/healthz`` naming the new
version (polled every 20 ms). It includes the watcher's poll interval
(``TUNELOOP_ADAPTER_POLL_SECONDS``, default 1 s), loading the adapter the first
time and its one-token warm-up request, which queues behind the running load.

Checked afterwards: no client request failed; every answer row is complete
and names an adapter that was in service while its request started; and its
text (greedy decoding) agrees longest with the reference answer of the adapter
it names (references computed at the end directly on the engine for every
prompt and adapter; ties, where references share a prefix, are accepted).

    .venv/bin/python bench/swap.py --quick    # 4 clients, 2 cycles (12 swaps)
    .venv/bin/python bench/swap.py            # 8 clients, 5 cycles (30 swaps)

Prints one JSON line last on stdout; progress and logs go to stderr.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (  # noqa: E402
    ADMIN_TOKEN,
    ClientProcess,
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
# One cycle: expected active version after each admin call.
CYCLE = [("activate", 1, "v1"), ("activate", 2, "v2"), ("activate", 3, "v3"),
         ("rollback", None, "v2"), ("rollback", None, "v1"), ("rollback", None, None)]


def common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def make_adapters(model_dir: str, adapters_dir: Path, versions: list[int], rank: int = 8) -> dict[int, Path]:
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


def register_adapters(db, paths: dict[int, Path]) -> None:
    from store.db import session_scope
    from store.tables import AdapterVersion

    with session_scope(db) as session:
        for version, path in paths.items():
            session.add(AdapterVersion(version=version, path=str(path), status="candidate"))


def body_for(index: int, max_tokens: int) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}


async def references(engine, paths: dict[int, Path], max_tokens: int) -> dict[tuple[int, str | None], str]:
    """Greedy answer of every prompt under every adapter (None = base), directly."""
    import asyncio
    import uuid

    from server.engine.base import AdapterRef, SamplingSettings

    sampling = SamplingSettings(temperature=0.0, max_tokens=max_tokens)
    refs: dict[str | None, AdapterRef | None] = {None: None}
    refs.update({f"v{v}": AdapterRef(f"v{v}", v, str(p)) for v, p in paths.items()})

    async def one(prompt_index: int, name: str | None) -> tuple[tuple[int, str | None], str]:
        parts = []
        messages = [{"role": "user", "content": PROMPTS[prompt_index]}]
        async for chunk in engine.generate(messages, sampling, f"bench-ref-{uuid.uuid4().hex[:8]}", refs[name]):
            parts.append(chunk.text)
        return (prompt_index, name), "".join(parts)

    pairs = await asyncio.gather(*(one(i, name) for i in range(len(PROMPTS)) for name in refs))
    return dict(pairs)


def served_windows(swaps: list[dict[str, Any]], t_end: float) -> list[tuple[float, float, str | None]]:
    """(from, to, adapter) intervals in wall-clock time, as /healthz reported them."""
    windows = []
    current, since = None, 0.0
    for swap in swaps:
        if swap["seen_at"] is None:
            continue
        windows.append((since, swap["switch_upper"], current))
        current, since = swap["expected"], swap["called_at"]
    windows.append((since, t_end, current))
    return windows


def main() -> int:
    emit = claim_stdout()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short run (~5 min on 2 cores)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data dir")
    parser.add_argument("--clients", type=int, help="streaming clients (default 4 quick, 8 full)")
    parser.add_argument("--cycles", type=int, help="activate v1,v2,v3 + 3 rollbacks cycles (default 2 quick, 5 full)")
    parser.add_argument("--dwell", type=float, help="seconds of traffic on each version (default 2 quick, 5 full)")
    parser.add_argument("--max-tokens", type=int, help="tokens per answer (default 32 quick, 64 full)")
    parser.add_argument("--poll", type=float, default=1.0,
                        help="adapter_poll_seconds of the server (default 1.0, the shipped default)")
    args = parser.parse_args()
    quick = args.quick
    clients = args.clients or (4 if quick else 8)
    cycles = args.cycles or (2 if quick else 5)
    dwell = args.dwell if args.dwell is not None else (2.0 if quick else 5.0)
    max_tokens = args.max_tokens or (32 if quick else 64)

    import httpx

    data_dir = temp_data_dir("swap")
    settings = bench_settings(data_dir, adapter_poll_seconds=args.poll)
    log("data dir %s; writing 3 LoRA adapters", data_dir)
    started = time.monotonic()
    paths = make_adapters(settings.model, settings.adapters_dir, [1, 2, 3])
    log("adapters written in %.1f s", time.monotonic() - started)

    client = ClientProcess()
    loop_thread = start_loop_thread()
    engine = start_vllm_engine(settings, loop_thread)
    server = None
    try:
        server = start_server(settings, loop_thread, engine)
        register_adapters(server.db, paths)
        headers = {"Authorization": f"Bearer {server.api_key('bench-swap')}"}
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        http = httpx.Client(base_url=server.base_url, timeout=120)

        client.start("bench._common:chat_load", base_url=server.base_url, headers=headers,
                     bodies=[body_for(i, max_tokens) for i in range(len(PROMPTS))], clients=clients)
        time.sleep(dwell)
        swaps: list[dict[str, Any]] = []
        load_started = time.time()
        for cycle in range(cycles):
            for action, version, expected in CYCLE:
                path = (f"/api/admin/adapters/v{version}/activate" if action == "activate"
                        else "/api/admin/adapters/rollback")
                swap: dict[str, Any] = {"action": action, "expected": expected, "cycle": cycle,
                                        "called_at": time.time()}
                t0 = time.perf_counter()
                resp = http.post(path, headers=admin)
                t_returned = time.perf_counter()
                swap["admin_call_ms"] = r((t_returned - t0) * 1000, 1)
                swap["status"] = resp.status_code
                swap["active"] = resp.json().get("active") if resp.status_code == 200 else resp.text[:200]
                swap["seen_at"] = None
                swap["latency_s"] = None
                if resp.status_code != 200 or swap["active"] != expected:
                    log("swap %s -> %s: admin said %s %s", action, expected, resp.status_code, swap["active"])
                    swaps.append(swap)
                    continue
                deadline = time.perf_counter() + 180
                while time.perf_counter() < deadline:
                    if http.get("/healthz").json()["adapter"] == expected:
                        now = time.perf_counter()
                        swap["latency_s"] = now - t_returned
                        swap["seen_at"] = time.time()
                        swap["switch_upper"] = swap["seen_at"]
                        break
                    time.sleep(0.02)
                log("swap %d: %s -> %s in %s ms (admin call %s ms)", len(swaps) + 1, action, expected,
                    None if swap["latency_s"] is None else round(swap["latency_s"] * 1000), swap["admin_call_ms"])
                swaps.append(swap)
                time.sleep(dwell)
        client.send("stop")
        load = client.result(timeout=600)
        load_ended = time.time()
        records = load["records"]
        log("load: %d requests (%d failed) in %.0f s", len(records), sum(not x["ok"] for x in records), load["wall_s"])

        log("computing reference answers for %d prompts x 4 adapters", len(PROMPTS))
        refs = loop_thread.run(references(engine, paths, max_tokens), timeout=900)

        # -- checks ------------------------------------------------------------
        from sqlmodel import Session, select

        from store.tables import Message

        by_id = {rec["message_id"]: rec for rec in records if rec["message_id"]}
        from store.db import make_engine

        reader = make_engine(settings.resolved_database_url)  # not the server's pool
        with Session(reader) as session:
            rows = session.exec(select(Message).where(Message.role == "assistant")).all()
        reader.dispose()
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
            if agree.get(row.adapter_version, -1) < best:
                check["text_matches_other_adapter"] += 1
                winners = sorted(str(n) for n, v in agree.items() if v == best)
                examples.append(f"message {row.id} says {row.adapter_version}, text is {winners}'s")
            elif sum(1 for v in agree.values() if v == best) > 1:
                check["text_tied_with_other_adapter"] += 1
            else:
                check["text_matches_recorded_adapter"] += 1
        distinct = len(set(refs.values()))

        latencies = [s["latency_s"] for s in swaps if s["latency_s"] is not None]
        failed = [rec for rec in records if not rec["ok"]]
        per_adapter: dict[str, int] = {}
        for row in rows:
            per_adapter[str(row.adapter_version)] = per_adapter.get(str(row.adapter_version), 0) + 1
        first = [s["latency_s"] for s in swaps if s["cycle"] == 0 and s["latency_s"] is not None]
        later = [s["latency_s"] for s in swaps if s["cycle"] > 0 and s["latency_s"] is not None]
        ok = (not failed and len(latencies) == len(swaps) and check["not_complete"] == 0
              and check["adapter_not_in_service"] == 0 and check["text_matches_other_adapter"] == 0
              and check["no_client_record"] == 0)
        emit({
            "bench": "swap",
            "mode": "quick" if quick else "full",
            "clients": clients,
            "max_tokens": max_tokens,
            "adapter_poll_seconds": args.poll,
            "swaps": len(swaps),
            "swaps_seen": len(latencies),
            "swap_latency_ms": summary_ms(latencies),
            "swap_latency_first_cycle_ms": summary_ms(first),
            "swap_latency_later_cycles_ms": summary_ms(later),
            "admin_call_ms_p50": r(sorted(s["admin_call_ms"] for s in swaps)[len(swaps) // 2], 1) if swaps else None,
            "requests_completed": len(records) - len(failed),
            "failed_requests": len(failed),
            "request_ttft_ms": summary_ms([rec["ttft"] for rec in records if rec["ok"]]),
            "load_seconds": r(load_ended - load_started, 1),
            "answers_per_adapter": per_adapter,
            "message_check": check,
            "reference_answers_distinct": f"{distinct}/{len(refs)}",
            "machine_at_end": machine(),
            "ok": ok,
            "problems": (examples + [rec["error"] for rec in failed])[:10],
        })
        http.close()
        return 0 if ok else 1
    finally:
        if server is not None:
            server.stop()
        client.close()
        try:
            loop_thread.run(engine.shutdown(), timeout=120)
        except Exception as exc:  # noqa: BLE001
            log("engine shutdown: %s", exc)
        loop_thread.stop()
        if not args.keep:
            shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
