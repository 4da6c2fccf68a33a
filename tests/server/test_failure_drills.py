"""Failure drills that fit CI time: a locked or full database gives a clear
error and no partial rows; a server killed with SIGKILL during a burst of
feedback writes keeps every acknowledged write; damaged adapter folders are
refused before they reach the engine."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import sqlite3
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from safetensors.numpy import save_file
from sqlalchemy import event
from sqlmodel import Session, func, select

from server.app import create_app
from server.identity import create_api_key
from store.adapter_files import AdapterFilesError, check_servable
from store.conversations import add_message, start_conversation
from store.db import make_engine, session_scope, upgrade
from store.tables import Feedback, User
from tests.conftest import REPO, make_settings
from tests.support.live import free_port


def _answers(db, user_id: int, n: int) -> list[int]:
    with session_scope(db) as session:
        user = session.get(User, user_id)
        conversation = start_conversation(session, user, "api", "q")
        question = add_message(session, conversation, None, "user", "q")
        return [add_message(session, conversation, question.id, "assistant", f"a{i}").id for i in range(n)]


def _api_user(db) -> tuple[int, str]:
    with session_scope(db) as session:
        row, key = create_api_key(session, "drill")
        return row.user_id, key


def _feedback_count(db) -> int:
    with Session(db) as session:
        return session.exec(select(func.count()).select_from(Feedback)).one()


def test_locked_database_gives_503_and_no_row(tmp_path):
    settings = make_settings(tmp_path, db_busy_timeout_seconds=0.5)
    app = create_app(settings)
    user_id, key = _api_user(app.state.db)
    (message_id,) = _answers(app.state.db, user_id, 1)
    blocker = sqlite3.connect(settings.resolved_database_url.removeprefix("sqlite:///"), timeout=0.1)
    blocker.execute("BEGIN EXCLUSIVE")
    with TestClient(app) as client:
        response = client.post(f"/api/messages/{message_id}/feedback", json={"rating": "up"},
                               headers={"Authorization": f"Bearer {key}"})
    blocker.rollback()
    blocker.close()
    assert response.status_code == 503
    assert "database is locked" in response.json()["error"]["message"]
    assert "nothing was saved" in response.json()["error"]["message"]
    assert _feedback_count(app.state.db) == 0


def test_full_disk_gives_503_and_only_whole_rows(tmp_path):
    """SQLite reports a full disk as SQLITE_FULL; ``max_page_count`` produces exactly that."""
    settings = make_settings(tmp_path)
    app = create_app(settings)
    user_id, key = _api_user(app.state.db)
    message_ids = _answers(app.state.db, user_id, 200)
    with app.state.db.connect() as conn:
        pages = conn.exec_driver_sql("PRAGMA page_count").scalar()

    @event.listens_for(app.state.db, "connect")
    def _cap(dbapi_connection, _record):
        dbapi_connection.execute(f"PRAGMA max_page_count={pages + 2}")

    app.state.db.dispose()
    acked, refused = [], None
    with TestClient(app) as client:
        for message_id in message_ids:
            response = client.post(f"/api/messages/{message_id}/feedback", headers={"Authorization": f"Bearer {key}"},
                                   json={"rating": "up", "comment": "long reason " * 150})
            if response.status_code == 200:
                acked.append(message_id)
            else:
                refused = response
                break
    assert refused is not None and refused.status_code == 503
    assert "full" in refused.json()["error"]["message"] and "nothing was saved" in refused.json()["error"]["message"]
    with Session(app.state.db) as session:
        rows = session.exec(select(Feedback)).all()
    assert sorted(r.message_id for r in rows) == sorted(acked)
    assert all(r.comment == ("long reason " * 150).strip() for r in rows)


def test_sigkill_during_a_burst_of_feedback_keeps_every_acknowledged_write(tmp_path):
    settings = make_settings(tmp_path)
    upgrade(settings.resolved_database_url)
    db = make_engine(settings.resolved_database_url)
    user_id, key = _api_user(db)
    message_ids = _answers(db, user_id, 400)
    port = free_port()
    env = {**os.environ, "TUNELOOP_DATA_DIR": str(settings.data_dir), "TUNELOOP_ENGINE": "fake",
           "TUNELOOP_PORT": str(port), "TUNELOOP_SCHEDULER": "false"}

    def serve() -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-m", "server.cli", "serve"], cwd=REPO, env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    return process
            except httpx.HTTPError:
                time.sleep(0.2)
        process.kill()
        raise AssertionError("server did not start")

    server = serve()
    acked: set[int] = set()

    def post(message_id: int) -> None:
        try:
            response = httpx.post(f"http://127.0.0.1:{port}/api/messages/{message_id}/feedback",
                                  headers={"Authorization": f"Bearer {key}"}, json={"rating": "down"}, timeout=5)
        except httpx.HTTPError:
            return
        if response.status_code == 200:
            acked.add(message_id)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(post, m) for m in message_ids]
        while len(acked) < 60:
            time.sleep(0.01)
        os.kill(server.pid, signal.SIGKILL)
        concurrent.futures.wait(futures)
    server.wait()
    assert 60 <= len(acked) < len(message_ids)
    restarted = serve()
    try:
        with Session(db) as session:
            stored = set(session.exec(select(Feedback.message_id)).all())
    finally:
        restarted.terminate()
        restarted.wait(timeout=30)
    assert acked <= stored


def _adapter(folder, weights: dict, config: dict | None = None):
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(
        __import__("json").dumps(config or {"peft_type": "LORA", "r": 8, "lora_alpha": 16})
    )
    save_file(weights, str(folder / "adapter_model.safetensors"))
    return folder


def test_damaged_adapter_folders_are_refused(tmp_path):
    good = {"a.lora_A.weight": np.ones((8, 16), dtype=np.float32)}
    check_servable(_adapter(tmp_path / "good", good), max_rank=16)
    nan = {"a.lora_A.weight": np.full((8, 16), np.nan, dtype=np.float32)}
    with pytest.raises(AdapterFilesError, match="NaN"):
        check_servable(_adapter(tmp_path / "nan", nan), max_rank=16)
    with pytest.raises(AdapterFilesError, match="rank 32"):
        check_servable(_adapter(tmp_path / "big", good, {"peft_type": "LORA", "r": 32}), max_rank=16)
    with pytest.raises(AdapterFilesError, match="DoRA"):
        check_servable(_adapter(tmp_path / "dora", good, {"peft_type": "LORA", "r": 8, "use_dora": True}), 16)
    corrupt = _adapter(tmp_path / "corrupt", good)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(AdapterFilesError, match="safetensors"):
        check_servable(corrupt, max_rank=16)
    with pytest.raises(AdapterFilesError, match="lacks"):
        check_servable(tmp_path / "missing", max_rank=16)
