"""Starting retraining cycles, from the scheduler, the admin API or the CLI.

``start_cycle`` creates the ``TrainingRun`` row and takes the ``retrain`` lease
for it in one transaction, so of two requests at once exactly one gets a run
(the other gets ``CycleBusy`` naming the run in progress), even across server
processes. The cycle itself runs in a separate process (``python -m trainer``):
a crash there, even an out-of-memory kill, never touches serving. A watcher
thread marks the run failed if that process exits without finishing it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from server import leases
from server.db import session_scope
from server.models import TrainingRun, utcnow
from server.settings import Settings

REPO_ROOT = Path(__file__).resolve().parent.parent
LEASE_TTL_S = 60.0  # trainer.cycle renews it every 10 s
SECRET_FIELDS = {"admin_token", "secret_key", "env"}


class CycleBusy(Exception):
    def __init__(self, run_id: int | None) -> None:
        super().__init__(f"retraining run {run_id} is already in progress")
        self.run_id = run_id


@dataclass
class StartedCycle:
    run_id: int
    process: subprocess.Popen
    log_path: Path


def _holder_run_id(holder: str | None) -> int | None:
    if holder and holder.startswith("run:") and holder[4:].isdigit():
        return int(holder[4:])
    return None


def reap_stale_runs(session: Session, now=None) -> list[int]:
    """Mark runs failed whose process stopped renewing its heartbeat (killed,
    crashed, machine restarted). Returns their ids."""
    now = now or utcnow()
    stale_before = now - timedelta(seconds=LEASE_TTL_S * 2)
    reaped = []
    for run in session.exec(select(TrainingRun).where(col(TrainingRun.status).in_(("queued", "running")))).all():
        last = run.heartbeat_at or run.started_at or run.created_at
        if last.tzinfo is None:
            last = last.replace(tzinfo=now.tzinfo)
        if last < stale_before:
            run.status = "failed"
            run.finished_at = now
            run.error = (run.error or "") + "the training process stopped responding (killed or crashed)"
            session.add(run)
            reaped.append(run.id)
    return reaped


def _settings_file(settings: Settings, run_id: int) -> Path:
    """The trainer gets the server's settings (minus secrets) in a file: tests and
    embedders build Settings in code, so the environment alone is not enough."""
    settings.runs_dir.mkdir(parents=True, exist_ok=True)
    path = settings.runs_dir / f"run-{run_id}.settings.json"
    data = json.loads(settings.model_dump_json(exclude=SECRET_FIELDS))
    data["database_url"] = settings.resolved_database_url
    data["data_dir"] = str(settings.data_dir.resolve())
    path.write_text(json.dumps(data, indent=2))
    return path


def start_cycle(settings: Settings, db: Engine, trigger: str) -> StartedCycle:
    """Create a run, take the lease, and start the trainer process for it.
    Raises CycleBusy if another cycle holds the lease."""
    with session_scope(db) as session:
        reap_stale_runs(session)
    with session_scope(db) as session:
        run = TrainingRun(status="queued", trigger=trigger)
        session.add(run)
        session.flush()
        if not leases.acquire(session, leases.RETRAIN, f"run:{run.id}", LEASE_TTL_S):
            holder = leases.current_holder(session, leases.RETRAIN)
            session.rollback()
            raise CycleBusy(_holder_run_id(holder))
        run_id = run.id
    settings_path = _settings_file(settings, run_id)
    log_path = settings.runs_dir / f"run-{run_id}.log"
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "trainer", "run", "--run-id", str(run_id), "--settings", str(settings_path)],
            stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=str(REPO_ROOT), env=env, start_new_session=True,
        )
    with session_scope(db) as session:
        row = session.get(TrainingRun, run_id)
        row.pid = process.pid
        session.add(row)
    threading.Thread(
        target=_watch_process, args=(db, run_id, process, log_path, settings.run_timeout_minutes),
        name=f"run-{run_id}-watch", daemon=True,
    ).start()
    return StartedCycle(run_id=run_id, process=process, log_path=log_path)


def _watch_process(db: Engine, run_id: int, process: subprocess.Popen, log_path: Path, timeout_minutes: int) -> None:
    try:
        code = process.wait(timeout=timeout_minutes * 60)
    except subprocess.TimeoutExpired:
        process.kill()
        code = process.wait()
        reason = f"killed after running longer than {timeout_minutes} minutes (TUNELOOP_RUN_TIMEOUT_MINUTES)"
    else:
        reason = f"the training process exited with code {code}"
    with session_scope(db) as session:
        run = session.get(TrainingRun, run_id)
        if run is not None and run.status in ("queued", "running"):
            run.status = "failed"
            run.finished_at = utcnow()
            run.error = f"{reason}; log tail:\n{_tail(log_path)}"
            session.add(run)
        leases.release(session, leases.RETRAIN, f"run:{run_id}")


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"
