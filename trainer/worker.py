"""``tuneloop trainer``: a worker that trains where the GPU is.

With ``TUNELOOP_TRAINER=workers`` the servers only queue retraining runs. A
worker runs on any machine that reaches the database and the shared data folder
(``TUNELOOP_DATA_DIR``: the adapters it writes are read from there by every
server and vLLM replica). It claims the oldest queued run
(``store.run_lease.claim_queued_run``: ``SELECT ... FOR UPDATE SKIP LOCKED``, so
several workers never take the same run) and trains it exactly as the embedded
default does, in a child process (``store.run_process``) under the same lease and
heartbeat -- a worker killed mid-run leaves a child that finishes on its own, and
a child killed stops heartbeating, so its run is failed and the next one goes
ahead. One run at a time per worker: the retrain lease allows one run in the
whole deployment anyway; more workers are for availability, not throughput.

The run uses the worker's own settings (its ``TUNELOOP_*`` environment: model,
training hyperparameters, QLoRA), so the training configuration lives beside
the hardware it suits.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading

from sqlalchemy.engine import Engine

from store.db import make_engine, upgrade
from store.run_lease import claim_queued_run
from store.run_process import spawn_cycle
from store.settings import Settings

log = logging.getLogger("tuneloop.trainer.worker")


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"[:200]


def run_one(settings: Settings, db: Engine, name: str) -> int | None:
    """Claim one queued run and train it to its end; its id, or None when the
    queue is empty."""
    run_id = claim_queued_run(db, name)
    if run_id is None:
        return None
    log.info("worker %s claimed run %d", name, run_id)
    started = spawn_cycle(settings, db, run_id)
    started.watcher.join()  # it waits for the child (or kills it at the timeout) and fails a run left unfinished
    log.info("run %d ended (log: %s)", run_id, started.log_path)
    return run_id


def serve_forever(settings: Settings, stop: threading.Event | None = None, once: bool = False) -> int:
    """Claim and run queued runs until ``stop`` is set (SIGTERM/SIGINT when run
    from the command line); ``once``: return after the queue was empty once or
    one run ended. Returns how many runs it took."""
    stop = stop or threading.Event()
    upgrade(settings.resolved_database_url)
    db = make_engine(settings.resolved_database_url)
    name = worker_name()
    taken = 0
    log.info("trainer worker %s: waiting for queued runs (every %.1f s)", name, settings.trainer_poll_seconds)
    try:
        while not stop.is_set():
            try:
                run_id = run_one(settings, db, name)
            except Exception:  # a database blip must not end the worker: it tries again
                log.exception("worker %s: claiming or starting a run failed; retrying", name)
                run_id = None
            taken += run_id is not None
            if once:
                break
            if run_id is None:
                stop.wait(settings.trainer_poll_seconds)
    finally:
        db.dispose()
    return taken


def main(settings: Settings, once: bool = False) -> int:
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    return serve_forever(settings, stop, once=once)
