"""Pair building, run selection, leases and the adapter registry, on SQLite and
PostgreSQL (pure database code, no model)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlmodel import Session, select

from store import leases
from store.conversations import add_message, start_conversation
from store.db import make_engine, session_scope, upgrade
from store.errors import Conflict, UnknownAdapterVersion, VersionNotServable
from store.pairs import build_pairs, content_hash, split_for
from store.registry import activate, active_version, mark_failed, reserve_version, rollback
from store.selection import cap_eval_pairs, count_new_pairs, select_for_run
from store.tables import (
    AdapterVersion,
    Comparison,
    Feedback,
    PreferencePair,
    TrainingRun,
    TrainingRunPair,
    User,
    utcnow,
)


@pytest.fixture
def db(database_url):
    upgrade(database_url)
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def make_user(session, name="u", excluded=False) -> User:
    user = User(kind="browser", name=name, excluded_from_training=excluded)
    session.add(user)
    session.flush()
    return user


def context_with_answers(session, user, texts, question="What is 2+2?"):
    conversation = start_conversation(session, user, "web", question)
    q = add_message(session, conversation, None, "user", question)
    answers = [add_message(session, conversation, q.id, "assistant", t) for t in texts]
    return conversation, q, answers


def rate(session, user, message, rating):
    session.add(Feedback(message_id=message.id, user_id=user.id, rating=rating))
    session.flush()


def test_thumbs_make_up_x_down_pairs_with_full_context(db):
    with session_scope(db) as s:
        user = make_user(s)
        conversation = start_conversation(s, user, "web", "hi")
        q1 = add_message(s, conversation, None, "user", "Hi")
        a1 = add_message(s, conversation, q1.id, "assistant", "Hello!")
        q2 = add_message(s, conversation, a1.id, "user", "What is 2+2?")
        good1 = add_message(s, conversation, q2.id, "assistant", "4")
        good2 = add_message(s, conversation, q2.id, "assistant", "2+2 = 4")
        bad = add_message(s, conversation, q2.id, "assistant", "5")
        for message, rating in ((good1, "up"), (good2, "up"), (bad, "down")):
            rate(s, user, message, rating)
        report = build_pairs(s)
    assert report.added == 2 and report.added_by_source["thumbs"] == 2
    with Session(db) as s:
        pairs = s.exec(select(PreferencePair).order_by(PreferencePair.id)).all()
    assert [p.chosen for p in pairs] == ["4", "2+2 = 4"] and {p.rejected for p in pairs} == {"5"}
    assert pairs[0].prompt == [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is 2+2?"},
    ]
    assert pairs[0].chosen_message_id == good1.id and pairs[0].rejected_feedback_id is not None


def test_comparisons_ties_and_idempotence(db):
    with session_scope(db) as s:
        user = make_user(s)
        winners = ["a", "b", "tie", "both_bad"]
        for i, winner in enumerate(winners):
            conversation, _, (a, b) = context_with_answers(s, user, [f"A{i}", f"B{i}"], f"Q{i}")
            s.add(Comparison(user_id=user.id, conversation_id=conversation.id,
                             message_a_id=a.id, message_b_id=b.id, winner=winner))
        s.flush()
        first = build_pairs(s)
    with session_scope(db) as s:
        second = build_pairs(s)
        pairs = s.exec(select(PreferencePair).order_by(PreferencePair.id)).all()
    assert (first.added, first.ties, first.both_bad) == (2, 1, 1)
    assert second.added == 0 and second.already_built == 2
    assert [(p.chosen, p.rejected) for p in pairs] == [("A0", "B0"), ("B1", "A1")]


def test_unusable_and_excluded_answers_make_no_pairs(db):
    with session_scope(db) as s:
        user, banned = make_user(s, "ok"), make_user(s, "banned", excluded=True)
        _, _, (up, down) = context_with_answers(s, user, ["same", "same"])
        rate(s, user, up, "up"), rate(s, user, down, "down")  # identical texts
        _, _, (up2, down2) = context_with_answers(s, banned, ["good", "bad"])
        rate(s, banned, up2, "up"), rate(s, banned, down2, "down")
        _, _, (up3, down3) = context_with_answers(s, user, ["good", "unfinished"])
        down3.status = "stopped"
        rate(s, user, up3, "up"), rate(s, user, down3, "down")
        report = build_pairs(s)
    assert report.added == 0 and report.skipped == 3


def test_split_is_stable_and_roughly_the_share():
    hashes = [content_hash([{"role": "user", "content": f"q{i}"}], "a", "b") for i in range(1000)]
    evals = sum(split_for(h, 0.1) == "eval" for h in hashes)
    assert 80 <= evals <= 120
    assert all(split_for(h, 0.1) == split_for(h, 0.1) for h in hashes[:50])


def _pairs_for(s, user, n, prefix):
    for i in range(n):
        _, _, (up, down) = context_with_answers(s, user, [f"{prefix}good{i}", f"{prefix}bad{i}"], f"{prefix}Q{i}")
        rate(s, user, up, "up"), rate(s, user, down, "down")


def _promoted_run_trained_on(db, pairs) -> AdapterVersion:
    """A run that trained on ``pairs`` and whose version, continued from the
    active one, became active."""
    with session_scope(db) as s:
        run = TrainingRun(status="promoted")
        s.add(run)
        s.flush()
        s.add_all(TrainingRunPair(run_id=run.id, pair_id=pair.id, role="new") for pair in pairs)
        parent = active_version(s)
        row = reserve_version(s, Path(db.url.database or "/tmp").parent / "adapters", run.id,
                              parent.version if parent else None)
        row.status = "candidate"
        activate(s, row.version)
        return row


def test_selection_caps_users_replays_history_and_keeps_eval(db):
    with session_scope(db) as s:
        loud, quiet = make_user(s, "loud"), make_user(s, "quiet")
        _pairs_for(s, loud, 12, "L")
        _pairs_for(s, quiet, 3, "Q")
        build_pairs(s, eval_share=0.0)
        selection = select_for_run(s, max_pairs_per_user=5, replay_fraction=0.5)
    assert len(selection.new) == 8 and selection.capped == 7 and selection.replay == []
    _promoted_run_trained_on(db, selection.new)
    with session_scope(db) as s:
        assert count_new_pairs(s) == 7
        after = select_for_run(s, max_pairs_per_user=5, replay_fraction=0.5)
        assert len(after.new) == 5 and len(after.replay) == 5
        assert {p.id for p in after.replay} <= {p.id for p in selection.new}
        s.exec(select(User).where(User.name == "loud")).one().excluded_from_training = True
        s.flush()
        assert count_new_pairs(s) == 0


def test_step_budget_caps_the_training_set_and_defers_the_newest_pairs(db):
    with session_scope(db) as s:
        users = [make_user(s, f"u{i}") for i in range(4)]
        for i, user in enumerate(users):
            _pairs_for(s, user, 5, f"U{i}")
        build_pairs(s, eval_share=0.0)
        first = select_for_run(s, max_pairs_per_user=50, replay_fraction=0.5, max_train_pairs=8)
    # no history yet: nothing to replay, the whole budget goes to new pairs, fairly:
    # every user's two oldest (round-robin), the later rounds wait
    assert len(first.new) == 8 and first.replay == [] and first.deferred == 12
    by_user = {u.id: sorted(p.id for p in first.new if p.user_id == u.id) for u in users}
    assert all(len(ids) == 2 for ids in by_user.values())
    _promoted_run_trained_on(db, first.new)
    with session_scope(db) as s:
        second = select_for_run(s, max_pairs_per_user=50, replay_fraction=0.5, max_train_pairs=8)
        unlimited = select_for_run(s, max_pairs_per_user=50, replay_fraction=0.5)
    assert len(second.new) == 4 and len(second.replay) == 4 and second.deferred == 8
    assert {p.user_id for p in second.new} == set(by_user)  # the third round: one each
    assert all(p.id > max(by_user[p.user_id]) for p in second.new)
    assert len(unlimited.new) == 12 and len(unlimited.replay) == 8 and unlimited.deferred == 0


def test_lease_is_exclusive_and_expires(db):
    with session_scope(db) as s:
        assert leases.acquire(s, "x", "one", 60)
    with session_scope(db) as s:
        assert not leases.acquire(s, "x", "two", 60)
        assert leases.current_holder(s, "x") == "one"
        assert leases.acquire(s, "x", "two", 60, now=utcnow() + timedelta(seconds=61))
    with session_scope(db) as s:
        assert not leases.renew(s, "x", "one", 60)
        leases.release(s, "x", "two")
        assert leases.current_holder(s, "x") is None


def _versions(s, n):
    for v in range(1, n + 1):
        s.add(AdapterVersion(version=v, path=f"/adapters/v{v}", status="candidate"))
    s.flush()


def test_activate_rollback_and_failed_versions(db):
    with session_scope(db) as s:
        _versions(s, 3)
        activate(s, 1)
        activate(s, 2)
        assert active_version(s).version == 2
        assert rollback(s).version == 1
        assert rollback(s) is None  # v2 was rolled back from: the base model comes next
        with pytest.raises(Conflict, match="nothing to roll back"):
            rollback(s)
        activate(s, 3)
        mark_failed(s, 3, "corrupt weights")
        assert active_version(s) is None
        with pytest.raises(VersionNotServable, match="failed"):
            activate(s, 3)
        with pytest.raises(UnknownAdapterVersion, match="no adapter v9"):
            activate(s, 9)
        statuses = {row.version: row.status for row in s.exec(select(AdapterVersion)).all()}
    assert statuses == {1: "rolled_back", 2: "rolled_back", 3: "failed"}


def test_eval_cap_keeps_the_newest_half_and_samples_older_pairs():
    pairs = [PreferencePair(id=i, prompt=[], chosen="c", rejected="r", source="thumbs", split="eval",
                            content_hash=str(i)) for i in range(1, 101)]
    capped = cap_eval_pairs(pairs, 10, seed=3)
    ids = [p.id for p in capped]
    assert len(ids) == 10 and ids == sorted(ids)
    assert ids[-5:] == [96, 97, 98, 99, 100]  # the newest half
    assert all(i < 96 for i in ids[:5])  # the rest from the older history
    assert [p.id for p in cap_eval_pairs(pairs, 10, seed=3)] == ids  # seeded: the same run scores the same set
    assert cap_eval_pairs(pairs[:8], 10) == pairs[:8]


def test_training_pairs_mark_answers_cut_at_the_token_limit(db):
    from trainer.cycle import _as_training_pairs

    with session_scope(db) as s:
        user = make_user(s)
        _, _, (a, b) = context_with_answers(s, user, ["Short and done.", "A long answer that was cut"])
        b.finish_reason = "length"
        a.finish_reason = "stop"
        s.add(Comparison(user_id=user.id, conversation_id=a.conversation_id,
                         message_a_id=a.id, message_b_id=b.id, winner="a"))
        s.flush()
        build_pairs(s)
        (pair,), problems = _as_training_pairs(s, s.exec(select(PreferencePair)).all())
    assert problems == {}
    assert (pair.chosen, pair.chosen_complete) == ("Short and done.", True)
    assert (pair.rejected, pair.rejected_complete) == ("A long answer that was cut", False)


def test_near_identical_samples_make_no_pair_but_a_small_correction_does():
    from store.pairs import near_identical

    assert near_identical("Paris is the capital.", "paris is the capital")
    long = "The capital of France is Paris, a city on the Seine known for its museums and cafes. "
    assert near_identical(long * 3, (long * 3).replace("cafes", "cafés"))
    assert not near_identical("The answer is 4.", "The answer is 5.")
    assert not near_identical("Paris.", "Lyon.")


def test_a_choice_between_near_identical_answers_is_counted_not_paired(db):
    with session_scope(db) as s:
        user = make_user(s)
        conversation, _, (a, b) = context_with_answers(s, user, ["It is 4.", "it is 4"])
        s.add(Comparison(user_id=user.id, conversation_id=conversation.id, message_a_id=a.id, message_b_id=b.id,
                         winner="a"))
        s.flush()
        report = build_pairs(s)
    assert report.added == 0 and report.skipped == 1
