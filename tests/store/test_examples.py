"""Single thumbs as training examples (store.examples): which thumbs become
examples, the trust rules, and what a run selects, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from sqlmodel import Session, select

from store.conversations import add_message, start_conversation
from store.db import make_engine, session_scope, upgrade
from store.examples import record_examples, select_examples_for_run, single_thumbs
from store.pairs import build_pairs
from store.tables import Feedback, TrainingRun, TrainingRunExample, User


@pytest.fixture
def db(database_url):
    upgrade(database_url)
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def make_user(session, name="u", kind="api", **fields) -> User:
    user = User(kind=kind, name=name, **fields)
    session.add(user)
    session.flush()
    return user


def rated_answer(session, user, answer="Paris.", rating="up", question="Capital of France?", **fields):
    conversation = start_conversation(session, user, "web", question)
    q = add_message(session, conversation, None, "user", question)
    a = add_message(session, conversation, q.id, "assistant", answer)
    for key, value in fields.items():
        setattr(a, key, value)
    session.add(a)
    feedback = Feedback(message_id=a.id, user_id=user.id, rating=rating)
    session.add(feedback)
    session.flush()
    return conversation, a, feedback


def test_a_single_thumb_is_an_example_with_its_context_and_label(db):
    with session_scope(db) as s:
        user = make_user(s)
        _, up_answer, up = rated_answer(s, user, "Paris.", "up")
        _, down_answer, down = rated_answer(s, user, "Lyon.", "down", question="And the capital of Italy?")
    with Session(db) as s:
        examples = single_thumbs(s, eval_share=0.0)
    assert [(e.feedback_id, e.label, e.completion) for e in examples] == [(up.id, True, "Paris."),
                                                                          (down.id, False, "Lyon.")]
    assert examples[0].prompt == [{"role": "user", "content": "Capital of France?"}]
    assert examples[0].to_trl() == {"prompt": [{"role": "user", "content": "Capital of France?"}],
                                    "completion": [{"role": "assistant", "content": "Paris."}], "label": True}
    assert {e.split for e in examples} == {"train"}


def test_a_thumb_that_made_a_pair_is_not_also_an_example(db):
    with session_scope(db) as s:
        user = make_user(s)
        conversation, good, _ = rated_answer(s, user, "Paris.", "up")
        bad = add_message(s, conversation, good.parent_id, "assistant", "Berlin.")
        s.add(Feedback(message_id=bad.id, user_id=user.id, rating="down"))
        _, single, single_thumb = rated_answer(s, user, "Rome.", "up", question="Capital of Italy?")
        s.flush()
        assert build_pairs(s).added == 1
    with Session(db) as s:
        assert [e.feedback_id for e in single_thumbs(s, eval_share=0.0)] == [single_thumb.id]


def test_untrusted_and_excluded_thumbs_make_no_example_and_cut_answers_are_marked(db):
    with session_scope(db) as s:
        trusted = make_user(s, "trusted")
        _, _, kept = rated_answer(s, trusted)
        rated_answer(s, make_user(s, "excluded", excluded_from_training=True))
        rated_answer(s, make_user(s, "disabled", kind="account", status="disabled"))
        rated_answer(s, make_user(s, "visitor", kind="browser"))
        rated_answer(s, trusted, excluded_from_training=True)  # the message excluded
        rated_answer(s, trusted, caller_written=True)  # an API caller's own history
        rated_answer(s, trusted, "   ")
        conversation, _, _ = rated_answer(s, trusted)
        conversation.excluded_from_training = True
        s.add(conversation)
        _, _, cut = rated_answer(s, trusted, "Paris is", finish_reason="length")  # cut at its token limit
    with Session(db) as s:
        examples = single_thumbs(s, eval_share=0.0)
        assert [(e.feedback_id, e.complete) for e in examples] == [(kept.id, True), (cut.id, False)]
        visitor = s.exec(select(User).where(User.name == "visitor")).one()
        with_anonymous = {e.user_id for e in single_thumbs(s, eval_share=0.0, include_anonymous=True)}
    assert visitor.id in with_anonymous


def test_a_run_selects_untrained_examples_and_a_flipped_thumb_is_new_again(db):
    with session_scope(db) as s:
        user = make_user(s)
        _, _, first = rated_answer(s, user, "Paris.", "up")
        _, _, second = rated_answer(s, user, "Lyon.", "down", question="Capital of Italy?")
        run = TrainingRun(status="promoted")
        s.add(run)
        s.flush()
        selection = select_examples_for_run(s, eval_share=0.0, max_per_user=50)
        assert [e.feedback_id for e in selection.new] == [first.id, second.id]
        record_examples(s, run.id, "new", selection.new[:1])
    with session_scope(db) as s:
        assert [e.feedback_id for e in select_examples_for_run(s, 0.0, 50).new] == [second.id]
        flipped = s.get(Feedback, first.id)
        flipped.rating = "down"
        s.add(flipped)
    with session_scope(db) as s:
        selection = select_examples_for_run(s, 0.0, 50)
        assert [(e.feedback_id, e.label) for e in selection.new] == [(first.id, False), (second.id, False)]
        assert s.exec(select(TrainingRunExample)).one().label is True  # the run's record keeps what it learned


def test_selection_caps_each_user_and_the_run(db):
    with session_scope(db) as s:
        heavy, light = make_user(s, "heavy"), make_user(s, "light")
        for i in range(5):
            rated_answer(s, heavy, f"answer {i}", question=f"question {i}?")
        rated_answer(s, light, "light answer", question="light question?")
        selection = select_examples_for_run(s, eval_share=0.0, max_per_user=3)
        assert len(selection.new) == 4 and selection.capped == 2
        assert selection.new[1].user_id == light.id  # round-robin: the light user is not behind the heavy one
        capped = select_examples_for_run(s, eval_share=0.0, max_per_user=3, max_train=2)
        assert len(capped.new) == 2 and capped.deferred == 2


def test_held_out_examples_stay_held_out(db):
    with session_scope(db) as s:
        user = make_user(s)
        for i in range(30):
            rated_answer(s, user, f"answer {i}", "up" if i % 2 else "down", question=f"question {i}?")
        selection = select_examples_for_run(s, eval_share=0.3, max_per_user=100)
        again = select_examples_for_run(s, eval_share=0.3, max_per_user=100)
    assert selection.eval and selection.new
    assert {e.feedback_id for e in selection.eval}.isdisjoint(e.feedback_id for e in selection.new)
    assert [e.feedback_id for e in again.eval] == [e.feedback_id for e in selection.eval]
