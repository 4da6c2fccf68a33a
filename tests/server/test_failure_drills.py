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
import threading
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
from store.tables import Comparison, Feedback, User
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
    """SQLite reports a full disk as SQLITE_FULL; ``max_page_count`` produces exactly that.
    It is a pragma of each connection, set here on the server's engine, so the
    writer runs as a thread on that engine (a writer process opens its own)."""
    settings = make_settings(tmp_path, feedback_writer="thread")
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


def _comparisons(db, user_id: int, n: int) -> list[int]:
    with session_scope(db) as session:
        user = session.get(User, user_id)
        conversation = start_conversation(session, user, "api", "q")
        question = add_message(session, conversation, None, "user", "q")
        made = []
        for i in range(n):
            a, b = (add_message(session, conversation, question.id, "assistant", f"{side}{i}") for side in "ab")
            comparison = Comparison(user_id=user_id, conversation_id=conversation.id,
                                    message_a_id=a.id, message_b_id=b.id)
            session.add(comparison)
            session.flush()
            made.append(comparison.id)
        return made


def test_sigkill_during_a_burst_of_feedback_keeps_every_acknowledged_write(tmp_path):
    """16 clients change thumbs (rating and comment) and A/B choices over and
    over, each on targets of its own, through the group-commit writer; the
    server is killed mid-burst. For every target, the database holds its last
    acknowledged value -- or a later one whose request got no answer (it may
    have been committed just before the kill)."""
    settings = make_settings(tmp_path)
    upgrade(settings.resolved_database_url)
    db = make_engine(settings.resolved_database_url)
    user_id, key = _api_user(db)
    targets = [("m", m) for m in _answers(db, user_id, 300)] + [("c", c) for c in _comparisons(db, user_id, 100)]
    port = free_port()
    env = {**os.environ, "TUNELOOP_DATA_DIR": str(settings.data_dir), "TUNELOOP_ENGINE": "fake",
           "TUNELOOP_PORT": str(port), "TUNELOOP_SCHEDULER": "false", "TUNELOOP_RATE_LIMITS": "false"}

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
    killed = threading.Event()
    acked = 0
    history: dict[tuple[str, int], list[tuple[str, int | None]]] = {}  # target -> [(value, status)] in order
    lock = threading.Lock()

    def client(index: int) -> None:
        nonlocal acked
        mine = targets[index::16]
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=5) as http:
            for n in range(10_000):
                kind, target = mine[n % len(mine)]
                if kind == "m":
                    rating = ("up", "down")[(n // len(mine)) % 2]
                    value = f"{rating}|{index}-{n}"
                    path, body = f"/api/messages/{target}/feedback", {"rating": rating, "comment": f"{index}-{n}"}
                else:
                    value = ("a", "b", "tie", "both_bad")[(n // len(mine)) % 4]
                    path, body = f"/api/comparisons/{target}/choice", {"winner": value}
                try:
                    status = http.post(path, json=body).status_code
                except httpx.HTTPError:
                    status = None
                with lock:
                    history.setdefault((kind, target), []).append((value, status))
                    acked += status == 200
                if status is None and killed.is_set():
                    return

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(client, i) for i in range(16)]
        _wait_until(lambda: acked >= 400, timeout=120)
        os.kill(server.pid, signal.SIGKILL)
        killed.set()
        for future in futures:
            future.result()
    server.wait()
    assert acked >= 400
    restarted = serve()
    try:
        with Session(db) as session:
            thumbs = {f.message_id: f"{f.rating}|{f.comment}" for f in session.exec(select(Feedback))}
            choices = dict(session.exec(select(Comparison.id, Comparison.winner)).all())
    finally:
        restarted.terminate()
        restarted.wait(timeout=30)
    lost = []
    for (kind, target), writes in history.items():
        stored = thumbs.get(target) if kind == "m" else choices.get(target)
        last_acked = max((i for i, (_, status) in enumerate(writes) if status == 200), default=None)
        allowed = {writes[last_acked][0]} if last_acked is not None else {None}
        start = 0 if last_acked is None else last_acked + 1
        allowed |= {value for value, status in writes[start:] if status is None}  # no answer: either way
        if stored not in allowed:
            lost.append((kind, target, stored, writes[-3:]))
    assert lost == []
    assert sum(1 for writes in history.values() if any(status == 200 for _, status in writes)) > 100


def _wait_until(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.01)


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
