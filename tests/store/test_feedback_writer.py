"""Group commit (``store.feedback_writer``): the writes of concurrent callers
share one transaction, each is acknowledged only after its commit, a write the
store or the database refuses fails alone, a failed commit fails its whole
batch, and closing drains the queue. On SQLite and PostgreSQL.

Batches are made deterministic by holding the database's write lock while
writes queue: the writer's first transaction waits on it, everything submitted
meanwhile becomes its next batch."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from sqlalchemy import event
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, select

from store.db import make_engine, session_scope, upgrade
from store.errors import Conflict, InvalidInput, NotFound, NotStored
from store.feedback import Choice, ChoiceRecorded, Thumb, ThumbRecorded
from store.feedback_writer import FeedbackWriter
from store.tables import Comparison, Conversation, Feedback, Message, PreferencePair, User
from store.writer_process import WriterProcess
from tests.support.write_lock import Outcomes, submit_while_locked, write_lock_held


@pytest.fixture(params=["thread", "process"])
def writer_kind(request) -> str:
    """The group-commit writer in the server's interpreter, or in a child process."""
    return request.param


def _writer(db, kind: str, eval_share: float) -> FeedbackWriter | WriterProcess:
    if kind == "thread":
        return FeedbackWriter(db, eval_share=eval_share)
    return WriterProcess(db.url.render_as_string(hide_password=False), eval_share=eval_share)


@pytest.fixture
def db(database_url):
    upgrade(database_url)
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def _seed(db, answers: int = 6) -> dict:
    """An owner with ``answers`` finished answers to one question (plus a
    pending one, a caller-written one), a decided-able comparison, one with a
    pending answer, and a stranger."""
    with session_scope(db) as s:
        owner, stranger = User(kind="api", name="owner"), User(kind="api", name="stranger")
        s.add_all([owner, stranger])
        s.flush()
        conversation = Conversation(user_id=owner.id, title="t")
        s.add(conversation)
        s.flush()
        question = Message(conversation_id=conversation.id, role="user", content="Question?")
        s.add(question)
        s.flush()
        done = [Message(conversation_id=conversation.id, parent_id=question.id, role="assistant",
                        content=f"answer {i}") for i in range(answers)]
        pending = Message(conversation_id=conversation.id, parent_id=question.id, role="assistant",
                          status="pending")
        written = Message(conversation_id=conversation.id, parent_id=question.id, role="assistant",
                          content="caller's text", caller_written=True)
        s.add_all([*done, pending, written])
        s.flush()
        conversation.current_leaf_id = done[0].id
        comparison = Comparison(user_id=owner.id, conversation_id=conversation.id,
                                message_a_id=done[0].id, message_b_id=done[1].id)
        unfinished = Comparison(user_id=owner.id, conversation_id=conversation.id,
                                message_a_id=done[2].id, message_b_id=pending.id)
        s.add_all([comparison, unfinished])
        s.flush()
        return {"owner": owner.id, "stranger": stranger.id, "question": question.id,
                "answers": [m.id for m in done], "pending": pending.id, "written": written.id,
                "comparison": comparison.id, "unfinished": unfinished.id}




def test_concurrent_writes_share_a_transaction_and_are_acknowledged_after_it(db, database_url, writer_kind):
    ids = _seed(db, answers=40)
    owner = ids["owner"]
    commits: list[int] = []
    event.listen(db, "commit", lambda conn: commits.append(1))
    writer = _writer(db, writer_kind, eval_share=0.0)
    if writer_kind == "process":
        writer.start()  # the child is up before the lock is taken (its first connect would wait on it)
    rating = {m: "down" if i % 2 else "up" for i, m in enumerate(ids["answers"])}
    writes: dict = {f"m{m}": Thumb(owner, m, rating[m], f"c{i}", ("t",)) for i, m in enumerate(ids["answers"])}
    writes["choice"] = Choice(owner, ids["comparison"], "b")
    outcomes = Outcomes()
    submit_while_locked(database_url, writer, writes, outcomes)
    writer.close()

    assert all(error is None for _, error in outcomes.by_key.values()), outcomes.by_key
    assert writer.batches == 2 and writer.committed == len(writes)
    assert len(commits) == (2 if writer_kind == "thread" else 0)  # a writer process commits on its own engine
    thumb = outcomes.by_key[f"m{ids['answers'][3]}"][0]
    assert isinstance(thumb, ThumbRecorded) and (thumb.rating, thumb.comment, thumb.tags) == ("down", "c3", ["t"])
    choice = outcomes.by_key["choice"][0]
    assert isinstance(choice, ChoiceRecorded) and choice.chosen_id == ids["answers"][1]
    with Session(db) as s:
        stored = {f.message_id: (f.rating, f.comment, f.tags) for f in s.exec(select(Feedback))}
        pairs = s.exec(select(PreferencePair)).all()
        comparison = s.get(Comparison, ids["comparison"])
        conversation = s.get(Conversation, comparison.conversation_id)
    assert stored == {m: (rating[m], f"c{i}", ["t"]) for i, m in enumerate(ids["answers"])}
    # every up-rated answer over every down-rated one: the later thumbs of the batch saw the earlier ones
    thumbs = [p for p in pairs if p.source == "thumbs"]
    assert len(thumbs) == 20 * 20 and len({p.content_hash for p in thumbs}) == 400
    # (answer 0 is up, answer 1 down: choosing B makes a pair the thumbs did not)
    assert [(p.chosen, p.rejected) for p in pairs if p.source == "comparison"] == [("answer 1", "answer 0")]
    assert comparison.winner == "b" and conversation.current_leaf_id == ids["answers"][1]


def test_a_refused_write_fails_alone_and_the_rest_of_its_batch_commits(db, database_url, writer_kind):
    ids = _seed(db)
    owner, stranger, (a0, a1, a2, *_) = ids["owner"], ids["stranger"], ids["answers"]
    writer = _writer(db, writer_kind, eval_share=0.0)
    if writer_kind == "process":
        writer.start()
    writes = {
        "first": Thumb(owner, a0, "up"),
        "stranger": Thumb(stranger, a1, "up"),
        "question": Thumb(owner, ids["question"], "up"),
        "beyond range": Thumb(owner, 2**64, "up"),  # refused by the database itself: the batch is redone
        "ok": Thumb(owner, a1, "down", "meh"),
        "pending": Thumb(owner, ids["pending"], "up"),
        "written": Thumb(owner, ids["written"], "down"),
        "unfinished choice": Choice(owner, ids["unfinished"], "a"),
        "stranger's choice": Choice(stranger, ids["comparison"], "a"),
        "missing": Thumb(owner, 10**9, "up"),
        "choice": Choice(owner, ids["comparison"], "b"),
        "again": Thumb(owner, a2, "up"),
    }
    outcomes = Outcomes()
    submit_while_locked(database_url, writer, writes, outcomes)
    writer.close()

    errors = {key: type(error) for key, (_, error) in outcomes.by_key.items() if error is not None}
    beyond = errors.pop("beyond range")
    assert beyond.__name__ in ("OverflowError", "DataError", "NotFound")  # each a 404 over HTTP
    assert errors == {"stranger": NotFound, "question": InvalidInput, "pending": Conflict, "written": InvalidInput,
                      "unfinished choice": Conflict, "stranger's choice": NotFound, "missing": NotFound}
    assert "only answers can be rated" in str(outcomes.by_key["question"][1])
    assert "caller sent as history" in str(outcomes.by_key["written"][1])
    with Session(db) as s:
        stored = {f.message_id: f.rating for f in s.exec(select(Feedback))}
        pairs = {(p.source, p.chosen, p.rejected) for p in s.exec(select(PreferencePair))}
        winners = dict(s.exec(select(Comparison.id, Comparison.winner)).all())
    assert stored == {a0: "up", a1: "down", a2: "up"}
    assert pairs == {("thumbs", "answer 0", "answer 1"), ("thumbs", "answer 2", "answer 1"),
                     ("comparison", "answer 1", "answer 0")}
    assert winners == {ids["comparison"]: "b", ids["unfinished"]: None}
    assert writer.committed == 4


def test_a_changed_thumb_or_choice_withdraws_its_old_pairs(db):
    ids = _seed(db)
    owner, (a0, a1, *_) = ids["owner"], ids["answers"]
    writer = FeedbackWriter(db, eval_share=0.0)

    def write(w):
        outcomes = Outcomes()
        writer.submit(w, outcomes.callback("w"))
        outcomes.wait(1)
        result, error = outcomes.by_key["w"]
        assert error is None, error
        return result

    def pairs():
        with Session(db) as s:
            return sorted((p.source, p.chosen, p.rejected) for p in s.exec(select(PreferencePair)))

    write(Thumb(owner, a0, "up"))
    write(Thumb(owner, a1, "down"))
    assert pairs() == [("thumbs", "answer 0", "answer 1")]
    assert write(Thumb(owner, a1, "down", "still")).changed is False
    write(Thumb(owner, a0, "down"))
    assert pairs() == []
    write(Choice(owner, ids["comparison"], "b"))
    assert pairs() == [("comparison", "answer 1", "answer 0")]
    write(Choice(owner, ids["comparison"], "tie"))
    assert pairs() == []
    writer.close()


def test_a_failed_commit_fails_every_write_of_its_batch_and_the_writer_goes_on(tmp_path):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    upgrade(url)
    db = make_engine(url, busy_timeout_s=0.3)
    ids = _seed(db)
    owner, answers = ids["owner"], ids["answers"]
    writer = FeedbackWriter(db, eval_share=0.0)
    outcomes = Outcomes()
    with write_lock_held(url):
        for m in answers[:3]:
            writer.submit(Thumb(owner, m, "up"), outcomes.callback(str(m)))
        outcomes.wait(3)
    assert {type(error) for _, error in outcomes.by_key.values()} == {OperationalError}
    later = Outcomes()
    writer.submit(Thumb(owner, answers[0], "up"), later.callback("later"))
    later.wait(1)
    assert later.by_key["later"][1] is None
    writer.close()
    with Session(db) as s:
        assert [f.message_id for f in s.exec(select(Feedback))] == [answers[0]]
    db.dispose()


def test_close_drains_the_queue_then_refuses_until_it_returns(db, database_url):
    ids = _seed(db, answers=20)
    owner = ids["owner"]
    writer = FeedbackWriter(db, eval_share=0.0)
    outcomes = Outcomes()
    closing = threading.Thread(target=writer.close)
    with write_lock_held(database_url):
        for m in ids["answers"]:
            writer.submit(Thumb(owner, m, "up"), outcomes.callback(str(m)))
        closing.start()
        time.sleep(0.2)
        writer.submit(Thumb(owner, ids["answers"][0], "down"), outcomes.callback("during close"))
    closing.join(60)
    assert not closing.is_alive()
    during = outcomes.by_key.pop("during close")
    assert isinstance(during[1], NotStored)
    assert len(outcomes.by_key) == 20 and all(error is None for _, error in outcomes.by_key.values())
    with Session(db) as s:
        assert len(s.exec(select(Feedback)).all()) == 20
    reopened = Outcomes()
    writer.submit(Thumb(owner, ids["answers"][0], "down"), reopened.callback("after"))
    reopened.wait(1)
    assert reopened.by_key["after"][1] is None
    writer.close()


def _state(db, ids: dict) -> tuple:
    """Thumbs, winners and pairs, named by message text (ids differ between databases)."""
    with Session(db) as s:
        text = dict(s.exec(select(Message.id, Message.content)).all())
        by_feedback = {f.id: text[f.message_id] for f in s.exec(select(Feedback))}
        thumbs = sorted((text[f.message_id], f.rating, f.comment) for f in s.exec(select(Feedback)))
        winners = sorted((text[c.message_a_id], c.winner) for c in s.exec(select(Comparison)))
        pairs = sorted(
            (p.source, p.chosen, p.rejected, p.split, by_feedback.get(p.chosen_feedback_id),
             by_feedback.get(p.rejected_feedback_id), p.comparison_id is not None)
            for p in s.exec(select(PreferencePair))
        )
    return thumbs, winners, pairs


def test_a_batch_ends_as_the_same_writes_one_transaction_each(db, database_url, tmp_path):
    """Thumbs flipping back and forth and choices changing, many times on the
    same answers within one batch: the pairs withdrawn and made together at the
    end leave exactly what committing each write alone leaves."""
    import random

    reference_url = f"sqlite:///{tmp_path / 'one_by_one.db'}"
    upgrade(reference_url)
    reference = make_engine(reference_url)
    ids, reference_ids = _seed(db), _seed(reference)
    rng = random.Random(7)
    plan = []
    for i in range(80):
        if rng.random() < 0.25:
            plan.append(("choice", rng.choice(("a", "b", "tie", "both_bad"))))
        else:
            plan.append(("thumb", rng.randrange(6), rng.choice(("up", "down")), f"n{i}"))

    def write(seeded: dict, step):
        if step[0] == "choice":
            return Choice(seeded["owner"], seeded["comparison"], step[1])
        return Thumb(seeded["owner"], seeded["answers"][step[1]], step[2], step[3])

    one_by_one = FeedbackWriter(reference, eval_share=0.5)
    for step in plan:
        outcomes = Outcomes()
        one_by_one.submit(write(reference_ids, step), outcomes.callback("w"))
        outcomes.wait(1)
    one_by_one.close()
    assert one_by_one.batches == len(plan)

    batched = FeedbackWriter(db, eval_share=0.5)
    outcomes = Outcomes()
    submit_while_locked(database_url, batched, {f"w{i}": write(ids, step) for i, step in enumerate(plan)},
                         outcomes)
    batched.close()
    assert batched.batches == 2 and all(error is None for _, error in outcomes.by_key.values())
    assert _state(db, ids) == _state(reference, reference_ids)
    assert _state(db, ids)[2], "the plan made pairs"
    reference.dispose()


def test_a_killed_writer_process_fails_what_it_held_and_the_next_write_starts_a_new_one(db, database_url):
    ids = _seed(db)
    owner, (a0, a1, a2, a3, *_) = ids["owner"], ids["answers"]
    writer = _writer(db, "process", eval_share=0.0)
    first = Outcomes()
    writer.submit(Thumb(owner, a0, "up"), first.callback("first"))
    first.wait(1)
    assert first.by_key["first"][1] is None
    killed = writer._child.process

    held = Outcomes()
    with write_lock_held(database_url):  # the child waits on the lock with the writes in hand
        for key, answer in (("a1", a1), ("a2", a2)):
            writer.submit(Thumb(owner, answer, "down"), held.callback(key))
        time.sleep(0.5)
        assert held.by_key == {}
        os.kill(killed.pid, signal.SIGKILL)
        held.wait(2, timeout=10)
    assert {key: type(error) for key, (_, error) in held.by_key.items()} == {"a1": NotStored, "a2": NotStored}
    assert "may not have been saved" in str(held.by_key["a1"][1])

    after = Outcomes()
    writer.submit(Thumb(owner, a3, "down"), after.callback("after"))
    after.wait(1)
    writer.close()
    assert after.by_key["after"][1] is None and not killed.is_alive()
    with Session(db) as s:
        assert {f.message_id: f.rating for f in s.exec(select(Feedback))} == {a0: "up", a3: "down"}
