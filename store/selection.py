"""Which pairs a run trains on and evaluates with (``select_for_run``).

- new: train-split pairs that no promoted run has used yet, taken fairly:
  round-robin across users (each user's oldest first), at most
  ``max_pairs_per_user`` from any one user, so neither one user nor a backlog
  of a few identities can fill a run or push other users' feedback back night
  after night;
- replay: a random sample of pairs the *active version's ancestry* trained on,
  so the adapter keeps its earlier lessons (``replay_fraction`` of the
  training set). Pairs only a rolled-back (or otherwise abandoned) version
  trained on are quarantined: never new again, never replayed;
- eval: the eval-split pairs gathered so far, at most ``max_pairs_per_user``
  per user (their newest), so a candidate cannot quietly undo an earlier
  lesson and no single user decides the gate.

Pairs a run skipped because the trainer could not use them (role ``skipped``,
with the reason on the run) are not picked again.

With a fixed step budget (``TUNELOOP_TRAIN_MAX_STEPS``) a run sees at most
``max_steps x batch_size`` pairs; ``max_train_pairs`` caps the training set to
that, so no pair is recorded as trained without having been trained on. New
pairs over the cap wait for the next run (the later rounds of the round-robin).

Pairs an admin excluded (the pair, its user, conversation or messages), from a
disabled account, or from anonymous visitors (unless TUNELOOP_TRAIN_ON_ANONYMOUS)
are left out everywhere. The
cost of a run grows with the new pairs (replay is proportional to them), not
with the history.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import and_, exists, func, or_
from sqlalchemy.orm import aliased
from sqlmodel import Session, col, select

from store.registry import active_version, ancestry
from store.tables import Conversation, Message, PreferencePair, TrainingRun, TrainingRunPair, User


@dataclass
class RunSelection:
    new: list[PreferencePair]
    replay: list[PreferencePair]
    eval: list[PreferencePair]
    capped: int  # new pairs left for later because of the per-user cap
    deferred: int = 0  # new pairs left for later because of the step budget


def eligible_pairs(include_anonymous: bool = True):
    """Filter out pairs the model must not learn from: excluded by an admin (the
    pair, its user, its conversation or either message), from a disabled
    account, or -- unless ``include_anonymous`` (TUNELOOP_TRAIN_ON_ANONYMOUS) --
    from an anonymous visitor.

    One EXISTS per message, each an index lookup: a single EXISTS over both
    messages with OR made SQLite join messages x messages per pair (minutes at
    5000 pairs)."""
    untrusted = or_(User.excluded_from_training == True, User.status == "disabled")  # noqa: E712
    if not include_anonymous:
        untrusted = or_(untrusted, User.kind == "browser")
    excluded_user = exists().where(User.id == PreferencePair.user_id, untrusted)
    excluded_chosen, excluded_rejected = (
        exists().where(message.id == column, message.excluded_from_training == True)  # noqa: E712
        for message, column in (
            (aliased(Message), PreferencePair.chosen_message_id),
            (aliased(Message), PreferencePair.rejected_message_id),
        )
    )

    answer = aliased(Message)
    # A correction's chosen side is no message: its conversation is the rejected answer's.
    excluded_conversation = exists().where(
        answer.id == func.coalesce(PreferencePair.chosen_message_id, PreferencePair.rejected_message_id),
        Conversation.id == answer.conversation_id,
        Conversation.excluded_from_training == True,  # noqa: E712
    )
    return and_(
        PreferencePair.excluded_from_training == False,  # noqa: E712
        ~excluded_user, ~excluded_chosen, ~excluded_rejected, ~excluded_conversation,
    )


def trained_pair_ids(session: Session) -> set[int]:
    """Pairs some promoted run trained on (new or replay), whatever became of its
    version since."""
    return set(
        session.exec(
            select(TrainingRunPair.pair_id)
            .join(TrainingRun, TrainingRun.id == TrainingRunPair.run_id)
            .where(TrainingRun.status == "promoted", col(TrainingRunPair.role).in_(("new", "replay")))
        ).all()
    )


def skipped_pair_ids(session: Session) -> set[int]:
    """Pairs a run could not use (too long for the model, ...)."""
    return set(session.exec(select(TrainingRunPair.pair_id).where(TrainingRunPair.role == "skipped")).all())


def lineage_pair_ids(session: Session) -> set[int]:
    """Pairs the active version and its ancestors were trained on: the only pairs
    that may be replayed."""
    run_ids = [row.training_run_id for row in ancestry(session, active_version(session)) if row.training_run_id]
    if not run_ids:
        return set()
    return set(session.exec(
        select(TrainingRunPair.pair_id)
        .where(col(TrainingRunPair.run_id).in_(run_ids), col(TrainingRunPair.role).in_(("new", "replay")))
    ).all())


def count_new_pairs(session: Session, include_anonymous: bool = True) -> int:
    used = trained_pair_ids(session) | skipped_pair_ids(session)
    ids = session.exec(
        select(PreferencePair.id).where(PreferencePair.split == "train", eligible_pairs(include_anonymous))
    ).all()
    return sum(1 for i in ids if i not in used)


def round_robin(pairs: Sequence[PreferencePair], per_user: int) -> tuple[list[PreferencePair], int]:
    """``pairs`` (oldest first) interleaved across users -- each user's oldest,
    then each user's second, ... -- with at most ``per_user`` from any user
    (imported pairs, without a user, are one uncapped source). Returns the
    order and how many the cap left out."""
    by_user: dict[int | None, list[PreferencePair]] = defaultdict(list)
    for pair in pairs:
        by_user[pair.user_id].append(pair)
    capped = 0
    for user_id, own in by_user.items():
        if user_id is not None and len(own) > per_user:
            capped += len(own) - per_user
            del own[per_user:]
    ordered = []
    for rank in range(max((len(own) for own in by_user.values()), default=0)):
        ordered.extend(own[rank] for own in by_user.values() if rank < len(own))
    return ordered, capped


def select_for_run(
    session: Session, max_pairs_per_user: int, replay_fraction: float, seed: int = 0,
    max_eval_pairs: int | None = None, max_train_pairs: int | None = None, include_anonymous: bool = True,
) -> RunSelection:
    trained = trained_pair_ids(session)
    skipped = skipped_pair_ids(session)
    train_pairs = session.exec(
        select(PreferencePair)
        .where(PreferencePair.split == "train", eligible_pairs(include_anonymous))
        .order_by(col(PreferencePair.id))
    ).all()
    new, capped = round_robin([p for p in train_pairs if p.id not in trained and p.id not in skipped],
                              max_pairs_per_user)
    replayable = lineage_pair_ids(session)
    old = [p for p in train_pairs if p.id in replayable and p.id not in skipped]
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
    held_out = session.exec(
        select(PreferencePair)
        .where(PreferencePair.split == "eval", eligible_pairs(include_anonymous))
        .order_by(col(PreferencePair.id))
    ).all()
    eval_pairs = newest_per_user([p for p in held_out if p.id not in skipped], max_pairs_per_user)
    if max_eval_pairs is not None:
        eval_pairs = cap_eval_pairs(eval_pairs, max_eval_pairs, seed)
    return RunSelection(new=new, replay=replay, eval=eval_pairs, capped=capped, deferred=deferred)


def newest_per_user(pairs: Sequence[PreferencePair], per_user: int) -> list[PreferencePair]:
    """At most ``per_user`` of each user's pairs (their newest), order kept."""
    seen: dict[int | None, int] = defaultdict(int)
    kept = []
    for pair in reversed(pairs):
        if pair.user_id is None or seen[pair.user_id] < per_user:
            seen[pair.user_id] += 1
            kept.append(pair)
    return kept[::-1]


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
