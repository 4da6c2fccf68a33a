"""What the admin dashboard shows, computed from the store as plain data:
feedback statistics under filters, conversations with their feedback, pairs
with their sources and the runs that used them, adapter evaluations.

No HTML here (templates under ``web/templates/admin/`` render it) and no
requests: every function takes a ``Session`` and returns dataclasses, so the
numbers can be tested without a page. Times are UTC; a day is a UTC day.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from typing import Any
from urllib.parse import urlencode

from sqlmodel import Session, col, func, select

from store.conversations import thread
from store.errors import StoreError
from store.registry import active_version, list_versions, parse_version, version_name
from store.registry import rollback_target as _rollback_target
from store.tables import (
    AdapterVersion,
    Comparison,
    Conversation,
    Feedback,
    Message,
    PreferencePair,
    TrainingRun,
    TrainingRunPair,
    User,
)

DEFAULT_DAYS = 30
MAX_DAYS = 366
PAGE_SIZE = 25
WINNERS = ("a", "b", "tie", "both_bad")
BASE = "base"


def _utc_day(value: datetime) -> date:
    """SQLite hands back naive datetimes (stored as UTC), PostgreSQL aware ones."""
    if value.tzinfo is not None:
        value = value.astimezone(timezone.utc)
    return value.date()


# --- filters ------------------------------------------------------------------


@dataclass
class Filters:
    """The dashboard's filters: a UTC date range (both ends included), a feedback
    tag and an adapter version (``"base"``, ``"v3"``, or ``""`` for all)."""

    start: date
    end: date
    tag: str = ""
    adapter: str = ""
    errors: list[str] = field(default_factory=list)

    @property
    def since(self) -> datetime:
        return datetime.combine(self.start, time.min, tzinfo=timezone.utc)

    @property
    def until(self) -> datetime:
        return datetime.combine(self.end + timedelta(days=1), time.min, tzinfo=timezone.utc)

    @property
    def adapter_value(self) -> str | None:
        """The ``Message.adapter_version`` to match (None: the base model)."""
        return None if self.adapter == BASE else self.adapter

    def params(self) -> dict[str, str]:
        values = {"start": self.start.isoformat(), "end": self.end.isoformat()}
        return {**values, **{k: v for k, v in (("tag", self.tag), ("adapter", self.adapter)) if v}}

    def query(self, **extra: Any) -> str:
        """URL query string of these filters plus ``extra`` (None values dropped)."""
        values = {**self.params(), **{k: str(v) for k, v in extra.items() if v not in (None, "")}}
        return urlencode(values)


def _parse_date(text: str | None, name: str, errors: list[str]) -> date | None:
    if not text or not text.strip():
        return None
    try:
        return date.fromisoformat(text.strip())
    except ValueError:
        errors.append(f"{name} date {text!r} is not a date; write it as YYYY-MM-DD")
        return None


def parse_filters(
    start: str | None, end: str | None, tag: str | None, adapter: str | None, today: date
) -> Filters:
    """Filters from query parameters. Bad values are replaced by defaults (the
    last :data:`DEFAULT_DAYS` days, all tags, all adapters) and explained in
    ``errors``, so the page still renders and says what to fix."""
    errors: list[str] = []
    end_day = _parse_date(end, "end", errors) or today
    start_day = _parse_date(start, "start", errors) or end_day - timedelta(days=DEFAULT_DAYS - 1)
    if start_day > end_day:
        errors.append(f"the start date {start_day} is after the end date {end_day}; they were swapped")
        start_day, end_day = end_day, start_day
    if (end_day - start_day).days >= MAX_DAYS:
        start_day = end_day - timedelta(days=MAX_DAYS - 1)
        errors.append(f"the date range is limited to {MAX_DAYS} days; showing {start_day} to {end_day}")
    adapter_name = (adapter or "").strip().lower()
    if adapter_name:
        try:
            adapter_name = version_name(parse_version(adapter_name))
        except StoreError as exc:
            errors.append(f"{exc}; showing all adapters")
            adapter_name = ""
    return Filters(start_day, end_day, (tag or "").strip().lower(), adapter_name, errors)


def adapter_choices(session: Session) -> list[str]:
    return [BASE] + [row.name for row in reversed(list_versions(session))]


# --- feedback overview ----------------------------------------------------------


@dataclass
class DayCount:
    day: date
    up: int = 0
    down: int = 0

    @property
    def total(self) -> int:
        return self.up + self.down


@dataclass
class FeedbackStats:
    days: list[DayCount]
    up: int
    down: int
    outcomes: dict[str, int]
    undecided: int
    tags: list[tuple[str, int]]

    @property
    def ratings(self) -> int:
        return self.up + self.down

    @property
    def up_share(self) -> float | None:
        return self.up / self.ratings if self.ratings else None

    @property
    def decided(self) -> int:
        return sum(self.outcomes.values())


def _adapter_clause(filters: Filters) -> Any:
    value = filters.adapter_value
    return col(Message.adapter_version).is_(None) if value is None else Message.adapter_version == value


def feedback_stats(session: Session, filters: Filters) -> FeedbackStats:
    """Thumbs per day, up/down totals and A/B outcomes under ``filters``.

    Thumbs count on the day they were first given; A/B choices on the day they
    were made. The tag filter applies to thumbs only (choices carry no tags);
    the adapter filter to the version that wrote the answer.
    """
    query = (
        select(Feedback.created_at, Feedback.rating, Feedback.tags)
        .join(Message, col(Message.id) == Feedback.message_id)
        .where(Feedback.created_at >= filters.since, Feedback.created_at < filters.until)
    )
    if filters.adapter:
        query = query.where(_adapter_clause(filters))
    rows = session.exec(query).all()
    tag_counts: Counter[str] = Counter(tag for _, _, tags in rows for tag in (tags or []))
    if filters.tag:
        rows = [row for row in rows if filters.tag in (row[2] or [])]

    days = [DayCount(filters.start + timedelta(days=i)) for i in range((filters.end - filters.start).days + 1)]
    by_day = {d.day: d for d in days}
    for created_at, rating, _ in rows:
        bucket = by_day.get(_utc_day(created_at))
        if bucket is not None:
            if rating == "up":
                bucket.up += 1
            elif rating == "down":
                bucket.down += 1

    choices = (
        select(Comparison.winner, func.count())
        .join(Message, col(Message.id) == Comparison.message_a_id)
        .where(col(Comparison.winner).is_not(None))
        .where(Comparison.decided_at >= filters.since, Comparison.decided_at < filters.until)
        .group_by(Comparison.winner)
    )
    open_ones = (
        select(func.count())
        .select_from(Comparison)
        .join(Message, col(Message.id) == Comparison.message_a_id)
        .where(col(Comparison.winner).is_(None))
        .where(Comparison.created_at >= filters.since, Comparison.created_at < filters.until)
    )
    if filters.adapter:
        choices = choices.where(_adapter_clause(filters))
        open_ones = open_ones.where(_adapter_clause(filters))
    counted = dict(session.exec(choices).all())
    return FeedbackStats(
        days=days,
        up=sum(d.up for d in days),
        down=sum(d.down for d in days),
        outcomes={winner: int(counted.get(winner, 0)) for winner in WINNERS},
        undecided=int(session.exec(open_ones).one()),
        tags=sorted(tag_counts.items(), key=lambda item: (-item[1], item[0])),
    )


# --- conversations -------------------------------------------------------------


@dataclass
class RatedAnswer:
    message: Message
    feedback: list[Feedback]


@dataclass
class ConversationSummary:
    conversation: Conversation
    user: User | None
    message_count: int
    rated: list[RatedAnswer]
    comparisons: list[Comparison]


def _feedback_matches(filters: Filters, feedback: Feedback, message: Message) -> bool:
    if filters.tag and filters.tag not in (feedback.tags or []):
        return False
    return not filters.adapter or message.adapter_version == filters.adapter_value


def conversation_summaries(
    session: Session, filters: Filters, rated_only: bool, page: int
) -> tuple[list[ConversationSummary], bool]:
    """Conversations active in the date range, newest first, one page of
    :data:`PAGE_SIZE`, each with its rated answers. With ``rated_only``, a tag
    or an adapter filter, only conversations having matching feedback are
    listed. Returns the page and whether there is a next one."""
    query = (
        select(Conversation)
        .where(Conversation.updated_at >= filters.since, Conversation.updated_at < filters.until)
        .order_by(col(Conversation.updated_at).desc(), col(Conversation.id).desc())
    )
    if rated_only or filters.tag or filters.adapter:
        matching = {
            message.conversation_id
            for feedback, message in session.exec(
                select(Feedback, Message).join(Message, col(Message.id) == Feedback.message_id)
            ).all()
            if _feedback_matches(filters, feedback, message)
        }
        query = query.where(col(Conversation.id).in_(matching or {-1}))
    rows = session.exec(query.offset((page - 1) * PAGE_SIZE).limit(PAGE_SIZE + 1)).all()
    has_next = len(rows) > PAGE_SIZE
    conversations = list(rows[:PAGE_SIZE])
    ids = [c.id for c in conversations]
    if not ids:
        return [], False

    counts = dict(
        session.exec(
            select(Message.conversation_id, func.count()).where(col(Message.conversation_id).in_(ids))
            .group_by(Message.conversation_id)
        ).all()
    )
    rated: dict[int, dict[int, RatedAnswer]] = defaultdict(dict)
    for feedback, message in session.exec(
        select(Feedback, Message)
        .join(Message, col(Message.id) == Feedback.message_id)
        .where(col(Message.conversation_id).in_(ids))
        .order_by(col(Message.id), col(Feedback.id))
    ).all():
        rated[message.conversation_id].setdefault(message.id, RatedAnswer(message, [])).feedback.append(feedback)
    comparisons: dict[int, list[Comparison]] = defaultdict(list)
    for comparison in session.exec(
        select(Comparison).where(col(Comparison.conversation_id).in_(ids)).order_by(col(Comparison.id))
    ).all():
        comparisons[comparison.conversation_id].append(comparison)
    owners = session.exec(select(User).where(col(User.id).in_({c.user_id for c in conversations}))).all()
    users = {u.id: u for u in owners}
    return [
        ConversationSummary(
            conversation=c,
            user=users.get(c.user_id),
            message_count=int(counts.get(c.id, 0)),
            rated=list(rated[c.id].values()),
            comparisons=comparisons[c.id],
        )
        for c in conversations
    ], has_next


@dataclass
class ConversationDetail:
    conversation: Conversation
    user: User | None
    messages: list[Message]
    on_thread: set[int]
    feedback: dict[int, list[Feedback]]
    comparisons: list[Comparison]
    comparison_of: dict[int, list[tuple[Comparison, str]]]


def conversation_detail(session: Session, conversation: Conversation) -> ConversationDetail:
    """Every message of the conversation (all branches, in the order written),
    which of them are on the branch the user sees, and their feedback and A/B
    choices from every user."""
    messages = list(
        session.exec(select(Message).where(Message.conversation_id == conversation.id).order_by(col(Message.id))).all()
    )
    feedback: dict[int, list[Feedback]] = defaultdict(list)
    message_ids = [m.id for m in messages] or [-1]
    for row in session.exec(
        select(Feedback).where(col(Feedback.message_id).in_(message_ids)).order_by(col(Feedback.id))
    ).all():
        feedback[row.message_id].append(row)
    comparisons = list(
        session.exec(
            select(Comparison).where(Comparison.conversation_id == conversation.id).order_by(col(Comparison.id))
        ).all()
    )
    comparison_of: dict[int, list[tuple[Comparison, str]]] = defaultdict(list)
    for comparison in comparisons:
        comparison_of[comparison.message_a_id].append((comparison, "a"))
        comparison_of[comparison.message_b_id].append((comparison, "b"))
    return ConversationDetail(
        conversation=conversation,
        user=session.get(User, conversation.user_id),
        messages=messages,
        on_thread={m.id for m in thread(session, conversation)},
        feedback=dict(feedback),
        comparisons=comparisons,
        comparison_of=dict(comparison_of),
    )


# --- pairs -----------------------------------------------------------------------


@dataclass
class PairRow:
    pair: PreferencePair
    runs: list[tuple[int, str]]
    conversation_id: int | None

    @property
    def prompt_text(self) -> str:
        """The last user turn of the prompt (what the answers reply to)."""
        for message in reversed(self.pair.prompt or []):
            if isinstance(message, dict) and message.get("role") == "user":
                return str(message.get("content", ""))
        return ""


def pair_rows(
    session: Session, split: str, source: str, run_id: int | None, page: int
) -> tuple[list[PairRow], bool]:
    """One page of preference pairs, newest first, with the runs that used each
    (run id, role) and the conversation its answers came from (if any)."""
    query = select(PreferencePair).order_by(col(PreferencePair.id).desc())
    if split:
        query = query.where(PreferencePair.split == split)
    if source:
        query = query.where(PreferencePair.source == source)
    if run_id is not None:
        query = query.where(
            col(PreferencePair.id).in_(select(TrainingRunPair.pair_id).where(TrainingRunPair.run_id == run_id))
        )
    rows = session.exec(query.offset((page - 1) * PAGE_SIZE).limit(PAGE_SIZE + 1)).all()
    pairs = list(rows[:PAGE_SIZE])
    ids = [p.id for p in pairs] or [-1]
    runs: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for link in session.exec(
        select(TrainingRunPair).where(col(TrainingRunPair.pair_id).in_(ids)).order_by(col(TrainingRunPair.run_id))
    ).all():
        runs[link.pair_id].append((link.run_id, link.role))
    message_ids = {p.chosen_message_id or p.rejected_message_id for p in pairs} - {None}
    conversation_of = dict(
        session.exec(select(Message.id, Message.conversation_id).where(col(Message.id).in_(message_ids or {-1}))).all()
    )
    return [
        PairRow(p, runs[p.id], conversation_of.get(p.chosen_message_id or p.rejected_message_id or -1))
        for p in pairs
    ], len(rows) > PAGE_SIZE


def pair_sources(session: Session) -> list[str]:
    return list(session.exec(select(PreferencePair.source).distinct().order_by(PreferencePair.source)).all())


# --- training runs and adapters -----------------------------------------------


def run_steps(run: TrainingRun) -> list[dict[str, Any]]:
    steps = (run.metrics or {}).get("steps") if isinstance(run.metrics, dict) else None
    return [s for s in steps if isinstance(s, dict)] if isinstance(steps, list) else []


RUNNING = ("queued", "running")


@dataclass
class Evaluation:
    """An adapter's gate evaluation: candidate vs the version it was compared with."""

    compared_with: str | None
    accuracy: tuple[float | None, float | None]
    margin: tuple[float | None, float | None]
    sanity_nll: tuple[float | None, float | None]
    max_sanity_nll: float | None
    pairs: int | None
    promote: bool | None
    reasons: list[str]
    gains: list[dict] = field(default_factory=list)
    """Per kind of held-out item (pairs, single thumbs) the gate compared item
    by item: the mean gain, its interval, items moved each way (trainer.confidence)."""


def evaluation(row: AdapterVersion) -> Evaluation | None:
    """The numbers of ``row.metrics`` as written by the trainer's gate, or None
    when the version was never evaluated."""
    metrics = row.metrics if isinstance(row.metrics, dict) else None
    if not metrics:
        return None
    candidate = metrics.get("candidate") or {}
    active = metrics.get("active") or {}
    decision = metrics.get("decision") or {}
    numbers = decision.get("numbers") or {}

    def pair_of(key: str) -> tuple[float | None, float | None]:
        return candidate.get(key), active.get(key)

    return Evaluation(
        compared_with=metrics.get("compared_with"),
        accuracy=pair_of("preference_accuracy"),
        margin=pair_of("mean_margin"),
        sanity_nll=pair_of("sanity_nll"),
        max_sanity_nll=numbers.get("max_sanity_nll"),
        pairs=candidate.get("pairs"),
        promote=decision.get("promote"),
        reasons=[str(r) for r in decision.get("reasons") or []],
        gains=[
            {"what": what, **{name: numbers.get(f"{kind}_{name}") for name in GAIN_NUMBERS}}
            for kind, what in (("pairs", "held-out pairs"), ("examples", "held-out single thumbs"))
            if isinstance(numbers.get(f"{kind}_mean_gain"), (int, float))
        ],
    )


GAIN_NUMBERS = ("items", "mean_gain", "low", "high", "confidence", "better", "worse", "sign_test_p")


@dataclass
class AdapterRow:
    row: AdapterVersion
    evaluation: Evaluation | None
    pairs_used: int


def adapter_rows(session: Session) -> list[AdapterRow]:
    """Every adapter version, newest first, with its evaluation and how many
    pairs its run trained on."""
    versions = list(reversed(list_versions(session)))
    run_ids = [v.training_run_id for v in versions if v.training_run_id is not None] or [-1]
    used = dict(
        session.exec(
            select(TrainingRunPair.run_id, func.count())
            .where(col(TrainingRunPair.run_id).in_(run_ids), TrainingRunPair.role != "eval")
            .group_by(TrainingRunPair.run_id)
        ).all()
    )
    return [AdapterRow(v, evaluation(v), int(used.get(v.training_run_id, 0))) for v in versions]


def rollback_target(session: Session) -> tuple[AdapterVersion | None, AdapterVersion | None]:
    """(active version, what a rollback would make active: None = base model),
    as ``store.registry.rollback`` would choose it. For the confirmation text."""
    current = active_version(session)
    if current is None:
        return None, None
    return current, _rollback_target(session, current)


def ancestry(versions: Sequence[AdapterVersion], version: int) -> list[str]:
    """``["v3", "v2", "v1", "base"]``: the version and the chain it continued."""
    by_number = {v.version: v for v in versions}
    chain: list[str] = []
    current: int | None = version
    while current is not None and current in by_number and f"v{current}" not in chain:
        chain.append(f"v{current}")
        current = by_number[current].parent_version
    chain.append(f"v{current}" if current is not None else BASE)
    return chain
