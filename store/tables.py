"""The preference store's tables (SQLModel).

A conversation's messages form a tree: each message points at its parent, and
regenerating an answer adds a sibling. ``Conversation.current_leaf_id`` names the
branch being shown. Every assistant message records the adapter version that
produced it (``None`` = base model) and its sampling settings, so any pair built
from it can be traced back.

Changing a table here needs a migration under ``alembic/versions``; a test
fails when the migrated schema and these models disagree.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, Column, DateTime, Index, Text, UniqueConstraint, text
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(value: datetime) -> datetime:
    """``value`` as an aware UTC time (SQLite hands timestamps back naive, in UTC)."""
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def _timestamp(nullable: bool = False, index: bool = False) -> Any:
    column = Column(DateTime(timezone=True), nullable=nullable, index=index)
    if nullable:
        return Field(default=None, sa_column=column)
    return Field(default_factory=utcnow, sa_column=column)


class User(SQLModel, table=True):
    """An identity: a signed-in account, an anonymous browser (signed cookie,
    created on its first action) or an API client (bearer key).

    Accounts have a unique ``username``, an argon2 ``password_hash``, a role and
    a status; ``session_epoch`` is written into every session cookie, so raising
    it signs all of the account's sessions out."""

    __tablename__ = "users"

    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(max_length=16, description="account | browser (anonymous) | api")
    name: str = Field(default="", max_length=200)
    username: str | None = Field(default=None, max_length=64, unique=True)
    password_hash: str | None = Field(default=None, max_length=255)
    role: str = Field(default="user", max_length=16, description="user | admin")
    status: str = Field(default="active", max_length=16, description="active | pending | disabled")
    session_epoch: int = Field(default=0)
    excluded_from_training: bool = Field(default=False)
    created_at: datetime = _timestamp()


class ApiKey(SQLModel, table=True):
    """A bearer key. Only its SHA-256 is kept; the key itself is shown once."""

    __tablename__ = "api_keys"

    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(foreign_key="users.id", index=True)
    name: str = Field(max_length=200)
    prefix: str = Field(max_length=16, description="first characters, to recognise a key")
    key_hash: str = Field(max_length=64, unique=True)
    created_at: datetime = _timestamp()
    revoked_at: datetime | None = _timestamp(nullable=True)


class Conversation(SQLModel, table=True):
    __tablename__ = "conversations"

    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(foreign_key="users.id", index=True)
    title: str = Field(default="New chat", max_length=200)
    source: str = Field(default="web", max_length=16, description="web | api")
    excluded_from_training: bool = Field(default=False, description="set by an admin")
    current_leaf_id: int | None = Field(
        default=None, description="last message of the branch being shown"
    )
    created_at: datetime = _timestamp()
    updated_at: datetime = _timestamp(index=True)


class Message(SQLModel, table=True):
    __tablename__ = "messages"

    id: int | None = Field(default=None, primary_key=True)
    conversation_id: int = Field(foreign_key="conversations.id", index=True)
    parent_id: int | None = Field(default=None, foreign_key="messages.id", index=True)
    role: str = Field(max_length=16, description="system | user | assistant")
    content: str = Field(default="", sa_column=Column(Text, nullable=False))
    excluded_from_training: bool = Field(default=False, description="set by an admin")
    caller_written: bool = Field(
        default=False, description="an assistant turn an API caller sent as history: not the model's answer"
    )
    status: str = Field(
        default="complete",
        max_length=16,
        description="pending | streaming | complete | stopped | error",
    )
    adapter_version: str | None = Field(
        default=None, max_length=32, description="adapter that produced it; None = base model"
    )
    claimed_by: str | None = Field(
        default=None, max_length=200, description="host:pid of the server generating it"
    )
    sampling: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    finish_reason: str | None = Field(default=None, max_length=32)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    created_at: datetime = _timestamp()
    completed_at: datetime | None = _timestamp(nullable=True)


class Feedback(SQLModel, table=True):
    """A thumb on an assistant message: one per user per message, changeable."""

    __tablename__ = "feedback"
    __table_args__ = (UniqueConstraint("message_id", "user_id", name="uq_feedback_message_user"),)

    id: int | None = Field(default=None, primary_key=True)
    message_id: int = Field(foreign_key="messages.id", index=True)
    user_id: int = Field(foreign_key="users.id", index=True)
    rating: str = Field(max_length=8, description="up | down")
    comment: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    tags: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    created_at: datetime = _timestamp()
    updated_at: datetime = _timestamp(index=True)


class Comparison(SQLModel, table=True):
    """Two answers to the same context, and which one the user preferred.

    ``message_a_id`` is the answer shown as A (left); which sample lands there
    is random, so position bias doesn't leak into the data.
    """

    __tablename__ = "comparisons"

    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(foreign_key="users.id", index=True)
    conversation_id: int = Field(foreign_key="conversations.id", index=True)
    message_a_id: int = Field(foreign_key="messages.id")
    message_b_id: int = Field(foreign_key="messages.id")
    winner: str | None = Field(default=None, max_length=16, description="a | b | tie | both_bad")
    created_at: datetime = _timestamp()
    decided_at: datetime | None = _timestamp(nullable=True)


class AdapterVersion(SQLModel, table=True):
    """One immutable LoRA adapter directory ``adapters/vN`` and its fate.

    The row is reserved (``training``) before its run trains, so N is never
    handed out twice. At most one row is ``active``: a partial unique index
    makes the database refuse a second one, whatever races above it."""

    __tablename__ = "adapter_versions"
    __table_args__ = (
        Index(
            "uq_adapter_versions_one_active", "status", unique=True,
            sqlite_where=text("status = 'active'"), postgresql_where=text("status = 'active'"),
        ),
    )

    id: int | None = Field(default=None, primary_key=True)
    version: int = Field(unique=True, description="N of vN; never reused")
    path: str = Field(max_length=1000)
    status: str = Field(
        default="candidate",
        max_length=16,
        description="training | candidate | canary | active | retired | rolled_back | rejected | failed",
    )
    parent_version: int | None = Field(default=None, description="adapter it continued")
    training_run_id: int | None = Field(default=None, foreign_key="training_runs.id")
    metrics: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    created_at: datetime = _timestamp()
    activated_at: datetime | None = _timestamp(nullable=True)

    @property
    def name(self) -> str:
        return f"v{self.version}"


class AdapterLoadFailure(SQLModel, table=True):
    """A server process (a replica, named by its presence claim id) whose engine
    could not load an adapter version. The version itself is marked ``failed``
    only once every live replica has one of these (``store.load_failures``);
    activating the version again clears them, for a fresh try."""

    __tablename__ = "adapter_load_failures"
    __table_args__ = (
        UniqueConstraint("adapter_version_id", "replica", name="uq_adapter_load_failures_version_replica"),
    )

    id: int | None = Field(default=None, primary_key=True)
    adapter_version_id: int = Field(foreign_key="adapter_versions.id", index=True)
    replica: str = Field(max_length=200, description="claim id of the server process (host:pid:random)")
    error: str = Field(sa_column=Column(Text, nullable=False))
    failed_at: datetime = _timestamp()


class TrainingRun(SQLModel, table=True):
    """One retraining cycle: pairs -> ORPO -> gate -> (maybe) promotion."""

    __tablename__ = "training_runs"

    id: int | None = Field(default=None, primary_key=True)
    status: str = Field(
        default="queued",
        max_length=16,
        description="queued | running | canary | promoted | rejected | skipped | failed",
    )
    trigger: str = Field(default="manual", max_length=16, description="schedule | manual | api")
    pid: int | None = None
    worker: str | None = Field(
        default=None, max_length=200, description="the `tuneloop trainer` worker that claimed it (host:pid)"
    )
    claim_by: datetime | None = _timestamp(nullable=True)  # queued for workers: one must claim it by then
    adapter_version: int | None = Field(default=None, description="candidate it produced")
    parent_version: int | None = Field(default=None, description="adapter it continued")
    progress: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    metrics: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    created_at: datetime = _timestamp()
    started_at: datetime | None = _timestamp(nullable=True)
    heartbeat_at: datetime | None = _timestamp(nullable=True)
    finished_at: datetime | None = _timestamp(nullable=True)


class PreferencePair(SQLModel, table=True):
    """One chosen/rejected pair for training, built from feedback or imported.

    ``content_hash`` (prompt + chosen + rejected) deduplicates; the same hash
    decides the split, so a pair never moves between train and eval.
    """

    __tablename__ = "preference_pairs"

    id: int | None = Field(default=None, primary_key=True)
    prompt: list[dict[str, Any]] = Field(sa_column=Column(JSON, nullable=False))
    chosen: str = Field(sa_column=Column(Text, nullable=False))
    rejected: str = Field(sa_column=Column(Text, nullable=False))
    source: str = Field(max_length=16, description="comparison | thumbs | correction | import")
    split: str = Field(max_length=8, index=True, description="train | eval")
    content_hash: str = Field(max_length=64, unique=True)
    excluded_from_training: bool = Field(default=False, description="set by an admin")
    user_id: int | None = Field(default=None, foreign_key="users.id", index=True)
    chosen_message_id: int | None = Field(default=None, foreign_key="messages.id")
    rejected_message_id: int | None = Field(default=None, foreign_key="messages.id")
    # indexed: a changed thumb or choice withdraws its pairs by these (store.pairs)
    comparison_id: int | None = Field(default=None, foreign_key="comparisons.id", index=True)
    chosen_feedback_id: int | None = Field(default=None, foreign_key="feedback.id", index=True)
    rejected_feedback_id: int | None = Field(default=None, foreign_key="feedback.id", index=True)
    created_at: datetime = _timestamp(index=True)


class ImportBatch(SQLModel, table=True):
    """One dataset file imported with ``tuneloop import`` (or the admin API):
    where its pairs came from. Only imports that added pairs are recorded."""

    __tablename__ = "import_batches"

    id: int | None = Field(default=None, primary_key=True)
    filename: str = Field(max_length=500, description="name of the imported file")
    format: str = Field(max_length=16, description="trl | axolotl | llamafactory")
    file_sha256: str = Field(max_length=64, index=True, description="hash of the file's bytes")
    rows: int = Field(description="records in the file")
    added: int = Field(description="pairs it added")
    duplicates: int = Field(description="records already in the store (or repeated in the file)")
    created_at: datetime = _timestamp()


class ImportBatchPair(SQLModel, table=True):
    """Which import added a pair (``PreferencePair.source == "import"``)."""

    __tablename__ = "import_batch_pairs"

    pair_id: int = Field(foreign_key="preference_pairs.id", primary_key=True)
    batch_id: int = Field(foreign_key="import_batches.id", index=True)


class TrainingRunPair(SQLModel, table=True):
    """Which pairs a run trained on (``new`` or ``replay``) or evaluated (``eval``):
    the lineage from an adapter version back to the feedback rows."""

    __tablename__ = "training_run_pairs"

    run_id: int = Field(foreign_key="training_runs.id", primary_key=True)
    pair_id: int = Field(foreign_key="preference_pairs.id", primary_key=True, index=True)
    role: str = Field(max_length=8, description="new | replay | eval")


class TrainingRunExample(SQLModel, table=True):
    """Which single thumbs (``store.examples``) a run trained on (``new``),
    evaluated (``eval``) or could not use (``skipped``), with the label the
    thumb had then: a thumb flipped later is a new example."""

    __tablename__ = "training_run_examples"

    run_id: int = Field(foreign_key="training_runs.id", primary_key=True)
    feedback_id: int = Field(foreign_key="feedback.id", primary_key=True, index=True)
    label: bool = Field(description="True: desirable (thumbs up)")
    role: str = Field(max_length=8, description="new | eval | skipped")


class Lease(SQLModel, table=True):
    """A named lock shared by every process that uses the database (one
    retraining cycle at a time, one scheduler per deployment)."""

    __tablename__ = "leases"

    name: str = Field(primary_key=True, max_length=64)
    holder: str | None = Field(default=None, max_length=200)
    expires_at: datetime | None = _timestamp(nullable=True)


class Correction(SQLModel, table=True):
    """The answer a user wanted instead of one of the model's answers: one per
    user per answer, replaced when they correct it again (``store.corrections``).
    It makes the pair ``content`` (chosen) over the answer (rejected), with
    source ``correction``; the text lives here, not as a message, so the
    conversation keeps holding only what was said in it."""

    __tablename__ = "corrections"
    __table_args__ = (UniqueConstraint("message_id", "user_id", name="uq_corrections_message_user"),)

    id: int | None = Field(default=None, primary_key=True)
    message_id: int = Field(foreign_key="messages.id", index=True, description="the model's answer corrected")
    user_id: int = Field(foreign_key="users.id", index=True)
    content: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = _timestamp()
    updated_at: datetime = _timestamp(index=True)
