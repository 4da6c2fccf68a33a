"""Which pairs a run trains on and evaluates with (``select_for_run``).

- new: train-split pairs that no promoted run has trained on yet, at most
  ``max_pairs_per_user`` from any one user (oldest first), so a single user
  cannot steer the model;
- replay: a random sample of pairs earlier promoted runs trained on, so the
  adapter keeps its earlier lessons (``replay_fraction`` of the training set);
- eval: every eval-split pair gathered so far, so a candidate cannot quietly
  undo an earlier lesson.

With a fixed step budget (``TUNELOOP_TRAIN_MAX_STEPS``) a run sees at most
``max_steps x batch_size`` pairs; ``max_train_pairs`` caps the training set to
that, so no pair is recorded as trained without having been trained on. New
pairs over the cap wait for the next run (oldest go first).

Pairs whose user or messages an admin excluded are left out everywhere. The
cost of a run grows with the new pairs (replay is proportional to them), not
with the history.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass

from sqlalchemy import and_, exists
from sqlalchemy.orm import aliased
from sqlmodel import Session, col, select

from store.tables import Message, PreferencePair, TrainingRun, TrainingRunPair, User


@dataclass
class RunSelection:
    new: list[PreferencePair]
    replay: list[PreferencePair]
    eval: list[PreferencePair]
    capped: int  # new pairs left for later because of the per-user cap
    deferred: int = 0  # new pairs left for later because of the step budget


def eligible_pairs():
    """Filter out pairs an admin excluded (by user or by either message).

    One EXISTS per message, each an index lookup: a single EXISTS over both
    messages with OR made SQLite join messages x messages per pair (minutes at
    5000 pairs)."""
    excluded_user = exists().where(User.id == PreferencePair.user_id, User.excluded_from_training == True)  # noqa: E712
    excluded_chosen, excluded_rejected = (
        exists().where(message.id == column, message.excluded_from_training == True)  # noqa: E712
        for message, column in (
            (aliased(Message), PreferencePair.chosen_message_id),
            (aliased(Message), PreferencePair.rejected_message_id),
        )
    )
    return and_(~excluded_user, ~excluded_chosen, ~excluded_rejected)


def trained_pair_ids(session: Session) -> set[int]:
    """Pairs some promoted run trained on (they are in the served adapter's past)."""
    return set(
        session.exec(
            select(TrainingRunPair.pair_id)
            .join(TrainingRun, TrainingRun.id == TrainingRunPair.run_id)
            .where(TrainingRun.status == "promoted", col(TrainingRunPair.role).in_(("new", "replay")))
        ).all()
    )


def count_new_pairs(session: Session) -> int:
    trained = trained_pair_ids(session)
    ids = session.exec(select(PreferencePair.id).where(PreferencePair.split == "train", eligible_pairs())).all()
    return sum(1 for i in ids if i not in trained)


def select_for_run(
    session: Session, max_pairs_per_user: int, replay_fraction: float, seed: int = 0,
    max_eval_pairs: int | None = None, max_train_pairs: int | None = None,
) -> RunSelection:
    trained = trained_pair_ids(session)
    train_pairs = session.exec(
        select(PreferencePair)
        .where(PreferencePair.split == "train", eligible_pairs())
        .order_by(col(PreferencePair.id))
    ).all()
    per_user: dict[int | None, int] = defaultdict(int)
    new, capped = [], 0
    for pair in train_pairs:
        if pair.id in trained:
            continue
        if pair.user_id is not None and per_user[pair.user_id] >= max_pairs_per_user:
            capped += 1
            continue
        per_user[pair.user_id] += 1
        new.append(pair)
    old = [p for p in train_pairs if p.id in trained]
    replaying = bool(old) and 0 < replay_fraction < 1
    cap = max_train_pairs if max_train_pairs is not None and max_train_pairs > 0 else None
    deferred = 0
    if cap is not None:
        room = max(1, int(cap * (1 - replay_fraction))) if replaying else cap
        deferred = max(0, len(new) - room)
        new = new[:room]
    replay: list[PreferencePair] = []
    if new and replaying:
        wanted = round(len(new) * replay_fraction / (1 - replay_fraction))
        if cap is not None:
            wanted = min(wanted, cap - len(new))
        replay = random.Random(seed).sample(old, min(wanted, len(old)))
    eval_pairs = list(
        session.exec(
            select(PreferencePair)
            .where(PreferencePair.split == "eval", eligible_pairs())
            .order_by(col(PreferencePair.id))
        ).all()
    )
    if max_eval_pairs is not None:
        eval_pairs = cap_eval_pairs(eval_pairs, max_eval_pairs, seed)
    return RunSelection(new=new, replay=replay, eval=eval_pairs, capped=capped, deferred=deferred)


def cap_eval_pairs(pairs: list[PreferencePair], limit: int, seed: int = 0) -> list[PreferencePair]:
    """At most ``limit`` held-out pairs (oldest first in, same order out): the
    newest half of the limit, plus a seeded random sample of the older ones, so
    the gate still checks old preferences (forgetting) while its cost stays flat
    as the history grows."""
    if len(pairs) <= limit:
        return pairs
    newest = limit - limit // 2
    older = random.Random(seed).sample(pairs[:-newest], limit - newest)
    return sorted(older, key=lambda p: p.id or 0) + pairs[-newest:]
