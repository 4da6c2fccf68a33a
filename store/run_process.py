"""A run's trainer process: starting one retraining cycle in its own process,
and watching it.

Both places that run training use this, so it lives where server and trainer
meet: the server's embedded default (``server.retraining``,
``TUNELOOP_TRAINER=local``) and the trainer worker (``trainer.worker``). It
starts the trainer by module name and imports nothing of it. The cycle runs as ``python -m trainer run``: a crash
there, even an out-of-memory kill, never touches the process that started it.
A watcher thread kills it after ``TUNELOOP_RUN_TIMEOUT_MINUTES`` and marks the
run failed if it exits without finishing it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import Engine

from store.db import session_scope
from store.run_lease import release_run
from store.settings import Settings
from store.tables import TrainingRun, utcnow

REPO_ROOT = Path(__file__).resolve().parent.parent
SECRET_FIELDS = {"admin_token", "secret_key", "env"}


@dataclass
class StartedCycle:
    run_id: int
    process: subprocess.Popen | None  # None: queued for a trainer worker (TUNELOOP_TRAINER=workers)
    log_path: Path | None
    watcher: threading.Thread | None = None  # marks the run failed if the trainer dies; removes its settings file


def settings_file(settings: Settings, run_id: int) -> Path:
    """The trainer gets its starter's settings (minus secrets) in a file: tests and
    embedders build Settings in code, so the environment alone is not enough.
    The database URL may hold a password: the file is readable by this user
    only, and the run's watcher deletes it when the trainer exits."""
    settings.runs_dir.mkdir(parents=True, exist_ok=True)
    path = settings.runs_dir / f"run-{run_id}.settings.json"
    data = json.loads(settings.model_dump_json(exclude=SECRET_FIELDS))
    data["database_url"] = settings.resolved_database_url
    data["data_dir"] = str(settings.data_dir.resolve())
    path.unlink(missing_ok=True)  # O_CREAT's mode applies only to a new file
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(json.dumps(data, indent=2))
    return path


def spawn_cycle(settings: Settings, db: Engine, run_id: int) -> StartedCycle:
    """Start ``python -m trainer run`` for the (queued) run ``run_id`` and a
    thread watching it."""
    settings_path = settings_file(settings, run_id)
    log_path = settings.runs_dir / f"run-{run_id}.log"
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    try:
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "trainer", "run", "--run-id", str(run_id), "--settings", str(settings_path)],
                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=str(REPO_ROOT), env=env, start_new_session=True,
            )
    except BaseException:
        settings_path.unlink(missing_ok=True)
        raise
    with session_scope(db) as session:
        row = session.get(TrainingRun, run_id)
        row.pid = process.pid
        session.add(row)
    watcher = threading.Thread(
        target=watch_process, args=(db, run_id, process, log_path, settings_path, settings.run_timeout_minutes),
        name=f"run-{run_id}-watch", daemon=True,
    )
    watcher.start()
    return StartedCycle(run_id=run_id, process=process, log_path=log_path, watcher=watcher)


def watch_process(
    db: Engine, run_id: int, process: subprocess.Popen, log_path: Path, settings_path: Path, timeout_minutes: int
) -> None:
    try:
        code = process.wait(timeout=timeout_minutes * 60)
    except subprocess.TimeoutExpired:
        process.kill()
        code = process.wait()
        reason = f"killed after running longer than {timeout_minutes} minutes (TUNELOOP_RUN_TIMEOUT_MINUTES)"
    else:
        reason = f"the training process exited with code {code}"
    settings_path.unlink(missing_ok=True)
    with session_scope(db) as session:
        run = session.get(TrainingRun, run_id)
        if run is not None and run.status in ("queued", "running"):
            run.status = "failed"
            run.finished_at = utcnow()
            run.error = f"{reason}; log tail:\n{tail(log_path)}"
            session.add(run)
        release_run(session, run_id)


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"
