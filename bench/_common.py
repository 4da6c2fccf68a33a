"""Shared helpers for the benchmarks in ``bench/``.

Each benchmark is a script (``.venv/bin/python bench/NAME.py [--quick]``) that
prints exactly one JSON line, last, on stdout; everything else (its own
progress, vLLM's logs, child processes) goes to stderr. Helpers here:

- :func:`claim_stdout` moves fd 1 to stderr and returns the function that
  prints the final JSON line on the real stdout;
- :func:`bench_settings`, :func:`start_server`, :func:`start_vllm_engine`:
  a tuneloop app on a temporary data dir, served by uvicorn on the loop that
  owns the engine (as ``tests/support/live.py`` does), API keys;
- :class:`ClientProcess`: HTTP load from a separate process (own GIL), so the
  client's CPU work does not run on the server's interpreter;
- :func:`stream_chat`: one streamed ``/v1/chat/completions`` call, timed;
- :func:`pct`, :func:`summary`: percentiles.

Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib
import json
import math
import os
import resource
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_MODEL = os.environ.get("TUNELOOP_MODEL", str(REPO / "models/smollm2-135m-instruct"))
ADMIN_TOKEN = "dev-admin-token"
ENGINE_START_TIMEOUT_S = 900

_T0 = time.monotonic()


def log(message: str, *args: Any) -> None:
    text = message % args if args else message
    sys.stderr.write(f"[bench {time.monotonic() - _T0:7.1f}s] {text}\n")
    sys.stderr.flush()


def claim_stdout() -> Callable[[dict[str, Any]], None]:
    """Send everything written to fd 1 from now on (prints, logging, spawned
    vLLM processes) to stderr; return ``emit(summary)``, which writes the one
    JSON line to the original stdout."""
    sys.stdout.flush()
    real = os.dup(1)
    os.dup2(2, 1)

    def emit(summary: dict[str, Any]) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        line = json.dumps(summary, sort_keys=False, default=_json_default) + "\n"
        os.write(real, line.encode())

    return emit


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def machine() -> dict[str, Any]:
    """CPU count and load average, so a reader can tell a run on a busy machine."""
    one, five, _ = os.getloadavg()
    return {"cpus": os.cpu_count(), "loadavg_1m": round(one, 2), "loadavg_5m": round(five, 2)}


# -- statistics -----------------------------------------------------------------


def pct(values: Sequence[float], p: float) -> float | None:
    """The ``p``-th percentile (0-100, linear interpolation); None if empty."""
    data = sorted(v for v in values if v is not None)
    if not data:
        return None
    if len(data) == 1:
        return data[0]
    rank = (len(data) - 1) * p / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (rank - low)


def r(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def summary_ms(values_s: Sequence[float]) -> dict[str, float | None]:
    """p50/p90/p99/max of durations given in seconds, in milliseconds."""
    ms = [v * 1000.0 for v in values_s if v is not None]
    return {
        "n": len(ms),
        "p50": r(pct(ms, 50), 1),
        "p90": r(pct(ms, 90), 1),
        "p99": r(pct(ms, 99), 1),
        "max": r(max(ms), 1) if ms else None,
    }


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- servers ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def temp_data_dir(name: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"tuneloop-bench-{name}-"))


def bench_settings(data_dir: Path, **overrides: Any):
    from store.settings import Settings

    values: dict[str, Any] = {
        "data_dir": data_dir,
        "engine": "vllm",
        "model": DEFAULT_MODEL,
        "ab_rate": 0.0,
        "scheduler": False,
        # Benchmarks drive far more traffic per identity than a person: the
        # limits are off unless a bench is about them (bench/hostile.py).
        "rate_limits": False,
        "max_concurrent_generations": 0,
    }
    values.update(overrides)
    return Settings(**values)


def start_loop_thread():
    from server.engine.loop_thread import EngineThread

    return EngineThread(name="bench-engine-loop").start()


def start_vllm_engine(settings, loop_thread):
    """Build and start a VllmChatEngine on ``loop_thread``'s loop (30-90 s)."""
    from server.engine.vllm_engine import VllmChatEngine

    if not Path(settings.model, "config.json").is_file():
        raise SystemExit(f"model folder {settings.model} is missing: run `make setup` first")
    engine = VllmChatEngine(settings)
    started = time.monotonic()
    loop_thread.run(engine.start(), timeout=ENGINE_START_TIMEOUT_S)
    log("vLLM engine ready in %.1f s", time.monotonic() - started)
    return engine


@dataclass
class BenchServer:
    app: Any
    base_url: str
    server: Any
    loop_thread: Any
    serving: concurrent.futures.Future

    @property
    def db(self):
        return self.app.state.db

    def api_key(self, name: str = "bench") -> str:
        from server.identity import create_api_key
        from store.db import session_scope

        with session_scope(self.db) as session:
            _, key = create_api_key(session, name)
        return key

    def stop(self) -> None:
        self.server.should_exit = True
        try:
            self.serving.result(timeout=30)
        except Exception as exc:  # noqa: BLE001 - shutting down anyway
            log("server stop: %s", exc)


def start_server(settings, loop_thread, engine=None, ready_timeout: float = 120) -> BenchServer:
    """Serve ``create_app(settings, engine)`` with uvicorn on ``loop_thread``'s
    loop (the loop owning ``engine``); wait until /healthz says ok."""
    import httpx
    import uvicorn

    from server.app import create_app

    app = create_app(settings, engine=engine)
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan="on",
        timeout_graceful_shutdown=2, access_log=False,
    )
    server = uvicorn.Server(config)
    serving = loop_thread.submit(server.serve())
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the bench server did not start within 30 s")
        if serving.done():
            serving.result()
        time.sleep(0.02)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_timeout
    while True:
        status = httpx.get(base_url + "/healthz", timeout=10).status_code
        if status == 200:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"/healthz still {status} after {ready_timeout:.0f} s")
        time.sleep(0.2)
    return BenchServer(app=app, base_url=base_url, server=server, loop_thread=loop_thread, serving=serving)


# -- HTTP clients in their own process -----------------------------------------------


class ClientProcess:
    """A spawned process that runs client jobs (``"module:function"`` coroutine
    functions taking ``(job, conn)``) and sends back their results. Its CPU
    time is reported with each result (``client_cpu_s``)."""

    def __init__(self) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_client_main, args=(child,), name="bench-client", daemon=True)
        self.proc.start()
        child.close()

    def start(self, fn: str, **job: Any) -> None:
        self.conn.send({"fn": fn, **job})

    def send(self, message: Any) -> None:
        self.conn.send(message)

    def result(self, timeout: float | None = None) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"client job gave no result within {timeout} s")
        reply = self.conn.recv()
        if isinstance(reply, dict) and "client_error" in reply:
            raise RuntimeError("client job failed:\n" + reply["client_error"])
        return reply

    def call(self, fn: str, timeout: float | None = None, **job: Any) -> Any:
        self.start(fn, **job)
        return self.result(timeout)

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            self.conn.send(None)
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)


def _client_main(conn) -> None:
    import traceback

    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        try:
            module, _, name = job["fn"].partition(":")
            fn = getattr(importlib.import_module(module), name)
            cpu0 = cpu_seconds()
            result = asyncio.run(fn(job, conn))
            if isinstance(result, dict):
                result["client_cpu_s"] = round(cpu_seconds() - cpu0, 3)
            conn.send(result)
        except BaseException:  # noqa: BLE001 - reported to the parent
            conn.send({"client_error": traceback.format_exc()})


async def stream_chat(client, headers: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
    """POST a streaming chat completion; time to first content delta and to the
    end; text, token count (``include_usage``), message id and any failure."""
    rec: dict[str, Any] = {
        "ok": False, "status": None, "ttft": None, "latency": None, "completion_tokens": None,
        "message_id": None, "error": None, "text": "", "t_start": time.time(), "t_first": None,
    }
    parts: list[str] = []
    done = False
    started = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as resp:
            rec["status"] = resp.status_code
            ids = resp.headers.get("x-tuneloop-message-id", "")
            rec["message_id"] = int(ids.split(",")[0]) if ids else None
            if resp.status_code != 200:
                rec["error"] = f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}"
                return rec
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    rec["error"] = f"in-band error: {event['error']}"
                    continue
                for choice in event.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        if rec["ttft"] is None:
                            rec["ttft"] = time.perf_counter() - started
                            rec["t_first"] = time.time()
                        parts.append(text)
                usage = event.get("usage")
                if usage:
                    rec["completion_tokens"] = usage.get("completion_tokens")
    except Exception as exc:  # noqa: BLE001 - a failed request is a result
        rec["error"] = f"{type(exc).__name__}: {exc}"
    rec["latency"] = time.perf_counter() - started
    rec["text"] = "".join(parts)
    if rec["error"] is None and not done:
        rec["error"] = "stream ended without [DONE]"
    rec["ok"] = rec["error"] is None
    return rec


def _http_client(base_url: str, connections: int, timeout: float = 600.0):
    import httpx

    limits = httpx.Limits(max_connections=connections + 4, max_keepalive_connections=connections + 4)
    return httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout)


async def chat_round(job: dict[str, Any], conn) -> dict[str, Any]:
    """Client job: send ``job["bodies"]`` with ``job["concurrency"]`` in flight
    (closed loop); returns per-request records and the wall time."""
    bodies = job["bodies"]
    concurrency = job["concurrency"]
    records: list[dict[str, Any] | None] = [None] * len(bodies)
    next_index = 0
    async with _http_client(job["base_url"], concurrency) as client:

        async def worker() -> None:
            nonlocal next_index
            while next_index < len(bodies):
                i = next_index
                next_index += 1
                records[i] = await stream_chat(client, job["headers"], bodies[i])

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return {"records": records, "wall_s": wall}


async def chat_load(job: dict[str, Any], conn) -> dict[str, Any]:
    """Client job: ``job["clients"]`` streaming clients, each sending the next
    of ``job["bodies"]`` (cycled) as soon as its last answer ended, until the
    parent sends ``"stop"``; then every in-flight request finishes."""
    bodies = job["bodies"]
    records: list[dict[str, Any]] = []
    stop = asyncio.Event()
    counter = 0

    async def wait_for_stop() -> None:
        message = await asyncio.get_running_loop().run_in_executor(None, conn.recv)
        if message != "stop":
            raise RuntimeError(f"chat_load expected 'stop', got {message!r}")
        stop.set()

    async with _http_client(job["base_url"], job["clients"]) as client:

        async def one_client(index: int) -> None:
            nonlocal counter
            while not stop.is_set():
                i = counter
                counter += 1
                body = bodies[i % len(bodies)]
                rec = await stream_chat(client, job["headers"], body)
                rec["prompt_index"] = i % len(bodies)
                rec["client"] = index
                records.append(rec)

        stopper = asyncio.create_task(wait_for_stop())
        started = time.perf_counter()
        await asyncio.gather(*(one_client(i) for i in range(job["clients"])))
        wall = time.perf_counter() - started
        await stopper
    return {"records": records, "wall_s": wall}
