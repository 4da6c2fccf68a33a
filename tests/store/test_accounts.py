"""Accounts and who the model learns from, in the store: sign-up policy, sign-in,
revocable sessions, roles; anonymous, disabled and excluded sources kept out of
training; callers' assistant turns never rated as the model's. SQLite and
PostgreSQL."""

from __future__ import annotations

import pytest
from sqlmodel import select

from store.accounts import (
    WRONG_CREDENTIALS,
    authenticate,
    create_account,
    find_account,
    new_anonymous_identity,
    session_valid,
    set_password,
    set_role,
    set_status,
    sign_up,
)
from store.conversations import start_turn
from store.db import make_engine, session_scope, upgrade
from store.errors import Conflict, InvalidInput, NotAllowed, NotFound
from store.feedback import record_choice, record_feedback
from store.selection import count_new_pairs, select_for_run
from store.tables import Conversation, PreferencePair, User

SAMPLING = {"temperature": 0.7}


@pytest.fixture
def db(database_url):
    upgrade(database_url)
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def test_the_first_account_is_admin_and_later_ones_follow_the_policy(db):
    with session_scope(db) as s:
        first = sign_up(s, "alice", "correct horse", "approval")
        waiting = sign_up(s, "bob", "battery staple", "approval")
        open_ = sign_up(s, "carol", "battery staple", "open")
        with pytest.raises(NotAllowed, match="sign-up is closed"):
            sign_up(s, "dave", "battery staple", "closed")
        with pytest.raises(Conflict, match="taken"):
            sign_up(s, "alice", "another password", "open")
        with pytest.raises(InvalidInput, match="username"):
            sign_up(s, "x", "battery staple", "open")
        with pytest.raises(InvalidInput, match="password"):
            sign_up(s, "erin", "short", "open")
    assert (first.role, first.status) == ("admin", "active")
    assert (waiting.role, waiting.status) == ("user", "pending")
    assert (open_.role, open_.status) == ("user", "active")


def test_sign_in_says_one_thing_for_a_wrong_name_or_password_and_stores_only_a_hash(db):
    with session_scope(db) as s:
        user = create_account(s, "alice", "correct horse")
        assert user.password_hash.startswith("$argon2id$") and "correct horse" not in user.password_hash
        assert authenticate(s, "alice", "correct horse").id == user.id
        for name, password in (("alice", "wrong password"), ("nobody", "correct horse"), ("alice", "x" * 10_000)):
            with pytest.raises(NotAllowed) as refused:
                authenticate(s, name, password)
            assert refused.value.message == WRONG_CREDENTIALS


def test_pending_and_disabled_accounts_cannot_sign_in_and_disabling_revokes_sessions(db):
    with session_scope(db) as s:
        create_account(s, "admin", "admin password", admin=True)
        pending = sign_up(s, "bob", "battery staple", "approval")
        with pytest.raises(NotAllowed, match="approval"):
            authenticate(s, "bob", "battery staple")
        set_status(s, pending, "active")
        bob = authenticate(s, "bob", "battery staple")
        epoch = bob.session_epoch
        assert session_valid(bob, epoch)
        set_status(s, bob, "disabled")
        assert not session_valid(bob, epoch) and not session_valid(bob, bob.session_epoch)
        with pytest.raises(NotAllowed, match="disabled"):
            authenticate(s, "bob", "battery staple")
        set_status(s, bob, "active")
        set_password(s, bob, "a new password")
        assert not session_valid(bob, epoch + 1) and session_valid(bob, bob.session_epoch)


def test_the_last_admin_cannot_lock_everyone_out(db):
    with session_scope(db) as s:
        admin = create_account(s, "admin", "admin password", admin=True)
        with pytest.raises(Conflict, match="last active admin"):
            set_status(s, admin, "disabled")
        with pytest.raises(Conflict, match="last active admin"):
            set_role(s, admin, "user")
        other = create_account(s, "other", "other password")
        set_role(s, other, "admin")
        set_status(s, admin, "disabled")
        assert find_account(s, "other").role == "admin" and find_account(s, str(admin.id)).status == "disabled"
        with pytest.raises(NotFound):
            find_account(s, "ghost")


def _decided_pair(s, user, text):
    turn = start_turn(s, user, None, [{"role": "user", "content": text}], [SAMPLING, SAMPLING], max_turns=10,
                      compare=True)
    for message, answer in zip(turn.answers, ("good " + text, "bad " + text), strict=True):
        message.status, message.content = "complete", answer
    s.flush()
    record_choice(s, user, turn.comparison.id, "a", eval_share=0.0)
    return turn


def test_anonymous_feedback_is_kept_but_trained_on_only_when_allowed(db):
    with session_scope(db) as s:
        member = create_account(s, "member", "member password")
        visitor = new_anonymous_identity(s)
        _decided_pair(s, member, "from a member")
        _decided_pair(s, visitor, "from a visitor")
        assert len(s.exec(select(PreferencePair)).all()) == 2
        assert count_new_pairs(s, include_anonymous=False) == 1
        assert {p.user_id for p in select_for_run(s, 50, 0.0, include_anonymous=False).new} == {member.id}
        assert count_new_pairs(s, include_anonymous=True) == 2


def test_admins_can_exclude_a_user_a_conversation_or_a_pair_and_disabled_accounts_teach_nothing(db):
    with session_scope(db) as s:
        users = [create_account(s, f"user{i}", "some password") for i in range(4)]
        turns = [_decided_pair(s, user, f"question {i}") for i, user in enumerate(users)]
        assert count_new_pairs(s) == 4
        users[0].excluded_from_training = True
        s.get(Conversation, turns[1].conversation.id).excluded_from_training = True
        s.exec(select(PreferencePair).where(PreferencePair.user_id == users[2].id)).one().excluded_from_training = True
        set_status(s, users[3], "disabled")
        s.flush()
        assert count_new_pairs(s) == 0
        assert select_for_run(s, 50, 0.0).new == []


def test_assistant_turns_sent_by_a_caller_are_not_the_models_and_cannot_be_rated(db):
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "I was written by the caller"},
               {"role": "user", "content": "And now?"}]
    with session_scope(db) as s:
        caller = User(kind="api", name="client")
        s.add(caller)
        s.flush()
        turn = start_turn(s, caller, None, history, [SAMPLING], max_turns=10, source="api")
        written = s.get(type(turn.question), turn.question.parent_id)
        assert written.role == "assistant" and written.caller_written
        assert not turn.answers[0].caller_written
        with pytest.raises(InvalidInput, match="caller sent as history"):
            record_feedback(s, caller, written.id, "up", eval_share=0.0)
