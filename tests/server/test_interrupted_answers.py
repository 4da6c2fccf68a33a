"""A restarting server regenerates only answers its own dead process left
half-done; answers other live servers are streaming are left alone."""

from __future__ import annotations

from sqlmodel import Session

from server.answers import HOST, process_identity, reset_interrupted_answers
from store.conversations import add_message, start_conversation
from store.db import make_engine, session_scope, upgrade
from store.tables import Message, User


def test_only_dead_local_processes_answers_are_reset(database_url):
    upgrade(database_url)
    db = make_engine(database_url)
    claims = {"dead": f"{HOST}:999999999", "alive": process_identity(), "elsewhere": "other-host:1", "none": None}
    ids = {}
    with session_scope(db) as session:
        user = User(kind="browser")
        session.add(user)
        session.flush()
        conversation = start_conversation(session, user, "web", "q")
        question = add_message(session, conversation, None, "user", "q")
        for name, claim in claims.items():
            message = add_message(session, conversation, question.id, "assistant", "partial", status="streaming",
                                  claimed_by=claim)
            ids[name] = message.id
    assert reset_interrupted_answers(db) == 2
    with Session(db) as session:
        status = {name: session.get(Message, i).status for name, i in ids.items()}
    db.dispose()
    assert status == {"dead": "pending", "alive": "streaming", "elsewhere": "streaming", "none": "pending"}
