"""Turning feedback into chosen/rejected pairs (``build_pairs``).

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

from sqlmodel import Session, col, select

from server.conversations import chat_context, thread
from server.models import Comparison, Conversation, Feedback, Message, PreferencePair, User


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
        and bool(message.content.strip())
        and not message.excluded_from_training
    )


class _Builder:
    def __init__(self, session: Session, eval_share: float) -> None:
        self.session = session
        self.eval_share = eval_share
        self.report = BuildReport()
        self.known = set(session.exec(select(PreferencePair.content_hash)).all())
        self.excluded_users = set(
            session.exec(select(User.id).where(User.excluded_from_training == True)).all()  # noqa: E712
        )
        self._contexts: dict[int, list[dict[str, str]]] = {}

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
        if not (_usable(chosen) and _usable(rejected)) or user_id in self.excluded_users:
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
        if digest in self.known:
            self.report.duplicates += 1
            return
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
    # so a nightly build costs what the new feedback costs, not the whole history.
    built_comparisons = dict(session.exec(
        select(PreferencePair.comparison_id, PreferencePair.chosen_message_id)
        .where(col(PreferencePair.comparison_id).is_not(None))
    ).all())
    built_thumbs = set(session.exec(
        select(PreferencePair.chosen_feedback_id, PreferencePair.rejected_feedback_id)
        .where(col(PreferencePair.chosen_feedback_id).is_not(None))
    ).all())
    for comparison in session.exec(select(Comparison).where(col(Comparison.winner).is_not(None))).all():
        if comparison.winner == "tie":
            builder.report.ties += 1
            continue
        if comparison.winner == "both_bad":
            builder.report.both_bad += 1
            continue
        winner_id = comparison.message_a_id if comparison.winner == "a" else comparison.message_b_id
        if built_comparisons.get(comparison.id) == winner_id:
            builder.report.already_built += 1
            continue
        a = session.get(Message, comparison.message_a_id)
        b = session.get(Message, comparison.message_b_id)
        chosen, rejected = (a, b) if comparison.winner == "a" else (b, a)
        builder.add("comparison", comparison.user_id, chosen, rejected, comparison_id=comparison.id)

    by_context: dict[tuple[int, int | None], dict[str, list[tuple[Feedback, Message]]]] = defaultdict(
        lambda: {"up": [], "down": []}
    )
    rows = session.exec(
        select(Feedback, Message).where(Feedback.message_id == Message.id).order_by(col(Feedback.id))
    ).all()
    for feedback, message in rows:
        by_context[(feedback.user_id, message.parent_id)][feedback.rating].append((feedback, message))
    for (user_id, _parent), rated in by_context.items():
        for up_feedback, up in rated["up"]:
            for down_feedback, down in rated["down"]:
                if (up_feedback.id, down_feedback.id) in built_thumbs:
                    builder.report.already_built += 1
                    continue
                builder.add(
                    "thumbs", user_id, up, down,
                    chosen_feedback_id=up_feedback.id, rejected_feedback_id=down_feedback.id,
                )
    session.flush()
    return builder.report
