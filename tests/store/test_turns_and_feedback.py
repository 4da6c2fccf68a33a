"""Turns enter the store one way (``start_turn``); feedback becomes pairs the
moment it is recorded, and a changed thumb or choice withdraws what the old
value built. On SQLite and PostgreSQL."""

from __future__ import annotations

import json

import pytest
from sqlmodel import select

from store.conversations import start_turn
from store.db import make_engine, session_scope, upgrade
from store.errors import Conflict, InvalidInput, LimitExceeded, NotFound
from store.exchange.export import export_dataset
from store.feedback import record_choice, record_feedback
from store.tables import Comparison, Message, PreferencePair, TrainingRun, TrainingRunPair, User

SAMPLING = {"temperature": 0.7, "max_tokens": 8}


@pytest.fixture
def db(database_url):
    upgrade(database_url)
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def _user(s, name="u") -> User:
    user = User(kind="browser", name=name)
    s.add(user)
    s.flush()
    return user


def _finish(s, turn, *texts):
    for message, text in zip(turn.answers, texts, strict=True):
        message.status, message.content = "complete", text
        s.add(message)
    s.flush()


def test_a_turn_stores_the_question_and_pending_answers_and_continues_from_the_first(db):
    with session_scope(db) as s:
        user = _user(s)
        first = start_turn(s, user, None, [{"role": "user", "content": "Hello there"}], [SAMPLING], max_turns=10)
        second = start_turn(s, user, first.conversation, [{"role": "user", "content": "Again"}],
                            [SAMPLING, SAMPLING], max_turns=10, compare=True)
        assert first.conversation.title == "Hello there" and first.conversation.source == "web"
        assert [m.status for m in first.answers] == ["pending"]
        assert second.question.parent_id == first.answers[0].id
        assert {second.comparison.message_a_id, second.comparison.message_b_id} == {m.id for m in second.answers}
        assert second.conversation.current_leaf_id == second.comparison.message_a_id == second.answers[0].id


def test_an_api_turn_is_a_history_and_claimed_answers_pinned_to_their_adapter(db):
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"}]
    with session_scope(db) as s:
        turn = start_turn(s, _user(s), None, history, [SAMPLING, SAMPLING], max_turns=10, source="api",
                          claimed_by="host:1", adapter_version="v3")
        rows = s.exec(select(Message).where(Message.conversation_id == turn.conversation.id)).all()
    assert [m.role for m in rows] == ["system", "user", "assistant", "user", "assistant", "assistant"]
    assert {(m.status, m.adapter_version, m.claimed_by) for m in turn.answers} == {("streaming", "v3", "host:1")}
    assert turn.comparison is None


@pytest.mark.parametrize(("messages", "samplings", "compare", "error", "match"), [
    ([{"role": "assistant", "content": "x"}], [SAMPLING], False, InvalidInput, "role `user`"),
    ([{"role": "user", "content": "   "}], [SAMPLING], False, InvalidInput, "non-empty"),
    ([{"role": "user", "content": "x"}], [SAMPLING], True, InvalidInput, "exactly two"),
    ([{"role": "user", "content": "x"}] * 4, [SAMPLING, SAMPLING], False, LimitExceeded, "TUNELOOP_MAX_TURNS"),
])
def test_bad_turns_are_refused_before_anything_is_stored(db, messages, samplings, compare, error, match):
    with session_scope(db) as s:
        user = _user(s)
        with pytest.raises(error, match=match):
            start_turn(s, user, None, messages, samplings, max_turns=5, compare=compare)
        assert s.exec(select(Message)).all() == []


def test_three_choices_make_three_pairs_at_once_and_an_export_datasets_can_load(db, tmp_path):
    datasets = pytest.importorskip("datasets")
    with session_scope(db) as s:
        user = _user(s)
        for i in range(3):
            turn = start_turn(s, user, None, [{"role": "user", "content": f"Question {i}?"}],
                              [SAMPLING, SAMPLING], max_turns=10, compare=True)
            _finish(s, turn, f"short {i}", f"long rambling answer {i}")
            record_choice(s, user, turn.comparison.id, "a", eval_share=0.0)
        assert len(s.exec(select(PreferencePair)).all()) == 3
        report = export_dataset(s, "trl", tmp_path / "trl.jsonl")
    rows = datasets.load_dataset("json", data_files=str(report.path), split="train")
    assert report.rows == 3 and len(rows) == 3
    assert {r["chosen"][0]["content"] for r in rows} == {"short 0", "short 1", "short 2"}


def test_a_changed_choice_withdraws_its_old_pair_unless_a_run_used_it(db):
    with session_scope(db) as s:
        user = _user(s)
        turn = start_turn(s, user, None, [{"role": "user", "content": "Q?"}], [SAMPLING, SAMPLING],
                          max_turns=10, compare=True)
        _finish(s, turn, "A text", "B text")
        comparison_id = turn.comparison.id
        record_choice(s, user, comparison_id, "a", eval_share=0.0)
        record_choice(s, user, comparison_id, "b", eval_share=0.0)
        pairs = s.exec(select(PreferencePair)).all()
        assert [(p.chosen, p.rejected) for p in pairs] == [("B text", "A text")]
        record_choice(s, user, comparison_id, "tie", eval_share=0.0)
        assert s.exec(select(PreferencePair)).all() == []
        record_choice(s, user, comparison_id, "a", eval_share=0.0)
        (used,) = s.exec(select(PreferencePair)).all()
        run = TrainingRun(status="promoted")
        s.add(run)
        s.flush()
        s.add(TrainingRunPair(run_id=run.id, pair_id=used.id, role="new"))
        s.flush()
        record_choice(s, user, comparison_id, "b", eval_share=0.0)
        kept = s.exec(select(PreferencePair).order_by(PreferencePair.id)).all()
    # the trained pair stays for the adapter's lineage; the new choice adds its own
    assert [(p.chosen, p.rejected) for p in kept] == [("A text", "B text"), ("B text", "A text")]


def test_thumbs_pair_within_a_context_and_a_changed_thumb_withdraws_its_pairs(db):
    with session_scope(db) as s:
        user = _user(s)
        turn = start_turn(s, user, None, [{"role": "user", "content": "Q?"}], [SAMPLING], max_turns=10)
        _finish(s, turn, "good")
        question = turn.question
        conversation = turn.conversation
        regenerated = Message(conversation_id=conversation.id, parent_id=question.id, role="assistant",
                              content="bad", status="complete")
        s.add(regenerated)
        s.flush()
        record_feedback(s, user, turn.answers[0].id, "up", eval_share=0.0)
        assert s.exec(select(PreferencePair)).all() == []  # one thumb alone makes no pair
        record_feedback(s, user, regenerated.id, "down", "wrong", ["x"], eval_share=0.0)
        (pair,) = s.exec(select(PreferencePair)).all()
        assert (pair.chosen, pair.rejected, pair.source) == ("good", "bad", "thumbs")
        record_feedback(s, user, regenerated.id, "down", "still wrong", eval_share=0.0)  # same rating: kept
        assert [p.id for p in s.exec(select(PreferencePair)).all()] == [pair.id]
        record_feedback(s, user, turn.answers[0].id, "down", eval_share=0.0)  # changed its mind
        assert s.exec(select(PreferencePair)).all() == []
        record_feedback(s, user, regenerated.id, "up", eval_share=0.0)
        (flipped,) = s.exec(select(PreferencePair)).all()
    assert (flipped.chosen, flipped.rejected) == ("bad", "good")


def test_feedback_rules_hold_for_every_caller(db):
    with session_scope(db) as s:
        owner, stranger = _user(s, "owner"), _user(s, "stranger")
        turn = start_turn(s, owner, None, [{"role": "user", "content": "Q?"}], [SAMPLING, SAMPLING],
                          max_turns=10, compare=True)
        with pytest.raises(Conflict, match="still being generated"):
            record_feedback(s, owner, turn.answers[0].id, "up", eval_share=0.1)
        with pytest.raises(Conflict, match="both answers must be finished"):
            record_choice(s, owner, turn.comparison.id, "a", eval_share=0.1)
        _finish(s, turn, "x", "y")
        with pytest.raises(InvalidInput, match="only answers can be rated"):
            record_feedback(s, owner, turn.question.id, "up", eval_share=0.1)
        with pytest.raises(NotFound):
            record_feedback(s, stranger, turn.answers[0].id, "up", eval_share=0.1)
        with pytest.raises(NotFound):
            record_choice(s, stranger, turn.comparison.id, "a", eval_share=0.1)
        with pytest.raises(InvalidInput, match="winner must be"):
            record_choice(s, owner, turn.comparison.id, "c", eval_share=0.1)  # type: ignore[arg-type]
        with pytest.raises(InvalidInput, match="rating must be"):
            record_feedback(s, owner, turn.answers[0].id, "meh", eval_share=0.1)  # type: ignore[arg-type]
        assert s.exec(select(Comparison.winner)).all() == [None]


def test_an_export_builds_what_feedback_recorded_before_this_code_left_unbuilt(db, tmp_path):
    """Feedback rows written directly (older versions of tuneloop, other writers)
    are turned into pairs by the export itself."""
    from store.tables import Feedback

    with session_scope(db) as s:
        user = _user(s)
        turn = start_turn(s, user, None, [{"role": "user", "content": "Q?"}], [SAMPLING], max_turns=10)
        _finish(s, turn, "good")
        other = Message(conversation_id=turn.conversation.id, parent_id=turn.question.id, role="assistant",
                        content="bad", status="complete")
        s.add(other)
        s.flush()
        s.add_all([Feedback(message_id=turn.answers[0].id, user_id=user.id, rating="up"),
                   Feedback(message_id=other.id, user_id=user.id, rating="down")])
        s.flush()
        report = export_dataset(s, "trl", tmp_path / "out.jsonl")
    (row,) = [json.loads(line) for line in report.path.read_text().splitlines()]
    assert row["chosen"][0]["content"] == "good" and row["source"] == "thumbs"
