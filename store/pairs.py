"""Turning feedback into chosen/rejected pairs.

Pairs exist as soon as the feedback does: recording a thumb or an A/B choice
builds the pairs it supports at once (``pairs_for_thumb``, ``pairs_for_choice``),
so an export right after collecting feedback has them. ``build_pairs`` builds
whatever is still missing from the whole history (idempotent; the training
cycle and every export run it). A thumb or choice that is changed withdraws the
pairs it made, unless a training run already used them (they stay, for lineage).

Sources:
- A/B choices: the winner over the loser, same context. Ties and "both bad"
  make no pair (they say nothing about which is better) but are counted.
- Thumbs: within one context (answers sharing a parent message, usually
  regenerated siblings), every up-rated answer against every down-rated one.

A pair's prompt is the full multi-turn context as chat messages. Its
``content_hash`` (prompt + chosen + rejected) deduplicates and puts it in the
train or eval split for good, so building twice adds nothing. Answers that are
unfinished, empty or identical, and users or messages an admin excluded, make
no pair.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import or_
from sqlmodel import Session, col, select

from store.conversations import chat_context, thread
from store.tables import Comparison, Conversation, Feedback, Message, PreferencePair, TrainingRunPair, User


@dataclass
class BuildReport:
    added: int = 0
    added_by_source: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    duplicates: int = 0
    already_built: int = 0  # feedback whose pair an earlier build made (not re-read: cost stays flat)
    ties: int = 0
    both_bad: int = 0
    skipped: int = 0  # unfinished, empty, identical or excluded

    def to_json(self) -> dict[str, Any]:
        return {
            "added": self.added, "added_by_source": dict(self.added_by_source),
            "duplicates": self.duplicates, "already_built": self.already_built,
            "ties": self.ties, "both_bad": self.both_bad,
            "skipped": self.skipped,
        }


def content_hash(prompt: list[dict[str, str]], chosen: str, rejected: str) -> str:
    payload = json.dumps([prompt, chosen, rejected], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def split_for(hash_hex: str, eval_share: float) -> str:
    """Stable split: the same pair always lands on the same side."""
    return "eval" if int(hash_hex[:8], 16) % 10_000 < eval_share * 10_000 else "train"


def _usable(message: Message | None) -> bool:
    return (
        message is not None
        and message.role == "assistant"
        and message.status == "complete"
        and not message.caller_written
        and bool(message.content.strip())
        and not message.excluded_from_training
    )


class _Builder:
    """Adds pairs, skipping the unusable and the already known. ``whole_history``
    loads every known hash and excluded user once (a full build); otherwise each
    is looked up (a build for one piece of feedback stays cheap)."""

    def __init__(self, session: Session, eval_share: float, whole_history: bool = True) -> None:
        self.session = session
        self.eval_share = eval_share
        self.report = BuildReport()
        self.known: set[str] | None = None
        self.excluded_users: set[int] | None = None
        if whole_history:
            self.known = set(session.exec(select(PreferencePair.content_hash)).all())
            self.excluded_users = set(
                session.exec(select(User.id).where(User.excluded_from_training == True)).all()  # noqa: E712
            )
        self._contexts: dict[int, list[dict[str, str]]] = {}

    def _is_known(self, digest: str) -> bool:
        if self.known is not None:
            return digest in self.known
        return self.session.exec(
            select(PreferencePair.id).where(PreferencePair.content_hash == digest)
        ).first() is not None

    def _is_excluded(self, user_id: int | None) -> bool:
        if user_id is None:
            return False
        if self.excluded_users is not None:
            return user_id in self.excluded_users
        user = self.session.get(User, user_id)
        return user is not None and user.excluded_from_training

    def context(self, message: Message) -> list[dict[str, str]]:
        """Chat messages before ``message`` (its parent's thread)."""
        if message.parent_id not in self._contexts:
            conversation = self.session.get(Conversation, message.conversation_id)
            self._contexts[message.parent_id] = chat_context(
                thread(self.session, conversation, message.parent_id)
            )
        return self._contexts[message.parent_id]

    def add(
        self, source: str, user_id: int | None, chosen: Message | None, rejected: Message | None, **refs: Any
    ) -> None:
        if not (_usable(chosen) and _usable(rejected)) or self._is_excluded(user_id):
            self.report.skipped += 1
            return
        assert chosen is not None and rejected is not None
        if chosen.content.strip() == rejected.content.strip():
            self.report.skipped += 1
            return
        prompt = self.context(chosen)
        if not prompt or prompt[-1]["role"] != "user":
            self.report.skipped += 1
            return
        digest = content_hash(prompt, chosen.content, rejected.content)
        if self._is_known(digest):
            self.report.duplicates += 1
            return
        if self.known is not None:
            self.known.add(digest)
        self.session.add(
            PreferencePair(
                prompt=prompt, chosen=chosen.content, rejected=rejected.content, source=source,
                split=split_for(digest, self.eval_share), content_hash=digest, user_id=user_id,
                chosen_message_id=chosen.id, rejected_message_id=rejected.id, **refs,
            )
        )
        self.report.added += 1
        self.report.added_by_source[source] += 1


def build_pairs(session: Session, eval_share: float = 0.1) -> BuildReport:
    """Add every pair the feedback supports that is not in the store yet.
    The caller commits."""
    builder = _Builder(session, eval_share)
    # Feedback already turned into pairs is skipped before any message is loaded,
    # so a build costs what the new feedback costs, not the whole history.
    built_comparisons = dict(session.exec(
        select(PreferencePair.comparison_id, PreferencePair.chosen_message_id)
        .where(col(PreferencePair.comparison_id).is_not(None))
    ).all())
    built_thumbs = set(session.exec(
        select(PreferencePair.chosen_feedback_id, PreferencePair.rejected_feedback_id)
        .where(col(PreferencePair.chosen_feedback_id).is_not(None))
    ).all())
    for comparison in session.exec(select(Comparison).where(col(Comparison.winner).is_not(None))).all():
        winner_id = comparison.message_a_id if comparison.winner == "a" else comparison.message_b_id
        if comparison.winner in ("a", "b") and built_comparisons.get(comparison.id) == winner_id:
            builder.report.already_built += 1
            continue
        _add_choice(builder, comparison)

    by_context: dict[tuple[int, int | None], _Rated] = defaultdict(lambda: {"up": [], "down": []})
    rows = session.exec(
        select(Feedback, Message).where(Feedback.message_id == Message.id).order_by(col(Feedback.id))
    ).all()
    for feedback, message in rows:
        by_context[(feedback.user_id, message.parent_id)][feedback.rating].append((feedback, message))
    for (user_id, _parent), rated in by_context.items():
        _add_thumbs(builder, user_id, rated, built_thumbs)
    session.flush()
    return builder.report


_Rated = dict[str, list[tuple[Feedback, Message]]]


def _add_choice(builder: _Builder, comparison: Comparison) -> None:
    if comparison.winner == "tie":
        builder.report.ties += 1
        return
    if comparison.winner == "both_bad":
        builder.report.both_bad += 1
        return
    a = builder.session.get(Message, comparison.message_a_id)
    b = builder.session.get(Message, comparison.message_b_id)
    chosen, rejected = (a, b) if comparison.winner == "a" else (b, a)
    builder.add("comparison", comparison.user_id, chosen, rejected, comparison_id=comparison.id)


def _add_thumbs(builder: _Builder, user_id: int, rated: _Rated, built: set[tuple[int, int]]) -> None:
    """Within one context, every up-rated answer over every down-rated one."""
    for up_feedback, up in rated["up"]:
        for down_feedback, down in rated["down"]:
            if (up_feedback.id, down_feedback.id) in built:
                builder.report.already_built += 1
                continue
            builder.add(
                "thumbs", user_id, up, down,
                chosen_feedback_id=up_feedback.id, rejected_feedback_id=down_feedback.id,
            )


def _withdraw(session: Session, made_by) -> int:
    """Delete the pairs matching ``made_by`` that no training run has used (a
    used pair stays: an adapter's lineage must keep pointing at it). Returns
    how many went."""
    used = select(TrainingRunPair.pair_id).where(TrainingRunPair.pair_id == PreferencePair.id)
    stale = session.exec(select(PreferencePair).where(made_by, ~used.exists())).all()
    for pair in stale:
        session.delete(pair)
    session.flush()
    return len(stale)


def pairs_for_choice(session: Session, comparison: Comparison, eval_share: float) -> BuildReport:
    """The pair an A/B choice supports (the winner over the other answer), built
    now; a pair from an earlier, different choice on it is withdrawn."""
    _withdraw(session, PreferencePair.comparison_id == comparison.id)
    builder = _Builder(session, eval_share, whole_history=False)
    _add_choice(builder, comparison)
    session.flush()
    return builder.report


def pairs_for_thumb(session: Session, feedback: Feedback, eval_share: float) -> BuildReport:
    """The pairs a thumb supports within its context (the same user's opposite
    thumbs on answers to the same message), built now; pairs from an earlier
    rating of the same thumb are withdrawn."""
    _withdraw(session, or_(
        PreferencePair.chosen_feedback_id == feedback.id, PreferencePair.rejected_feedback_id == feedback.id
    ))
    message = session.get(Message, feedback.message_id)
    builder = _Builder(session, eval_share, whole_history=False)
    if message is None:
        return builder.report
    rated: _Rated = {"up": [], "down": []}
    for other, answer in session.exec(
        select(Feedback, Message)
        .where(
            Feedback.message_id == Message.id, Feedback.user_id == feedback.user_id,
            Message.conversation_id == message.conversation_id, Message.parent_id == message.parent_id,
        )
        .order_by(col(Feedback.id))
    ).all():
        rated[other.rating].append((other, answer))
    # Only the combinations that include this thumb are new.
    own = [(f, m) for f, m in rated[feedback.rating] if f.id == feedback.id]
    opposite = "down" if feedback.rating == "up" else "up"
    _add_thumbs(builder, feedback.user_id, {feedback.rating: own, opposite: rated[opposite]}, set())
    session.flush()
    return builder.report
