"""tuneloop's serving overhead against the same vLLM engine called directly.

One ``VllmChatEngine`` is started on a loop thread; the tuneloop app is served
by uvicorn on that same loop (as the tests do). At each concurrency (1, 4, 16)
the same prompts (greedy, fixed ``max_tokens``) are sent

- (a) ``tuneloop``: through HTTP, ``POST /v1/chat/completions`` with
  ``stream=true`` and an API key, from a separate client process;
- (b) ``vllm_http``: the same HTTP request to vLLM's own OpenAI-compatible
  server (the app ``vllm serve`` builds) on the same engine and loop, from the
  same client: what serving over HTTP costs with no tuneloop code in the path;
- (c) ``direct``: as coroutines calling ``VllmChatEngine.generate`` on the
  engine's own loop, in the server process (no HTTP, no client process);

rotating which mode goes first, repetition by repetition. Reported per
concurrency: output tokens/s (all tokens / wall time), time to first content
token (p50, p90), tuneloop's throughput ratio and added TTFT against each
baseline, and CPU time of the server process per request (tuneloop's own work
competes with vLLM for the same cores). Targets: >= 0.95x throughput and
<= 10 ms added TTFT against ``direct`` (the strict reading of the target).

    .venv/bin/python bench/serving.py --quick          # ~4-5 min on 2 cores
    .venv/bin/python bench/serving.py                  # full: 128 tokens, 4 reps (~15 min)
    .venv/bin/python bench/serving.py --adapter PATH   # tuneloop serving a LoRA
    TUNELOOP_SERVING_MODE=lora .venv/bin/python bench/serving.py --adapter PATH

With ``--adapter`` in the merged serving mode (the default without a GPU) the
adapter is merged into the engine's weights and ``vllm_http`` is vLLM's own
server on the base model, same compiled engine: the limit. In the lora mode
``vllm_http`` serves the adapter as a LoRA, as ``vllm serve --enable-lora`` does.

Prints one JSON line last on stdout; progress and logs go to stderr.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (  # noqa: E402
    ClientProcess,
    bench_settings,
    claim_stdout,
    cpu_seconds,
    log,
    machine,
    pct,
    r,
    start_loop_thread,
    start_server,
    start_vllm_engine,
    temp_data_dir,
)

# Prompts that ask for long answers, so most requests run to max_tokens.
PROMPTS = [
    "Write a long, detailed essay about the history of the Roman Empire, from its founding to its fall.",
    "Explain in great detail how a car engine works, step by step, covering every major part.",
    "Write a long story about a dragon who learns to bake bread in a small mountain village.",
    "Describe in detail the water cycle and its importance for life on Earth. Be thorough.",
    "Write a detailed guide to planting and caring for a vegetable garden through all four seasons.",
    "Explain thoroughly how computers store and process information, from transistors to programs.",
    "Write a long letter to a friend describing a week-long trip through the mountains.",
    "Give a detailed explanation of photosynthesis, including the light and dark reactions.",
    "Write a long essay on the causes and consequences of the Industrial Revolution.",
    "Describe, in as much detail as you can, a busy day in a large city hospital.",
    "Explain in detail how the human heart and circulatory system work.",
    "Write a long fairy tale about a lost princess, a clever fox and a magic river.",
    "Write a detailed history of the invention of the printing press and its effects on Europe.",
    "Explain step by step how to cook a three-course dinner for six guests, with all recipes.",
    "Describe the solar system in detail, planet by planet, with facts about each one.",
    "Write a long, detailed review of an imaginary science fiction film, covering plot and characters.",
]


def messages_for(index: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}]


def http_body(index: int, max_tokens: int) -> dict[str, Any]:
    return {
        "model": "tuneloop", "messages": messages_for(index), "max_tokens": max_tokens,
        "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
    }


def start_vllm_http_server(engine, loop_thread, settings, adapter) -> tuple[str, Any]:
    """vLLM's own OpenAI-compatible server (its FastAPI app, as ``vllm serve``
    builds it) on the same ``AsyncLLM`` and the same event loop: HTTP, SSE and
    JSON with no tuneloop code in the path. Returns (base URL, uvicorn server)."""
    import uvicorn
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from bench._common import free_port

    argv = ["--model", str(settings.model), "--disable-log-stats", "--disable-uvicorn-access-log",
            "--max-model-len", str(settings.max_model_len)]
    if adapter is None or engine.merged:
        # merged serving: the engine has no LoRA; vLLM's server then serves the
        # base model on the same compiled engine -- the limit an adapter is held to
        argv += ["--served-model-name", "tuneloop"]
    else:  # requests name "tuneloop": the LoRA, as in tuneloop's own API
        argv += ["--served-model-name", "base", "--enable-lora", "--lora-modules", f"tuneloop={adapter.path}"]
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    llm = engine._llm
    supported = loop_thread.run(llm.get_supported_tasks(), timeout=60)
    app = build_app(args, supported, llm.model_config)
    loop_thread.run(init_app_state(llm, app.state, args, supported), timeout=120)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off", access_log=False))
    loop_thread.submit(server.serve())
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("vLLM's OpenAI server did not start within 30 s")
        time.sleep(0.02)
    return f"http://127.0.0.1:{port}", server


async def direct_round(engine, adapter, indices: list[int], max_tokens: int, concurrency: int) -> dict[str, Any]:
    """The same requests as the HTTP round, as coroutines on the engine's loop."""
    import asyncio

    from server.engine.base import SamplingSettings

    sampling = SamplingSettings(temperature=0.0, top_p=1.0, max_tokens=max_tokens)
    records: list[dict[str, Any] | None] = [None] * len(indices)
    next_index = 0

    async def one(index: int) -> dict[str, Any]:
        rec: dict[str, Any] = {"ok": False, "ttft": None, "latency": None, "completion_tokens": None,
                               "error": None, "text": ""}
        parts: list[str] = []
        started = time.perf_counter()
        try:
            request_id = f"bench-direct-{uuid.uuid4().hex[:12]}"
            async for chunk in engine.generate(messages_for(index), sampling, request_id, adapter):
                if chunk.text:
                    if rec["ttft"] is None:
                        rec["ttft"] = time.perf_counter() - started
                    parts.append(chunk.text)
                if chunk.finished:
                    rec["completion_tokens"] = chunk.completion_tokens
            rec["ok"] = True
        except Exception as exc:  # noqa: BLE001 - a failed request is a result
            rec["error"] = f"{type(exc).__name__}: {exc}"
        rec["latency"] = time.perf_counter() - started
        rec["text"] = "".join(parts)
        return rec

    async def worker() -> None:
        nonlocal next_index
        while next_index < len(indices):
            i = next_index
            next_index += 1
            records[i] = await one(indices[i])

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"records": records, "wall_s": time.perf_counter() - started}


# --profile: tuneloop functions in the HTTP path (some on the event loop, the
# store and the key lookup in worker threads), timed by wrapping.
PROFILED = [
    ("server.deps", None, "user_for_api_key"),
    ("server.answers", "AnswerService", "_store_claimed"),
    ("server.answers", "AnswerService", "_claim"),
    ("server.answers", "AnswerService", "_finish"),
    ("server.answers", "AnswerService", "check_context_fits"),
    ("server.engine.vllm_engine", "VllmChatEngine", "prompt_token_ids"),
    ("server.adapters", "AdapterRegistry", "plan_in_db"),
]


class Profiler:
    """Wall time of the PROFILED functions, and event-loop lag (how late a 5 ms
    sleep wakes up: time the loop spent blocked), per mode run."""

    def __init__(self) -> None:
        import importlib

        self.calls: dict[str, list[float]] = {}
        self.lags: list[float] = []
        for module_name, owner_name, name in PROFILED:
            module = importlib.import_module(module_name)
            owner = getattr(module, owner_name) if owner_name else module
            label = f"{owner_name + '.' if owner_name else ''}{name}"
            setattr(owner, name, self._timed(label, getattr(owner, name)))

    def _timed(self, label: str, fn):
        import functools

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.calls.setdefault(label, []).append(time.perf_counter() - started)

        return wrapper

    async def watch_loop(self) -> None:
        import asyncio

        while True:
            started = time.perf_counter()
            await asyncio.sleep(0.005)
            self.lags.append(time.perf_counter() - started - 0.005)

    def take(self) -> dict[str, Any]:
        calls, self.calls = self.calls, {}
        lags, self.lags = self.lags, []
        return {
            "functions_ms": {
                label: {"calls": len(v), "mean": r(1000 * sum(v) / len(v), 2), "max": r(1000 * max(v), 1),
                        "total": r(1000 * sum(v), 1)}
                for label, v in sorted(calls.items())
            },
            "loop_lag_ms": {"p50": r(1000 * (pct(lags, 50) or 0), 2), "p99": r(1000 * (pct(lags, 99) or 0), 1),
                            "max": r(1000 * max(lags), 1) if lags else None,
                            "blocked_total": r(1000 * sum(x for x in lags if x > 0.002), 0)},
        }


def _tok_s(run: dict[str, Any]) -> float:
    tokens = sum(rec["completion_tokens"] or 0 for rec in run["records"] if rec["ok"])
    return tokens / run["wall_s"] if run["wall_s"] else 0.0


def mode_stats(runs: list[dict[str, Any]]) -> dict[str, Any]:
    records = [rec for run in runs for rec in run["records"]]
    ok = [rec for rec in records if rec["ok"]]
    tokens = sum(rec["completion_tokens"] or 0 for rec in ok)
    wall = sum(run["wall_s"] for run in runs)
    ttfts = [rec["ttft"] * 1000 for rec in ok if rec["ttft"] is not None]
    latencies = [rec["latency"] * 1000 for rec in ok]
    server_cpu = sum(run["server_cpu_s"] for run in runs)
    decode = [
        (rec["completion_tokens"] - 1) / (rec["latency"] - rec["ttft"])
        for rec in ok
        if rec["ttft"] is not None and (rec["completion_tokens"] or 0) > 1 and rec["latency"] > rec["ttft"]
    ]
    stats = {
        "requests": len(records),
        "failed": len(records) - len(ok),
        "completion_tokens": tokens,
        "wall_s": r(wall, 2),
        "tok_s": r(tokens / wall if wall else 0.0, 2),
        "ttft_p50_ms": r(pct(ttfts, 50), 1),
        "ttft_p90_ms": r(pct(ttfts, 90), 1),
        "latency_p50_ms": r(pct(latencies, 50), 0),
        "per_stream_decode_tok_s_p50": r(pct(decode, 50), 2),
        "server_cpu_ms_per_request": r(1000 * server_cpu / max(1, len(records)), 1),
    }
    client_cpu = [run.get("client_cpu_s") for run in runs if run.get("client_cpu_s") is not None]
    if client_cpu:
        stats["client_cpu_ms_per_request"] = r(1000 * sum(client_cpu) / max(1, len(records)), 1)
    if runs and "profile" in runs[0]:
        stats["profile"] = [run["profile"] for run in runs]
    errors = [rec["error"] for rec in records if not rec["ok"]]
    if errors:
        stats["errors"] = errors[:5]
    return stats


def compare(runs: list[dict[str, Any]], base_runs: list[dict[str, Any]], stats: dict[str, Any],
            base: dict[str, Any]) -> dict[str, Any]:
    """tuneloop against one baseline: throughput ratio (all and per repetition),
    TTFT added at p50, answers identical to the baseline's, targets met."""
    ratio = stats["tok_s"] / base["tok_s"] if base["tok_s"] else None
    added = (stats["ttft_p50_ms"] - base["ttft_p50_ms"]) if None not in (stats["ttft_p50_ms"], base["ttft_p50_ms"]) \
        else None
    pairs = zip([rec for run in runs for rec in run["records"]],
                [rec for run in base_runs for rec in run["records"]], strict=True)
    same = sum(1 for a, b in pairs if a["ok"] and b["ok"] and a["text"] == b["text"])
    return {
        "throughput_ratio": r(ratio, 3),
        "throughput_ratio_per_rep": [r(_tok_s(a) / _tok_s(b), 3) if _tok_s(b) else None
                                     for a, b in zip(runs, base_runs, strict=True)],
        "added_ttft_ms": r(added, 1),
        "identical_answers": f"{same}/{stats['requests']}",
        "meets_targets": bool(ratio is not None and ratio >= 0.95 and added is not None and added <= 10.0),
    }


def main() -> int:
    emit = claim_stdout()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short run (~5 min on 2 cores)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data dir")
    parser.add_argument("--adapter", help="PEFT LoRA folder to serve in both modes (default: base model)")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated levels (default 1,4,16)")
    parser.add_argument("--max-tokens", type=int, help="tokens per answer (default 64 quick, 128 full)")
    parser.add_argument("--reps", type=int, help="repetitions per level, modes rotating (default 2 quick, 4 full)")
    parser.add_argument("--modes", default="tuneloop,vllm_http,direct",
                        help="which of tuneloop, vllm_http, direct to run (default all three)")
    parser.add_argument("--waves", type=int, default=1,
                        help="requests per mode run = max(2, concurrency) * waves (default 1)")
    parser.add_argument("--model", help="model folder (default: the packaged SmolLM2-135M-Instruct)")
    parser.add_argument("--profile", action="store_true",
                        help="time tuneloop's blocking functions on the event loop and the loop's lag, per run")
    args = parser.parse_args()
    quick = args.quick
    max_tokens = args.max_tokens or (64 if quick else 128)
    reps = args.reps or (2 if quick else 4)
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]

    data_dir = temp_data_dir("serving")
    overrides: dict[str, Any] = {"max_new_tokens": max(512, max_tokens)}
    if args.model:
        overrides["model"] = args.model
    settings = bench_settings(data_dir, **overrides)
    log("data dir %s, model %s, max_tokens %d, reps %d, levels %s", data_dir, settings.model, max_tokens, reps, levels)

    client = ClientProcess()
    loop_thread = start_loop_thread()
    engine = start_vllm_engine(settings, loop_thread)
    server = vllm_server = None
    try:
        adapter = None
        if args.adapter:
            from store.db import session_scope
            from store.tables import AdapterVersion, utcnow

            create_tables(settings)
            with session_scope(make_db(settings)) as session:
                session.add(AdapterVersion(version=1, path=str(Path(args.adapter).resolve()), status="active",
                                           activated_at=utcnow()))
        profiler = Profiler() if args.profile else None
        server = start_server(settings, loop_thread, engine)

        headers = {"Authorization": f"Bearer {server.api_key('bench-serving')}"}
        if args.adapter:
            deadline = time.monotonic() + 120
            while server.app.state.adapters.active is None:
                if time.monotonic() > deadline:
                    raise RuntimeError("the adapter did not become active within 120 s (see the log)")
                time.sleep(0.2)
            adapter = server.app.state.adapters.active
            log("serving adapter %s from %s", adapter.name, adapter.path)

        vllm_url, vllm_server = start_vllm_http_server(engine, loop_thread, settings, adapter)

        # Warm-up: every prompt once directly (fills the prefix cache for both
        # modes alike), and the HTTP path (first-request costs, connections).
        log("warm-up")
        all_prompts = list(range(len(PROMPTS)))
        loop_thread.run(direct_round(engine, adapter, all_prompts, 4, len(PROMPTS)), timeout=600)
        for url in (server.base_url, vllm_url):  # first-request costs of both servers
            client.call("bench._common:chat_round", timeout=600, base_url=url, headers=headers,
                        bodies=[http_body(i, 4) for i in range(4)], concurrency=4)

        if profiler is not None:
            loop_thread.loop.call_soon_threadsafe(lambda: loop_thread.loop.create_task(profiler.watch_loop()))
            profiler.take()
        results = []
        modes = [m for m in ("tuneloop", "vllm_http", "direct") if m in args.modes.split(",")]
        for level_index, concurrency in enumerate(levels):
            runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
            n = max(2, concurrency) * args.waves
            for rep in range(reps):
                indices = [(rep * n + i) % len(PROMPTS) for i in range(n)]
                shift = (rep + level_index) % len(modes)  # who goes first rotates
                for mode in modes[shift:] + modes[:shift]:
                    cpu0 = cpu_seconds()
                    if mode == "direct":
                        run = loop_thread.run(direct_round(engine, adapter, indices, max_tokens, concurrency),
                                              timeout=1800)
                    else:
                        run = client.call(
                            "bench._common:chat_round", timeout=1800,
                            base_url=server.base_url if mode == "tuneloop" else vllm_url,
                            headers=headers, bodies=[http_body(i, max_tokens) for i in indices],
                            concurrency=concurrency,
                        )
                    run["server_cpu_s"] = cpu_seconds() - cpu0
                    if profiler is not None:
                        run["profile"] = profiler.take()
                    runs[mode].append(run)
                    toks = sum(rec["completion_tokens"] or 0 for rec in run["records"] if rec["ok"])
                    log("c=%d rep %d %-9s %d req, %d tokens in %.1f s = %.1f tok/s", concurrency, rep, mode,
                        len(indices), toks, run["wall_s"], toks / run["wall_s"])
            stats = {mode: mode_stats(runs[mode]) for mode in modes}
            level: dict[str, Any] = {"concurrency": concurrency, **stats}
            for base in ("direct", "vllm_http"):
                if "tuneloop" in runs and base in runs:
                    level[f"vs_{base}"] = compare(runs["tuneloop"], runs[base], stats["tuneloop"], stats[base])
                    log("c=%d: against %s: throughput ratio %s, added TTFT %s ms", concurrency, base,
                        level[f"vs_{base}"]["throughput_ratio"], level[f"vs_{base}"]["added_ttft_ms"])
            level["meets_targets"] = level.get("vs_direct", {}).get("meets_targets", False)
            results.append(level)

        failed = sum(level[mode]["failed"] for level in results for mode in modes)
        emit({
            "bench": "serving",
            "mode": "quick" if quick else "full",
            "model": Path(settings.model).name,
            "adapter": adapter.name if adapter else None,
            "serving_mode": "merged" if engine.merged else "lora",
            "max_tokens": max_tokens,
            "temperature": 0,
            "reps": reps,
            "levels": results,
            "targets": {"throughput_ratio_min": 0.95, "added_ttft_ms_max": 10.0},
            "all_targets_met": all(level["meets_targets"] for level in results),
            "all_targets_met_vs_vllm_http": all(level.get("vs_vllm_http", {}).get("meets_targets", False)
                                                for level in results),
            "failed_requests": failed,
            "machine_at_end": machine(),
            "note": "tuneloop and vllm_http (vLLM's own OpenAI server on the same engine and loop) = HTTP "
                    "SSE from a separate client process on the same 2 cores; direct = VllmChatEngine.generate "
                    "coroutines on the engine loop (no HTTP, no client); compare within this run only",
        })
        return 0
    finally:
        if server is not None:
            server.stop()
        if vllm_server is not None:
            vllm_server.should_exit = True
        client.close()
        try:
            loop_thread.run(engine.shutdown(), timeout=120)
        except Exception as exc:  # noqa: BLE001
            log("engine shutdown: %s", exc)
        loop_thread.stop()
        if not args.keep:
            shutil.rmtree(data_dir, ignore_errors=True)


def make_db(settings):
    from store.db import make_engine

    return make_engine(settings.resolved_database_url)


def create_tables(settings) -> None:
    from store.db import upgrade

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url)


if __name__ == "__main__":
    sys.exit(main())
