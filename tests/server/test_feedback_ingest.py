"""Feedback over HTTP goes through the group-commit writer: many concurrent
thumbs and choices are all acknowledged and all stored (with their pairs and
counters), and one bad write among them gets its own 4xx while the rest of its
batch commits. A live server (uvicorn, fake engine), SQLite and PostgreSQL."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import pytest
from sqlmodel import Session, select

from server.engine.fake import FakeChatEngine
from server.engine.loop_thread import EngineThread
from server.identity import create_api_key
from store.db import session_scope
from store.tables import Comparison, Conversation, Feedback, Message, PreferencePair, User
from tests.conftest import make_settings
from tests.support.live import start_live_server
from tests.support.write_lock import write_lock_held


@pytest.fixture
def server(tmp_path, database_url):
    loop = EngineThread().start()
    engine = FakeChatEngine()
    loop.run(engine.start())
    live = start_live_server(make_settings(tmp_path, database_url=database_url), engine, loop)
    yield live
    live.stop()
    loop.stop()


def _key(db, name: str) -> tuple[int, dict[str, str]]:
    with session_scope(db) as session:
        row, key = create_api_key(session, name)
        return row.user_id, {"Authorization": f"Bearer {key}"}


def _seed(db, user_id: int, answers: int, comparisons: int) -> tuple[list[int], list[int], dict[str, int]]:
    """Finished answers to one question, comparisons of two finished answers,
    and the odd ones: the question, a pending answer, a caller-written one."""
    with session_scope(db) as s:
        conversation = Conversation(user_id=user_id, source="api")
        s.add(conversation)
        s.flush()
        question = Message(conversation_id=conversation.id, role="user", content="Q?")
        s.add(question)
        s.flush()
        done = [Message(conversation_id=conversation.id, parent_id=question.id, role="assistant",
                        content=f"answer {i}") for i in range(answers)]
        pending = Message(conversation_id=conversation.id, parent_id=question.id, role="assistant",
                          status="pending")
        written = Message(conversation_id=conversation.id, parent_id=question.id, role="assistant",
                          content="mine", caller_written=True)
        s.add_all([*done, pending, written])
        s.flush()
        pairs = []
        for i in range(comparisons):
            a, b = (Message(conversation_id=conversation.id, parent_id=question.id, role="assistant",
                            content=f"{side} of {i}") for side in "ab")
            s.add_all([a, b])
            s.flush()
            pairs.append(Comparison(user_id=user_id, conversation_id=conversation.id,
                                    message_a_id=a.id, message_b_id=b.id))
        s.add_all(pairs)
        s.flush()
        odd = {"question": question.id, "pending": pending.id, "written": written.id}
        return [m.id for m in done], [c.id for c in pairs], odd




def _until(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.01)


def test_concurrent_feedback_is_all_acknowledged_and_stored(server):
    db = server.app.state.db
    user_id, headers = _key(db, "many")
    answers, comparisons, _ = _seed(db, user_id, answers=60, comparisons=40)
    writes = [("thumb", m, "up" if i % 3 else "down") for i, m in enumerate(answers)]
    writes += [("choice", c, ("a", "b", "tie", "both_bad")[i % 4]) for i, c in enumerate(comparisons)]

    def post(write) -> int:
        kind, target, value = write
        with httpx.Client(base_url=server.base_url, headers=headers, timeout=60) as http:
            if kind == "thumb":
                response = http.post(f"/api/messages/{target}/feedback",
                                     json={"rating": value, "comment": f"c{target}", "tags": ["Bench"]})
                assert response.json()["rating"] == value and response.json()["tags"] == ["bench"]
            else:
                response = http.post(f"/api/comparisons/{target}/choice", json={"winner": value})
                assert response.json()["winner"] == value
            return response.status_code

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        statuses = list(pool.map(post, writes))
    assert statuses == [200] * len(writes)
    writer = server.app.state.feedback.writer
    assert writer.committed == len(writes)
    with Session(db) as s:
        stored = {f.message_id: (f.rating, f.comment, f.tags) for f in s.exec(select(Feedback))}
        winners = dict(s.exec(select(Comparison.id, Comparison.winner)).all())
        pairs = s.exec(select(PreferencePair)).all()
    assert stored == {m: (value, f"c{m}", ["bench"]) for kind, m, value in writes if kind == "thumb"}
    assert winners == {c: value for kind, c, value in writes if kind == "choice"}
    ups = sum(1 for kind, _, value in writes if kind == "thumb" and value == "up")
    assert sum(1 for p in pairs if p.source == "thumbs") == ups * (len(answers) - ups)
    assert sum(1 for p in pairs if p.source == "comparison") == 20  # a and b make pairs; tie and both_bad don't
    metrics = httpx.get(server.base_url + "/metrics").text
    assert f'tuneloop_feedback_events_total{{kind="thumbs_up"}} {float(ups)}' in metrics
    assert 'tuneloop_feedback_events_total{kind="choice_tie"} 10.0' in metrics


def test_one_bad_write_in_a_batch_gets_its_own_error_and_the_others_commit(server, database_url):
    db = server.app.state.db
    user_id, alice = _key(db, "alice")
    _, bob = _key(db, "bob")
    answers, comparisons, odd = _seed(db, user_id, answers=8, comparisons=2)
    writer = server.app.state.feedback.writer
    thumb = "/api/messages/{}/feedback"
    choice = "/api/comparisons/{}/choice"
    calls = [  # (path, body, headers, expected status)
        (thumb.format(answers[1]), {"rating": "up"}, alice, 200),
        (thumb.format(answers[2]), {"rating": "up"}, bob, 404),  # not bob's
        (thumb.format(odd["question"]), {"rating": "up"}, alice, 400),
        (thumb.format(odd["pending"]), {"rating": "up"}, alice, 409),
        (thumb.format(odd["written"]), {"rating": "down"}, alice, 400),
        (thumb.format(2**64), {"rating": "up"}, alice, 404),  # beyond the database's integers
        (thumb.format(answers[3]), {"rating": "down", "comment": "no"}, alice, 200),
        (choice.format(comparisons[0]), {"winner": "a"}, bob, 404),
        (choice.format(comparisons[1]), {"winner": "b"}, alice, 200),
        (thumb.format(999_999), {"rating": "up"}, alice, 404),
        (thumb.format(answers[4]), {"rating": "up"}, alice, 200),
    ]

    def post(call) -> httpx.Response:
        path, body, headers, _ = call
        return httpx.post(server.base_url + path, json=body, headers=headers, timeout=60)

    with concurrent.futures.ThreadPoolExecutor(len(calls) + 1) as pool:
        with write_lock_held(database_url):
            first = pool.submit(post, (thumb.format(answers[0]), {"rating": "up"}, alice, 200))
            _until(lambda: writer.submitted == 1)
            time.sleep(0.2)  # the writer took it and waits for the lock; the rest queue behind as one batch
            responses = [pool.submit(post, call) for call in calls]
            _until(lambda: writer.submitted == 1 + len(calls))
            time.sleep(0.2)
            assert not first.done() and not any(r.done() for r in responses)  # nothing answered before its commit
        assert first.result().status_code == 200
        got = [r.result() for r in responses]
    assert [r.status_code for r in got] == [call[3] for call in calls], [r.text for r in got]
    assert all(r.json()["error"]["message"] for r in got if r.status_code != 200)
    assert writer.batches == 2
    with Session(db) as s:
        stored = {f.message_id: f.rating for f in s.exec(select(Feedback))}
        winners = dict(s.exec(select(Comparison.id, Comparison.winner)).all())
        users = {u.id for u in s.exec(select(User))}
    assert stored == {answers[0]: "up", answers[1]: "up", answers[3]: "down", answers[4]: "up"}
    assert winners == {comparisons[0]: None, comparisons[1]: "b"}
    assert user_id in users
