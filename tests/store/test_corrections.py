"""Corrections (``store.corrections``) and "try again" (``store.conversations.start_retry``):
a corrected answer becomes a pair with source ``correction`` the moment it is
recorded, a new correction replaces the old one and its pair, what is not an
answer is refused before anything is stored, and the pairs follow the trust
rules of every pair. Trying an answer again makes a same-context comparison
whose choice builds the pair. On SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from sqlmodel import Session, col, select

from store.conversations import start_retry
from store.corrections import CorrectionRecorded, CorrectionWrite, record_correction
from store.db import make_engine, session_scope, upgrade
from store.errors import Conflict, InvalidInput, NotFound
from store.exclusions import set_excluded
from store.feedback import record_choice
from store.feedback_writer import FeedbackWriter
from store.pairs import build_pairs, content_hash
from store.selection import eligible_pairs
from store.tables import (
    Comparison,
    Conversation,
    Correction,
    Message,
    PreferencePair,
    TrainingRun,
    TrainingRunPair,
    User,
)
from tests.support.write_lock import Outcomes, submit_while_locked

MAX_CHARS = 200
SAMPLING = {"temperature": 0.7, "max_tokens": 8}


@pytest.fixture
def db(database_url):
    upgrade(database_url)
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def _seed(db, kind: str = "account") -> dict:
    """An owner's conversation: a question and its finished answer, plus odd
    messages (a pending and a stopped answer, a caller-written turn); a stranger."""
    with session_scope(db) as s:
        owner, stranger = User(kind=kind, name="owner"), User(kind="account", name="stranger")
        s.add_all([owner, stranger])
        s.flush()
        conversation = Conversation(user_id=owner.id, title="t")
        s.add(conversation)
        s.flush()
        question = Message(conversation_id=conversation.id, role="user", content="What is 2+2?")
        s.add(question)
        s.flush()
        answer = Message(conversation_id=conversation.id, parent_id=question.id, role="assistant",
                         content="It is  5.", completed_at=question.created_at)
        pending = Message(conversation_id=conversation.id, parent_id=question.id, role="assistant",
                          status="pending")
        stopped = Message(conversation_id=conversation.id, parent_id=question.id, role="assistant",
                          content="It is", status="stopped")
        written = Message(conversation_id=conversation.id, parent_id=question.id, role="assistant",
                          content="caller's text", caller_written=True)
        s.add_all([answer, pending, stopped, written])
        s.flush()
        conversation.current_leaf_id = answer.id
        return {"owner": owner.id, "stranger": stranger.id, "conversation": conversation.id,
                "question": question.id, "answer": answer.id, "pending": pending.id, "stopped": stopped.id,
                "written": written.id}


def _correct(db, user_id: int, message_id: int, text: str) -> CorrectionRecorded:
    with session_scope(db) as s:
        return record_correction(s, s.get(User, user_id), message_id, text, max_chars=MAX_CHARS, eval_share=0.0)


def _pairs(db) -> list[PreferencePair]:
    with Session(db) as s:
        return list(s.exec(select(PreferencePair).order_by(col(PreferencePair.id))).all())


def _eligible(db, include_anonymous: bool = True) -> list[int]:
    with Session(db) as s:
        return list(s.exec(select(PreferencePair.id).where(eligible_pairs(include_anonymous))).all())


def test_a_correction_is_chosen_over_the_answer_in_its_context(db):
    ids = _seed(db)
    recorded = _correct(db, ids["owner"], ids["answer"], "  It is 4.\n")
    (pair,) = _pairs(db)
    prompt = [{"role": "user", "content": "What is 2+2?"}]
    assert (pair.source, pair.prompt, pair.chosen, pair.rejected) == ("correction", prompt, "It is 4.", "It is  5.")
    assert (pair.user_id, pair.chosen_message_id, pair.rejected_message_id) == (ids["owner"], None, ids["answer"])
    assert pair.content_hash == content_hash(prompt, "It is 4.", "It is  5.") and pair.split == "train"
    assert (recorded.pair_id, recorded.text, recorded.conversation_id) == (pair.id, "It is 4.", ids["conversation"])
    with Session(db) as s:
        (row,) = s.exec(select(Correction)).all()
    assert (row.message_id, row.user_id, row.content) == (ids["answer"], ids["owner"], "It is 4.")
    assert _eligible(db) == [pair.id]


def test_a_new_correction_replaces_the_old_one_and_withdraws_its_pair(db):
    ids = _seed(db)
    first = _correct(db, ids["owner"], ids["answer"], "Four.")
    again = _correct(db, ids["owner"], ids["answer"], "Four.")
    assert not again.changed and again.pair_id == first.pair_id
    second = _correct(db, ids["owner"], ids["answer"], "It is 4.")
    assert second.changed and second.correction_id == first.correction_id
    assert [(p.id, p.chosen) for p in _pairs(db)] == [(second.pair_id, "It is 4.")]
    with Session(db) as s:
        assert [c.content for c in s.exec(select(Correction)).all()] == ["It is 4."]


def test_a_pair_a_run_trained_on_stays_when_its_correction_changes(db):
    ids = _seed(db)
    first = _correct(db, ids["owner"], ids["answer"], "Four.")
    with session_scope(db) as s:
        run = TrainingRun(status="promoted")
        s.add(run)
        s.flush()
        s.add(TrainingRunPair(run_id=run.id, pair_id=first.pair_id, role="new"))
    second = _correct(db, ids["owner"], ids["answer"], "It is 4.")
    assert [(p.id, p.chosen) for p in _pairs(db)] == [(first.pair_id, "Four."), (second.pair_id, "It is 4.")]


@pytest.mark.parametrize(("target", "text", "error", "match"), [
    ("answer", "   \n ", InvalidInput, "the correction is empty"),
    ("answer", "x" * (MAX_CHARS + 1), InvalidInput, f"the limit is {MAX_CHARS}"),
    ("answer", "It is 5.", InvalidInput, "the model's answer unchanged"),
    ("answer", " It   is\n5. ", InvalidInput, "the model's answer unchanged"),
    ("question", "Four.", InvalidInput, "only answers can be corrected"),
    ("written", "Four.", InvalidInput, "caller sent as history"),
    ("pending", "Four.", Conflict, "still being generated"),
    ("stopped", "Four.", InvalidInput, "did not finish"),
    ("missing", "Four.", NotFound, "not found"),
])
def test_what_is_not_an_answer_is_refused_before_anything_is_stored(db, target, text, error, match):
    ids = _seed(db)
    message_id = 10**9 if target == "missing" else ids[target]
    with pytest.raises(error, match=match):
        _correct(db, ids["owner"], message_id, text)
    with Session(db) as s:
        assert s.exec(select(Correction)).all() == [] and s.exec(select(PreferencePair)).all() == []


def test_nobody_corrects_someone_elses_answer(db):
    ids = _seed(db)
    with pytest.raises(NotFound, match=f"message {ids['answer']} not found"):
        _correct(db, ids["stranger"], ids["answer"], "Four.")
    assert _pairs(db) == []


@pytest.mark.parametrize("exclude", ["user", "conversation", "answer", "pair", "disabled"])
def test_a_correction_pair_follows_the_trust_rules(db, exclude):
    ids = _seed(db)
    pair_id = _correct(db, ids["owner"], ids["answer"], "Four.").pair_id
    with session_scope(db) as s:
        if exclude == "disabled":
            s.get(User, ids["owner"]).status = "disabled"
        else:
            kind, row_id = {"user": ("user", ids["owner"]), "conversation": ("conversation", ids["conversation"]),
                            "answer": ("message", ids["answer"]), "pair": ("pair", pair_id)}[exclude]
            set_excluded(s, kind, row_id)
    assert _eligible(db) == []


def test_anonymous_visitors_corrections_are_kept_but_trained_on_only_when_allowed(db):
    ids = _seed(db, kind="browser")
    pair_id = _correct(db, ids["owner"], ids["answer"], "Four.").pair_id
    assert _eligible(db, include_anonymous=False) == []
    assert _eligible(db, include_anonymous=True) == [pair_id]


def test_an_excluded_users_correction_makes_its_pair_once_they_are_included_again(db):
    ids = _seed(db)
    with session_scope(db) as s:
        set_excluded(s, "user", ids["owner"])
    assert _correct(db, ids["owner"], ids["answer"], "Four.").pair_id is None
    assert _pairs(db) == []
    with session_scope(db) as s:
        set_excluded(s, "user", ids["owner"], excluded=False)
        report = build_pairs(s, eval_share=0.0)
    assert report.added_by_source == {"correction": 1}
    assert [(p.source, p.chosen, p.rejected_message_id) for p in _pairs(db)] == [("correction", "Four.", ids["answer"])]
    with session_scope(db) as s:  # built once: a second build adds nothing
        assert build_pairs(s, eval_share=0.0).added == 0




def test_corrections_in_one_writer_batch_leave_the_last_one_and_its_pair(db, database_url):
    ids = _seed(db)
    writer = FeedbackWriter(db, eval_share=0.0)
    writes = {
        "stranger": CorrectionWrite(ids["stranger"], ids["answer"], "Four.", MAX_CHARS),
        "first": CorrectionWrite(ids["owner"], ids["answer"], "Four.", MAX_CHARS),
        "second": CorrectionWrite(ids["owner"], ids["answer"], "It is 4.", MAX_CHARS),
        "copy": CorrectionWrite(ids["owner"], ids["answer"], "It is 5.", MAX_CHARS),
    }
    outcomes = Outcomes()
    submit_while_locked(database_url, writer, writes, outcomes, tables=("corrections",))
    done = outcomes.by_key
    writer.close()
    errors = {key: type(error) for key, (_, error) in done.items() if error is not None}
    assert errors == {"copy": InvalidInput, "stranger": NotFound}
    assert writer.batches == 2
    assert [(p.source, p.chosen) for p in _pairs(db)] == [("correction", "It is 4.")]
    assert done["second"][0].pair_id == _pairs(db)[0].id


def test_try_again_compares_the_answer_with_a_new_one_in_the_same_context(db):
    ids = _seed(db)
    with session_scope(db) as s:
        turn = start_retry(s, s.get(User, ids["owner"]), ids["answer"], SAMPLING, max_turns=20)
        again = turn.answers[1]
        assert (turn.comparison.message_a_id, turn.comparison.message_b_id) == (ids["answer"], again.id)
        assert (again.parent_id, again.status, again.sampling) == (ids["question"], "pending", SAMPLING)
        assert turn.question.id == ids["question"] and turn.conversation.current_leaf_id == ids["answer"]
        again.status, again.content = "complete", "It is 4."
        comparison_id, again_id = turn.comparison.id, again.id
    with session_scope(db) as s:
        record_choice(s, s.get(User, ids["owner"]), comparison_id, "b", eval_share=0.0)
    (pair,) = _pairs(db)
    assert (pair.source, pair.chosen, pair.rejected, pair.comparison_id) == ("comparison", "It is 4.", "It is  5.",
                                                                           comparison_id)
    with Session(db) as s:
        assert s.get(Conversation, ids["conversation"]).current_leaf_id == again_id


@pytest.mark.parametrize(("case", "error", "match"), [
    ("pending", Conflict, "still being generated"),
    ("question", InvalidInput, "only answers can be tried again"),
    ("written", InvalidInput, "only answers can be tried again"),
    ("replied", Conflict, "only the latest answer"),
    ("twice", Conflict, "already in a comparison"),
    ("stranger", NotFound, "not found"),
])
def test_try_again_is_refused_where_it_cannot_compare(db, case, error, match):
    ids = _seed(db)
    with session_scope(db) as s:
        owner = s.get(User, ids["owner"])
        target = ids.get(case, ids["answer"])
        if case == "replied":
            s.add(Message(conversation_id=ids["conversation"], parent_id=ids["answer"], role="user", content="ok"))
        if case == "twice":
            start_retry(s, owner, ids["answer"], SAMPLING, max_turns=20)
        user = s.get(User, ids["stranger"]) if case == "stranger" else owner
        before = len(s.exec(select(Message)).all())
        with pytest.raises(error, match=match):
            start_retry(s, user, target, SAMPLING, max_turns=20)
        assert len(s.exec(select(Message)).all()) == before
        assert len(s.exec(select(Comparison)).all()) == (1 if case == "twice" else 0)
