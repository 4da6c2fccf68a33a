"""A training cycle on the real small model fed only single thumbs: the case
that used to teach nothing (no pair can be made), now a KTO stage."""

from __future__ import annotations

from sqlmodel import select

from store.conversations import start_turn
from store.db import make_engine, session_scope, upgrade
from store.examples import select_examples_for_run
from store.feedback import record_feedback
from store.run_lease import open_run
from store.tables import AdapterVersion, TrainingRun, TrainingRunExample, User
from tests.conftest import REPO, make_settings
from trainer.cycle import run_cycle

MODEL = str(REPO / "models/smollm2-135m-instruct")


def test_a_night_of_single_thumbs_trains_and_is_gated_on_held_out_thumbs(tmp_path):
    settings = make_settings(
        tmp_path, model=MODEL, train_max_steps=2, train_batch_size=4, eval_share=0.3, replay_fraction=0.0,
    )
    settings.data_dir.mkdir(parents=True)
    upgrade(settings.resolved_database_url)
    db = make_engine(settings.resolved_database_url)
    with session_scope(db) as s:
        user = User(kind="api", name="caller")
        s.add(user)
        s.flush()
        for i in range(16):  # one answer per question, rated alone: no pair can be made
            turn = start_turn(s, user, None, [{"role": "user", "content": f"Name a colour, please ({i})."}],
                              [{"temperature": 1.0}], max_turns=10)
            (answer,) = turn.answers
            short = i % 2 == 0
            answer.status = "complete"
            answer.content = "Blue." if short else "Well, there are so many colours that it is hard to choose one"
            s.flush()
            record_feedback(s, user, answer.id, "up" if short else "down", eval_share=settings.eval_share)
    run_id = open_run(db, "manual")
    status = run_cycle(settings, run_id)
    with session_scope(db) as s:
        run = s.get(TrainingRun, run_id)
        roles = [link.role for link in s.exec(select(TrainingRunExample)).all()]
        version = s.exec(select(AdapterVersion)).one()
        after = select_examples_for_run(s, settings.eval_share, 50)
    db.dispose()
    assert status in ("promoted", "rejected") and run.status == status
    assert run.metrics["pairs"]["new"] == 0 and run.metrics["examples"]["new"] == roles.count("new") >= 2
    assert roles.count("eval") == run.metrics["examples"]["eval"] >= 1
    assert run.metrics["train"]["kto"]["steps"] == 2 and run.metrics["train"]["examples"] == roles.count("new")
    numbers = run.metrics["decision"]["numbers"]
    assert numbers["examples"] == roles.count("eval") and numbers["candidate_example_accuracy"] is not None
    assert numbers["active_example_accuracy"] == 0.0  # the base model is its own reference
    assert any("single thumbs" in reason for reason in run.metrics["decision"]["reasons"])
    assert version.version == 1 and version.status in ("active", "rejected")
    interpolation = run.metrics["interpolation"]  # the sanity budget was fitted before the gate
    assert interpolation["trials"][0]["scale"] == 1.0 and interpolation["scale"] in (1.0, 0.75, 0.5, 0.25)
    # a run takes what its step budget reaches (2 steps x 4); what a promoted run
    # trained on is not new again, a rejected run's thumbs wait for the next
    deferred = run.metrics["examples"]["deferred_by_step_budget"]
    assert roles.count("new") == 8 and deferred >= 1
    assert len(after.new) == deferred + (0 if status == "promoted" else roles.count("new"))
