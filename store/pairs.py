"""Turning feedback into chosen/rejected pairs.

Pairs exist as soon as the feedback does: recording a thumb or an A/B choice
builds the pairs it supports at once, in the same transaction (``thumb_pairs``,
``choice_pairs``: Core statements, called by ``store.feedback``; a
transaction's pair changes go in together, ``PairChanges``), so an export
right after collecting feedback has them. ``build_pairs`` builds whatever is
still missing from the whole history (idempotent; the training cycle and every
export run it). A thumb or choice that is changed withdraws the pairs it made,
unless a training run already used them (they stay, for lineage). Both ways
decide a pair with the one function ``pair_values``.

Sources:
- A/B choices: the winner over the loser, same context. Ties and "both bad"
  make no pair (they say nothing about which is better) but are counted.
- Thumbs: within one context (answers sharing a parent message, usually
  regenerated siblings), every up-rated answer against every down-rated one.
- Corrections (``store.corrections``): the text a user wrote as the answer
  they wanted over the model's answer it corrects (``correction_pair``); the
  chosen side is no message, so the pair names only the rejected one.

A pair's prompt is the full multi-turn context as chat messages. Its
``content_hash`` (prompt + chosen + rejected) deduplicates and puts it in the
train or eval split for good, so building twice adds nothing. Answers that are
unfinished, empty or identical (two samples: near-identical), and users or messages an admin excluded, make
no pair.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from sqlalchemy import and_, bindparam, delete, or_
from sqlalchemy import select as core_select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlmodel import Session, col, select

from store.conversations import chat_context, thread
from store.tables import (
    Comparison,
    Conversation,
    Correction,
    Feedback,
    Message,
    PreferencePair,
    TrainingRunPair,
    User,
    utcnow,
)


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


def usable_answer(message: Any) -> bool:
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
        values = None
        if not self._is_excluded(user_id):
            values = pair_values(source, user_id, chosen, rejected, lambda: self.context(chosen),
                                 self.eval_share, **refs)
        if values is None:
            self.report.skipped += 1
            return
        digest = values["content_hash"]
        if self._is_known(digest):
            self.report.duplicates += 1
            return
        if self.known is not None:
            self.known.add(digest)
        self.session.add(PreferencePair(**values))
        self.report.added += 1
        self.report.added_by_source[source] += 1


NEAR_IDENTICAL = 0.95
"""Similarity (difflib's ratio) from which two sampled answers teach nothing as a pair."""


def near_identical(a: str, b: str) -> bool:
    """Two answers that differ only in case, spacing or punctuation, or in a few
    characters of a long text (similarity >= NEAR_IDENTICAL): which one a user
    picked says almost nothing, and a pair of them would train the model on
    noise. Not applied to corrections, where a small edit is the whole lesson."""
    plain_a, plain_b = _plain(a), _plain(b)
    if plain_a == plain_b:
        return True
    matcher = difflib.SequenceMatcher(None, plain_a, plain_b, autojunk=False)
    return (matcher.real_quick_ratio() >= NEAR_IDENTICAL and matcher.quick_ratio() >= NEAR_IDENTICAL
            and matcher.ratio() >= NEAR_IDENTICAL)  # cheap upper bounds first


@functools.lru_cache(maxsize=4096)  # an answer is compared with each of its siblings: normalise it once
def _plain(text: str) -> str:
    return " ".join("".join(c for c in text.casefold() if c.isalnum() or c.isspace()).split())


def pair_values(
    source: str, user_id: int | None, chosen: Any, rejected: Any, context: Callable[[], list[dict[str, str]]],
    eval_share: float, **refs: Any,
) -> dict[str, Any] | None:
    """The pair ``chosen`` over ``rejected`` makes, as PreferencePair column
    values; None when they make none (an answer unusable, both the same text --
    or, for two of the model's samples, near-identical: ``near_identical`` --
    or no user question right before them). ``chosen``/``rejected`` are any
    objects with a message's fields (ORM rows or Core rows); ``context()``
    gives the chat before them and is called only when needed."""
    if not (usable_answer(chosen) and usable_answer(rejected)):
        return None
    if chosen.content.strip() == rejected.content.strip():
        return None
    if source != "correction" and near_identical(chosen.content, rejected.content):
        return None
    prompt = context()
    if not prompt or prompt[-1]["role"] != "user":
        return None
    digest = content_hash(prompt, chosen.content, rejected.content)
    return {
        "prompt": prompt, "chosen": chosen.content, "rejected": rejected.content, "source": source,
        "split": split_for(digest, eval_share), "content_hash": digest, "user_id": user_id,
        "chosen_message_id": chosen.id, "rejected_message_id": rejected.id, **refs,
    }


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
    _add_corrections(builder)
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


def _add_corrections(builder: _Builder) -> None:
    """The pairs of corrections that have none yet (made while their user or
    answer was excluded, say); those with their pair are left in the database."""
    has_pair = (
        select(PreferencePair.id)
        .where(PreferencePair.source == "correction", PreferencePair.user_id == Correction.user_id,
               PreferencePair.rejected_message_id == Correction.message_id,
               PreferencePair.chosen == Correction.content)
        .exists()
    )
    rows = builder.session.exec(
        select(Correction, Message).where(Correction.message_id == Message.id, ~has_pair)
        .order_by(col(Correction.id))
    ).all()
    for correction, answer in rows:
        builder.add("correction", correction.user_id, corrected_answer(answer, correction.content), answer)


# --- building at the moment feedback is recorded: Core, in the writer's transaction ---
# Statements are built once, with bound parameters: SQLAlchemy then skips
# constructing them and reuses their compiled form (this runs per feedback write).

ANSWER_FIELDS = (
    "id", "conversation_id", "parent_id", "role", "content", "status", "caller_written", "excluded_from_training",
)
"""The message columns deciding whether an answer makes a pair (``usable_answer``) and where its context is."""

_PAIRS = PreferencePair.__table__
_RUN_PAIRS = TrainingRunPair.__table__
_MESSAGES = Message.__table__
_FEEDBACK = Feedback.__table__

_WITHDRAW = delete(_PAIRS).where(
    or_(_PAIRS.c.chosen_feedback_id.in_(bindparam("feedback_ids", expanding=True)),
        _PAIRS.c.rejected_feedback_id.in_(bindparam("feedback_ids", expanding=True)),
        _PAIRS.c.comparison_id.in_(bindparam("comparison_ids", expanding=True))),
    ~core_select(_RUN_PAIRS.c.pair_id).where(_RUN_PAIRS.c.pair_id == _PAIRS.c.id).exists(),
)
_THREAD = core_select(
    _MESSAGES.c.id, _MESSAGES.c.parent_id, _MESSAGES.c.role, _MESSAGES.c.content, _MESSAGES.c.status
).where(_MESSAGES.c.conversation_id == bindparam("conversation_id"))
# The answers to one message (the parent's index), then their thumbs by the unique
# (message, user) index. ``user_id + 0`` keeps SQLite's planner, which has no
# statistics, off the user_id index: a user's thumbs on everything, a scan that
# grows with their history.
_OPPOSITE_THUMBS = (
    core_select(_FEEDBACK.c.id.label("feedback_id"), *(_MESSAGES.c[name] for name in ANSWER_FIELDS))
    .select_from(_MESSAGES.join(_FEEDBACK, and_(_FEEDBACK.c.message_id == _MESSAGES.c.id,
                                                _FEEDBACK.c.user_id + 0 == bindparam("user_id"))))
    .where(_MESSAGES.c.parent_id == bindparam("parent_id"),
           _MESSAGES.c.conversation_id == bindparam("conversation_id"),
           _FEEDBACK.c.rating == bindparam("rating"))
    .order_by(_FEEDBACK.c.id)
)
_INSERT_PAIRS = {
    "sqlite": sqlite.insert(_PAIRS).on_conflict_do_nothing(index_elements=["content_hash"]),
    "postgresql": postgresql.insert(_PAIRS).on_conflict_do_nothing(index_elements=["content_hash"]),
}


class PairChanges:
    """The pair changes of one transaction's feedback writes, applied together
    by :meth:`flush` before it commits: one DELETE for every withdrawal, one
    INSERT for every new pair, instead of two statements per write.

    Kept equal to doing each at once: a withdrawal also drops the pending pairs
    of that thumb or choice (made earlier in the transaction, not stored yet),
    and the DELETE runs before the INSERT, so a pair withdrawn and made again
    in one transaction is stored once. It also caches each context read.
    """

    def __init__(self) -> None:
        self.contexts: dict[tuple[int, int | None], list[dict[str, str]]] = {}
        self.pending: dict[str, dict[str, Any]] = {}  # content hash -> row; the first one made wins
        self._made_by: dict[tuple[str, int], set[str]] = defaultdict(set)  # (kind, id) -> hashes pending
        self._sources: dict[str, list[tuple[str, int]]] = {}  # hash pending -> its (kind, id)s
        self.feedback_ids: set[int] = set()
        self.comparison_ids: set[int] = set()

    def withdraw_thumb(self, feedback_id: int) -> None:
        """The pairs thumb ``feedback_id`` made go, unless a training run used them
        (a used pair stays: an adapter's lineage must keep pointing at it)."""
        self.feedback_ids.add(feedback_id)
        self._drop(("feedback", feedback_id))

    def withdraw_choice(self, comparison_id: int) -> None:
        """The same for the pair of comparison ``comparison_id``."""
        self.comparison_ids.add(comparison_id)
        self._drop(("comparison", comparison_id))

    def _drop(self, source: tuple[str, int]) -> None:
        for digest in self._made_by.pop(source, ()):
            del self.pending[digest]
            for other in self._sources.pop(digest):
                if other != source:
                    self._made_by[other].discard(digest)

    def add(self, values: dict[str, Any]) -> None:
        """A new pair (``pair_values``); one with a hash already made or stored is left out."""
        digest = values["content_hash"]
        if digest in self.pending:
            return
        self.pending[digest] = values
        sources = [(kind, values[key]) for kind, key in (("feedback", "chosen_feedback_id"),
                                                         ("feedback", "rejected_feedback_id"),
                                                         ("comparison", "comparison_id"))
                   if values.get(key) is not None]
        self._sources[digest] = sources
        for source in sources:
            self._made_by[source].add(digest)

    def flush(self, conn: Connection) -> None:
        """Apply the withdrawals, then insert the new pairs (a hash already stored
        is left out by the database, so a concurrent build in another process
        cannot make this fail)."""
        if self.feedback_ids or self.comparison_ids:
            conn.execute(_WITHDRAW, {"feedback_ids": sorted(self.feedback_ids),
                                     "comparison_ids": sorted(self.comparison_ids)})
        if self.pending:
            _insert_pairs(conn, list(self.pending.values()))
        self.feedback_ids, self.comparison_ids, self.pending = set(), set(), {}
        self._made_by.clear()
        self._sources.clear()

    def context(self, conn: Connection, conversation_id: int, parent_id: int | None) -> list[dict[str, str]]:
        """The chat messages of the thread ending at ``parent_id`` (what an answer
        to it was given), read once per transaction."""
        key = (conversation_id, parent_id)
        if key not in self.contexts:
            by_id = {row.id: row for row in conn.execute(_THREAD, {"conversation_id": conversation_id})}
            path = []
            node = by_id.get(parent_id) if parent_id is not None else None
            while node is not None:
                path.append(node)
                node = by_id.get(node.parent_id) if node.parent_id is not None else None
            path.reverse()
            self.contexts[key] = chat_context(path)
        return self.contexts[key]


def _insert_pairs(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    now = utcnow()
    by_source: dict[str, list[dict[str, Any]]] = defaultdict(list)  # one key set per executemany
    for row in rows:
        by_source[row["source"]].append({"excluded_from_training": False, "created_at": now, **row})
    statement = _INSERT_PAIRS.get(conn.dialect.name)
    for same_keys in by_source.values():
        if statement is not None:
            conn.execute(statement, same_keys)
            continue
        hashes = [row["content_hash"] for row in same_keys]
        known = set(conn.execute(
            core_select(_PAIRS.c.content_hash).where(_PAIRS.c.content_hash.in_(hashes))
        ).scalars())
        fresh = [row for row in same_keys if row["content_hash"] not in known]
        if fresh:
            conn.execute(_PAIRS.insert(), fresh)


def thumb_pairs(
    conn: Connection, changes: PairChanges, feedback_id: int, user_id: int, rating: str, answer: Any,
    eval_share: float,
) -> None:
    """The pairs a (new or changed) thumb supports within its context: the same
    user's opposite thumbs on answers to the same message -- up over down.
    ``answer``: the rated message's ANSWER_FIELDS. The caller withdrew what its
    old rating made and checked the user is not excluded."""
    if answer.parent_id is None:  # an answer without a question before it makes no pair
        return
    others = conn.execute(_OPPOSITE_THUMBS, {
        "parent_id": answer.parent_id, "conversation_id": answer.conversation_id, "user_id": user_id,
        "rating": "down" if rating == "up" else "up",
    }).all()
    for other in others:
        if rating == "up":
            chosen, rejected, refs = answer, other, (feedback_id, other.feedback_id)
        else:
            chosen, rejected, refs = other, answer, (other.feedback_id, feedback_id)
        values = pair_values(
            "thumbs", user_id, chosen, rejected,
            lambda: changes.context(conn, answer.conversation_id, answer.parent_id), eval_share,
            chosen_feedback_id=refs[0], rejected_feedback_id=refs[1],
        )
        if values is not None:
            changes.add(values)


def choice_pairs(
    conn: Connection, changes: PairChanges, comparison_id: int, user_id: int, chosen: Any, rejected: Any,
    eval_share: float,
) -> None:
    """The pair an A/B choice supports: the winner over the other answer. The
    caller withdrew the pair of an earlier choice and checked the user is not
    excluded."""
    values = pair_values(
        "comparison", user_id, chosen, rejected,
        lambda: changes.context(conn, chosen.conversation_id, chosen.parent_id), eval_share,
        comparison_id=comparison_id,
    )
    if values is not None:
        changes.add(values)


# --- corrections ------------------------------------------------------------------

SOURCES = ("comparison", "thumbs", "correction", "import")
"""Every ``PreferencePair.source``."""

_WITHDRAW_CORRECTION = delete(_PAIRS).where(
    _PAIRS.c.source == "correction", _PAIRS.c.user_id == bindparam("user_id"),
    _PAIRS.c.rejected_message_id == bindparam("message_id"),
    ~core_select(_RUN_PAIRS.c.pair_id).where(_RUN_PAIRS.c.pair_id == _PAIRS.c.id).exists(),
)
_PAIR_BY_HASH = core_select(_PAIRS.c.id).where(_PAIRS.c.content_hash == bindparam("content_hash"))


def corrected_answer(answer: Any, text: str) -> SimpleNamespace:
    """``text`` as the answer the user wanted in ``answer``'s place: an object
    with a message's fields for ``pair_values`` (no id: it is no message)."""
    return SimpleNamespace(
        id=None, conversation_id=answer.conversation_id, parent_id=answer.parent_id, role="assistant",
        content=text, status="complete", caller_written=False, excluded_from_training=False,
    )


def withdraw_correction(conn: Connection, user_id: int, message_id: int) -> None:
    """Delete the pair ``user_id``'s correction of answer ``message_id`` made,
    unless a training run used it (then it stays, for the adapter's lineage)."""
    conn.execute(_WITHDRAW_CORRECTION, {"user_id": user_id, "message_id": message_id})


def correction_pair(
    conn: Connection, changes: PairChanges, user_id: int, text: str, answer: Any, eval_share: float
) -> int | None:
    """Store the pair of a correction -- ``text`` chosen over ``answer`` (its
    ANSWER_FIELDS), source ``correction`` -- and return its id; None when
    ``pair_values`` makes none (the answer is excluded, say). Stored at once,
    not with ``changes``' pairs at its flush, so that a later correction of the
    same answer in the same transaction withdraws it (``withdraw_correction``);
    a pair with the same content already stored is kept and its id returned.
    The caller withdrew the correction's earlier pair and checked the user is
    not excluded."""
    values = pair_values(
        "correction", user_id, corrected_answer(answer, text), answer,
        lambda: changes.context(conn, answer.conversation_id, answer.parent_id), eval_share,
    )
    if values is None:
        return None
    _insert_pairs(conn, [values])
    return conn.execute(_PAIR_BY_HASH, {"content_hash": values["content_hash"]}).scalar()
