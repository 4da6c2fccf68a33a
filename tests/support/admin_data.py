"""A small, known store for the admin dashboard's tests: conversations with
thumbs and A/B choices on several days and adapters, training runs with ORPO
step logs, adapter versions with gate evaluations, and pairs with lineage.

``seed(db)`` inserts it and returns the ids; the numbers the pages must show
follow from the docstring of each part. With ``adapters_dir``, v1-v3 get
servable folders there, so a server following the active version can load
whichever a test activates (the failed v4 never has one).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy.engine import Engine

from store import leases
from store.db import session_scope
from store.tables import (
    AdapterVersion,
    Comparison,
    Conversation,
    Feedback,
    Message,
    PreferencePair,
    TrainingRun,
    TrainingRunExample,
    TrainingRunPair,
    User,
)
from tests.support.adapter_folders import servable_folder


@dataclass
class Seeded:
    user: int
    moon: int  # conversation with three rated answers and three A/B comparisons
    old: int  # conversation 40 days ago, one thumbs up
    unrated: int  # conversation without feedback
    answers: dict[str, int]
    feedback: dict[str, int]
    runs: dict[str, int]
    pairs: dict[str, int]


def orpo_steps(count: int) -> list[dict]:
    """Step logs shaped like TRL's ORPOTrainer's (see trainer/orpo.py)."""
    return [
        {
            "step": i, "total_steps": count, "loss": 2.0 - 0.15 * i, "nll_loss": 1.6 - 0.1 * i,
            "log_odds_ratio": -0.8 + 0.1 * i, "rewards/accuracies": min(1.0, 0.25 * i),
            "rewards/margins": 0.01 * i * i, "rewards/chosen": -0.5 + 0.01 * i, "learning_rate": 1e-4,
            "epoch": i / count,
        }
        for i in range(1, count + 1)
    ]


def evaluation(promote: bool, compared_with: str, reasons: list[str]) -> dict:
    return {
        "candidate": {
            "preference_accuracy": 0.75, "mean_margin": 0.412, "chosen_nll": 1.9, "sanity_nll": 2.101, "pairs": 8,
        },
        "active": {"preference_accuracy": 0.5, "mean_margin": 0.103, "chosen_nll": 2.1, "sanity_nll": 2.05, "pairs": 8},
        "compared_with": compared_with,
        "decision": {"promote": promote, "reasons": reasons, "numbers": {
            "max_sanity_nll": 2.1525, "pairs_items": 8, "pairs_mean_gain": 0.309, "pairs_low": 0.121,
            "pairs_high": 0.498, "pairs_confidence": 0.95, "pairs_better": 7, "pairs_worse": 1,
            "pairs_sign_test_p": 0.0352,
        }},
    }


def seed(db: Engine, hold_retrain_lease: bool = False, adapters_dir: Path | None = None) -> Seeded:
    """Thumbs in the last 30 days: up 1 (a1, v2, tag helpful), down 2 (a2 base,
    tags vague+too-long; a3 v2, tag vague), the down ones yesterday. One more
    thumbs up 40 days ago. A/B: winner a (v2, today), both_bad (base,
    yesterday), one open (v2). Adapters: v1 retired, v2 active (parent v1),
    v3 rejected, v4 failed. Runs: 1 promoted (5 steps, made v2), 2 running."""
    paths = {v: f"/adapters/v{v}" for v in (1, 2, 3, 4)}
    if adapters_dir is not None:
        paths.update({v: str(servable_folder(adapters_dir / f"v{v}")) for v in (1, 2, 3)})
    now = datetime.now(timezone.utc).replace(microsecond=0)
    today, yesterday, long_ago = now, now - timedelta(days=1), now - timedelta(days=40)
    with session_scope(db) as s:
        user = User(kind="browser")
        s.add(user)
        s.flush()

        def conversation(title: str, when: datetime) -> Conversation:
            row = Conversation(user_id=user.id, title=title, created_at=when, updated_at=when)
            s.add(row)
            s.flush()
            return row

        def message(conv: Conversation, role: str, content: str, parent: Message | None = None,
                    adapter: str | None = None) -> Message:
            row = Message(conversation_id=conv.id, role=role, content=content, adapter_version=adapter,
                          parent_id=parent.id if parent else None)
            s.add(row)
            s.flush()
            return row

        moon = conversation("Moon questions", today)
        q1 = message(moon, "user", "Tell me about the moon")
        a1 = message(moon, "assistant", "The moon is **bright** at night.", q1, "v2")
        a2 = message(moon, "assistant", "Well, there are many things one could say, and", q1, None)
        a3 = message(moon, "assistant", "Moon. Rock.", q1, "v2")
        moon.current_leaf_id = a1.id
        old = conversation("Old chat about tea", long_ago)
        q4 = message(old, "user", "Green or black tea?")
        a4 = message(old, "assistant", "Green tea has less caffeine.", q4, None)
        old.current_leaf_id = a4.id
        unrated = conversation("Nobody rated this", today)
        q5 = message(unrated, "user", "Hi")
        a5 = message(unrated, "assistant", "Hello!", q5, None)
        unrated.current_leaf_id = a5.id
        s.add_all([moon, old, unrated])

        def thumbs(
            answer: Message, rating: str, when: datetime, tags: list[str], comment: str | None = None
        ) -> Feedback:
            row = Feedback(message_id=answer.id, user_id=user.id, rating=rating, tags=tags, comment=comment,
                           created_at=when, updated_at=when)
            s.add(row)
            s.flush()
            return row

        f1 = thumbs(a1, "up", today, ["helpful"], "clear and short")
        f2 = thumbs(a2, "down", yesterday, ["vague", "too-long"], "rambles")
        f3 = thumbs(a3, "down", yesterday, ["vague"])
        f4 = thumbs(a4, "up", long_ago, [])

        comp_a = Comparison(user_id=user.id, conversation_id=moon.id, message_a_id=a1.id, message_b_id=a3.id,
                            winner="a", created_at=today, decided_at=today)
        comp_bad = Comparison(user_id=user.id, conversation_id=moon.id, message_a_id=a2.id, message_b_id=a3.id,
                              winner="both_bad", created_at=yesterday, decided_at=yesterday)
        comp_open = Comparison(user_id=user.id, conversation_id=moon.id, message_a_id=a1.id, message_b_id=a2.id,
                               created_at=today)
        s.add_all([comp_a, comp_bad, comp_open])
        s.flush()

        promoted = TrainingRun(
            status="promoted", trigger="schedule", adapter_version=2, parent_version=1,
            progress={"phase": "done"}, created_at=now - timedelta(hours=3), started_at=now - timedelta(hours=3),
            finished_at=now - timedelta(hours=2, minutes=50),
            metrics={
                "pairs": {"new": 1, "replay": 0, "eval": 1, "capped_by_user_limit": 0},
                "steps": orpo_steps(5),
                "train": {"steps": 5, "seconds": 42.0, "pairs_per_second": 0.5},
                "decision": {"promote": True, "reasons": [], "numbers": {}},
            },
        )
        running = TrainingRun(
            status="running", trigger="manual", parent_version=2, created_at=now, started_at=now, heartbeat_at=now,
            progress={"phase": "training", "step": 2, "total": 10}, metrics={"steps": orpo_steps(2)},
        )
        s.add_all([promoted, running])
        s.flush()
        s.add_all([
            AdapterVersion(version=1, path=paths[1], status="retired",
                           created_at=now - timedelta(days=2), activated_at=now - timedelta(days=2)),
            AdapterVersion(version=2, path=paths[2], status="active", parent_version=1,
                           training_run_id=promoted.id, created_at=now - timedelta(hours=2, minutes=50),
                           activated_at=now - timedelta(hours=2, minutes=50),
                           metrics=evaluation(True, "v1", [])),
            AdapterVersion(version=3, path=paths[3], status="rejected", parent_version=2,
                           created_at=now - timedelta(hours=1),
                           metrics=evaluation(False, "v2", ["sanity NLL rose from 2.050 to 2.300, above 2.153"])),
            AdapterVersion(version=4, path=paths[4], status="failed", parent_version=2,
                           created_at=now - timedelta(minutes=30), error="adapter_config.json is missing"),
        ])
        from_choice = PreferencePair(
            prompt=[{"role": "user", "content": "Tell me about the moon"}], chosen=a1.content, rejected=a3.content,
            source="comparison", split="train", content_hash="h-choice", user_id=user.id,
            chosen_message_id=a1.id, rejected_message_id=a3.id, comparison_id=comp_a.id,
        )
        from_thumbs = PreferencePair(
            prompt=[{"role": "user", "content": "Tell me about the moon"}], chosen=a1.content, rejected=a2.content,
            source="thumbs", split="eval", content_hash="h-thumbs", user_id=user.id,
            chosen_message_id=a1.id, rejected_message_id=a2.id, chosen_feedback_id=f1.id, rejected_feedback_id=f2.id,
        )
        unused = PreferencePair(
            prompt=[{"role": "user", "content": "Imported question"}], chosen="yes", rejected="no",
            source="import", split="train", content_hash="h-import",
        )
        s.add_all([from_choice, from_thumbs, unused])
        s.flush()
        s.add_all([
            TrainingRunPair(run_id=promoted.id, pair_id=from_choice.id, role="new"),
            TrainingRunPair(run_id=promoted.id, pair_id=from_thumbs.id, role="eval"),
            TrainingRunExample(run_id=promoted.id, feedback_id=f3.id, label=True, role="new"),
        ])
        if hold_retrain_lease:
            leases.acquire(s, leases.RETRAIN, f"run:{running.id}", 600)
        return Seeded(
            user=user.id, moon=moon.id, old=old.id, unrated=unrated.id,
            answers={"a1": a1.id, "a2": a2.id, "a3": a3.id, "a4": a4.id, "a5": a5.id},
            feedback={"f1": f1.id, "f2": f2.id, "f3": f3.id, "f4": f4.id},
            runs={"promoted": promoted.id, "running": running.id},
            pairs={"choice": from_choice.id, "thumbs": from_thumbs.id, "import": unused.id},
        )
