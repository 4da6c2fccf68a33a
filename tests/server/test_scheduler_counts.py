"""What the nightly schedule counts as new feedback: pairs, and single thumbs
(one each), so a product whose users only ever rate single answers still learns."""

from __future__ import annotations

from types import SimpleNamespace

from server import scheduler as scheduling
from store.conversations import add_message, start_conversation
from store.db import make_engine, session_scope, upgrade
from store.tables import Feedback, User
from tests.conftest import make_settings


def test_single_thumbs_count_toward_a_scheduled_run(tmp_path, monkeypatch):
    settings = make_settings(tmp_path, eval_share=0.0, min_new_pairs=3)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url)
    db = make_engine(settings.resolved_database_url)
    started = []
    monkeypatch.setattr(scheduling, "start_cycle",
                        lambda settings, db, trigger: started.append(trigger) or SimpleNamespace(run_id=7))

    def rate_one(question: str) -> None:
        with session_scope(db) as s:
            user = s.get(User, 1) or User(kind="api", name="caller")
            s.add(user)
            s.flush()
            conversation = start_conversation(s, user, "api", question)
            q = add_message(s, conversation, None, "user", question)
            a = add_message(s, conversation, q.id, "assistant", f"An answer to {question}")
            s.add(Feedback(message_id=a.id, user_id=user.id, rating="up"))

    tick = scheduling.RetrainScheduler(settings, db).tick
    for question in ("one?", "two?"):
        rate_one(question)
    assert tick() is None and started == []  # two single thumbs, no pair: below 3
    rate_one("three?")
    assert tick() == 7 and started == ["schedule"]
    db.dispose()
