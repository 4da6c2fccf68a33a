"""Exporting the preference store as datasets (``export_dataset``).

Pairs go out in the shapes TRL, Axolotl and LLaMA-Factory read (see
``store.exchange.formats``), as JSONL or Parquet, with metadata columns:
``pair_id``, ``source`` (comparison | thumbs | correction | import), ``split`` (train |
eval), ``chosen_adapter_version``/``rejected_adapter_version`` (the adapter
that produced each answer, e.g. ``"v3"``; null for the base model and for
imported pairs) and ``created_at`` (ISO 8601, UTC). Pairs an admin excluded
from training (by user or message) are left out.

``trl-unpaired`` exports the single thumbs the trainer learns from with KTO
(``store.examples``: rated answers that made no pair) in TRL's unpaired
preference format -- ``prompt``/``completion`` messages and a boolean
``label`` -- with ``feedback_id``, ``split``, ``adapter_version`` and
``created_at``.

``feedback`` exports the raw feedback instead, one record per thumb and per
decided A/B choice (``FEEDBACK_FIELDS``), with the context shown to the model.

A LLaMA-Factory export also writes (or updates) ``dataset_info.json`` in the
same folder, with an entry named after the file.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlmodel import Session, col, select

from store.conversations import chat_context
from store.errors import NotFound
from store.examples import single_thumbs
from store.exchange.files import FILE_FORMATS, write_records
from store.exchange.formats import FORMATS, llamafactory_dataset_info, to_record
from store.exchange.pair_format import Pair
from store.pairs import build_pairs
from store.selection import eligible_pairs
from store.tables import Comparison, Correction, Feedback, Message, PreferencePair, User

UNPAIRED = "trl-unpaired"
EXPORT_FORMATS = (*FORMATS, UNPAIRED, "feedback")
SPLITS = ("train", "eval", "all")
DATASET_INFO = "dataset_info.json"
FEEDBACK_FIELDS = (
    "kind", "id", "user_id", "conversation_id", "prompt",
    "message_id", "answer", "adapter_version", "rating", "comment", "tags",
    "message_a_id", "answer_a", "adapter_version_a", "message_b_id", "answer_b", "adapter_version_b", "winner",
    "correction", "excluded_from_training", "created_at", "updated_at",
)
"""One row per thumb (``kind`` thumb), decided A/B choice (comparison) and
correction (correction: ``answer`` is the model's, ``correction`` the user's text)."""

Progress = Callable[..., Iterable[Any]]


def _no_progress(iterable: Iterable[Any], **_: Any) -> Iterable[Any]:
    return iterable


@dataclass
class ExportReport:
    path: Path
    format: str
    file_format: str
    split: str
    rows: int = 0
    skipped: int = 0  # pairs the format cannot hold
    skipped_reasons: list[str] = field(default_factory=list)
    extra_files: list[Path] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path), "format": self.format, "file_format": self.file_format,
            "split": self.split, "rows": self.rows, "skipped": self.skipped,
            "skipped_reasons": self.skipped_reasons[:10], "extra_files": [str(p) for p in self.extra_files],
        }


def default_filename(fmt: str, file_format: str, split: str, now: datetime | None = None) -> str:
    """``tuneloop-trl-all-20261124T101500Z.jsonl``"""
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    what = fmt if fmt == "feedback" else f"{fmt}-{split}"
    return f"tuneloop-{what}-{stamp}.{file_format}"


def parse_since(text: str | None) -> datetime | None:
    """An ISO date or date-time (naive = UTC). Raises ``ValueError`` saying what is expected."""
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise ValueError(
            f"since: {text!r} is not an ISO date or date-time such as 2026-11-01 or 2026-11-01T08:00"
        ) from exc
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class NothingToExport(NotFound):
    """No record matches: a JSONL file without rows is no dataset ``datasets``
    can load, so none is written."""


def export_dataset(
    session: Session,
    fmt: str,
    output: Path,
    file_format: str = "jsonl",
    split: str = "all",
    since: datetime | None = None,
    progress: Progress = _no_progress,
    eval_share: float = 0.1,
) -> ExportReport:
    """Write the pairs (or, with ``fmt="feedback"``, the raw feedback) to ``output``.

    Pairs the feedback supports but that are not built yet are built first
    (``eval_share``: TUNELOOP_EVAL_SHARE), so an export never lags behind the
    feedback; the caller commits. ``split`` is train, eval or all (ignored for
    feedback); ``since`` keeps records created at or after it. ``progress`` wraps
    the row iteration (``tqdm``'s signature: ``progress(iterable, total=..., desc=...)``).

    An empty Parquet export is written (its schema makes it a valid empty
    dataset); an empty JSONL export raises ``NothingToExport`` and writes
    nothing. Raises ``ValueError`` for an unknown format, file format or split.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}")
    if file_format not in FILE_FORMATS:
        raise ValueError(f"unknown file format {file_format!r}; use one of {', '.join(FILE_FORMATS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    output = Path(output)
    report = ExportReport(path=output, format=fmt, file_format=file_format, split=split)
    if fmt == "feedback":
        rows: Iterable[dict[str, Any]] = list(_feedback_rows(session, since, progress))
    elif fmt == UNPAIRED:
        build_pairs(session, eval_share)  # a thumb that makes a pair is no single thumb
        rows = _unpaired_rows(session, split, since, eval_share, progress)
    else:
        build_pairs(session, eval_share)
        rows = _pair_rows(session, fmt, split, since, progress, report)
    if not rows and file_format == "jsonl":
        what = {"feedback": "feedback", UNPAIRED: f"single thumbs in split {split}"}.get(
            fmt, f"pairs in split {split}")
        found = (
            f"the {fmt} format cannot hold any of the {report.skipped} pairs, e.g. {report.skipped_reasons[0]}"
            if report.skipped else f"there are no {what}{f' since {since.isoformat()}' if since else ''} yet"
        )
        raise NothingToExport(
            f"nothing to export: {found} (an empty JSONL file is no loadable dataset; "
            "ask for parquet to get an empty one with its columns)"
        )
    report.rows = write_records(rows, output, file_format, _parquet_schema(fmt) if file_format == "parquet" else None)
    if fmt == "llamafactory":
        report.extra_files.append(write_dataset_info(output))
    return report


def write_dataset_info(data_file: Path) -> Path:
    """Add (or replace) the entry for ``data_file`` in the ``dataset_info.json``
    beside it, keeping the other datasets listed there."""
    info_path = data_file.parent / DATASET_INFO
    info: dict[str, Any] = {}
    if info_path.is_file():
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"{info_path} exists but is not valid JSON ({exc}); fix or move it, then export again"
            ) from exc
    info[dataset_name(data_file)] = llamafactory_dataset_info(data_file.name)
    info_path.write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return info_path


def dataset_name(data_file: Path) -> str:
    """The name LLaMA-Factory knows the export by (``dataset: NAME`` in its config)."""
    return "".join(c if c.isalnum() else "_" for c in Path(data_file).name.split(".")[0])


# --- pairs ------------------------------------------------------------------


def _pair_rows(
    session: Session, fmt: str, split: str, since: datetime | None, progress: Progress, report: ExportReport
) -> Iterable[dict[str, Any]]:
    query = select(PreferencePair).where(eligible_pairs()).order_by(col(PreferencePair.id))
    if split != "all":
        query = query.where(PreferencePair.split == split)
    if since is not None:
        query = query.where(col(PreferencePair.created_at) >= since)
    pairs = session.exec(query).all()
    versions = _adapter_versions(
        session, {i for p in pairs for i in (p.chosen_message_id, p.rejected_message_id) if i is not None}
    )
    rows = []
    for row in progress(pairs, total=len(pairs), desc=f"export {fmt}"):
        try:
            record = to_record(fmt, Pair(prompt=row.prompt, chosen=row.chosen, rejected=row.rejected, pair_id=row.id))
        except ValueError as exc:  # Unrepresentable, or a pair stored before today's checks
            report.skipped += 1
            report.skipped_reasons.append(f"pair {row.id}: {exc}")
            continue
        record.update(
            pair_id=row.id, source=row.source, split=row.split,
            chosen_adapter_version=versions.get(row.chosen_message_id),
            rejected_adapter_version=versions.get(row.rejected_message_id),
            created_at=_iso(row.created_at),
        )
        rows.append(record)
    return rows


def _unpaired_rows(
    session: Session, split: str, since: datetime | None, eval_share: float, progress: Progress
) -> list[dict[str, Any]]:
    examples = [e for e in single_thumbs(session, eval_share, include_anonymous=True)
                if split == "all" or e.split == split]
    feedback = {f.id: f for f in session.exec(
        select(Feedback).where(col(Feedback.id).in_([e.feedback_id for e in examples]))
    ).all()} if examples else {}
    versions = _adapter_versions(session, {e.message_id for e in examples})
    rows = []
    for example in progress(examples, total=len(examples), desc=f"export {UNPAIRED}"):
        rated_at = feedback[example.feedback_id].updated_at
        if since is not None and rated_at is not None and _aware(rated_at) < since:
            continue
        rows.append({**example.to_trl(), "feedback_id": example.feedback_id, "split": example.split,
                     "adapter_version": versions.get(example.message_id), "created_at": _iso(rated_at)})
    return rows


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


def _adapter_versions(session: Session, message_ids: set[int]) -> dict[int | None, str | None]:
    found: dict[int | None, str | None] = {}
    ids = sorted(message_ids)
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        for message_id, version in session.exec(
            select(Message.id, Message.adapter_version).where(col(Message.id).in_(chunk))
        ).all():
            found[message_id] = version
    return found


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite hands back naive UTC
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).isoformat(timespec="seconds")


# --- raw feedback -------------------------------------------------------------


class _Contexts:
    """The chat context before a message, with each conversation loaded once."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.by_conversation: dict[int, dict[int, Message]] = {}

    def messages(self, conversation_id: int) -> dict[int, Message]:
        if conversation_id not in self.by_conversation:
            rows = self.session.exec(select(Message).where(Message.conversation_id == conversation_id)).all()
            self.by_conversation[conversation_id] = {m.id: m for m in rows if m.id is not None}
        return self.by_conversation[conversation_id]

    def before(self, message: Message) -> list[dict[str, str]]:
        by_id = self.messages(message.conversation_id)
        path = []
        node = by_id.get(message.parent_id) if message.parent_id is not None else None
        while node is not None:
            path.append(node)
            node = by_id.get(node.parent_id) if node.parent_id is not None else None
        return chat_context(list(reversed(path)))


def _feedback_rows(session: Session, since: datetime | None, progress: Progress) -> Iterable[dict[str, Any]]:
    excluded_users = set(session.exec(select(User.id).where(User.excluded_from_training == True)).all())  # noqa: E712
    contexts = _Contexts(session)
    thumbs_query = select(Feedback).order_by(col(Feedback.id))
    choices_query = select(Comparison).where(col(Comparison.winner).is_not(None)).order_by(col(Comparison.id))
    corrections_query = select(Correction).order_by(col(Correction.id))
    if since is not None:
        thumbs_query = thumbs_query.where(col(Feedback.created_at) >= since)
        choices_query = choices_query.where(col(Comparison.created_at) >= since)
        corrections_query = corrections_query.where(col(Correction.created_at) >= since)
    thumbs = session.exec(thumbs_query).all()
    choices = session.exec(choices_query).all()
    corrections = session.exec(corrections_query).all()
    rows = []
    items = [*thumbs, *choices, *corrections]
    for item in progress(items, total=len(items), desc="export feedback"):
        row: dict[str, Any] = dict.fromkeys(FEEDBACK_FIELDS)
        row["id"], row["user_id"] = item.id, item.user_id
        row["created_at"] = _iso(item.created_at)
        if isinstance(item, Correction):
            message = session.get(Message, item.message_id)
            row.update(
                kind="correction", conversation_id=message.conversation_id, prompt=contexts.before(message),
                message_id=message.id, answer=message.content, adapter_version=message.adapter_version,
                correction=item.content, tags=[],
                excluded_from_training=item.user_id in excluded_users or message.excluded_from_training,
                updated_at=_iso(item.updated_at),
            )
        elif isinstance(item, Feedback):
            message = session.get(Message, item.message_id)
            row.update(
                kind="thumb", conversation_id=message.conversation_id, prompt=contexts.before(message),
                message_id=message.id, answer=message.content, adapter_version=message.adapter_version,
                rating=item.rating, comment=item.comment, tags=list(item.tags or []),
                excluded_from_training=item.user_id in excluded_users or message.excluded_from_training,
                updated_at=_iso(item.updated_at),
            )
        else:
            a = session.get(Message, item.message_a_id)
            b = session.get(Message, item.message_b_id)
            row.update(
                kind="comparison", conversation_id=item.conversation_id, prompt=contexts.before(a),
                message_a_id=a.id, answer_a=a.content, adapter_version_a=a.adapter_version,
                message_b_id=b.id, answer_b=b.content, adapter_version_b=b.adapter_version,
                winner=item.winner, tags=[],
                excluded_from_training=(
                    item.user_id in excluded_users or a.excluded_from_training or b.excluded_from_training
                ),
                updated_at=_iso(item.decided_at),
            )
        rows.append(row)
    return rows


# --- Parquet schemas ------------------------------------------------------------


def _parquet_schema(fmt: str) -> Any:
    import pyarrow as pa

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    turn = pa.struct([("from", pa.string()), ("value", pa.string())])
    metadata = [
        ("pair_id", pa.int64()), ("source", pa.string()), ("split", pa.string()),
        ("chosen_adapter_version", pa.string()), ("rejected_adapter_version", pa.string()),
        ("created_at", pa.string()),
    ]
    if fmt == UNPAIRED:
        return pa.schema([
            ("prompt", pa.list_(message)), ("completion", pa.list_(message)), ("label", pa.bool_()),
            ("feedback_id", pa.int64()), ("split", pa.string()), ("adapter_version", pa.string()),
            ("created_at", pa.string()),
        ])
    if fmt == "trl":
        fields = [("prompt", pa.list_(message)), ("chosen", pa.list_(message)), ("rejected", pa.list_(message))]
    elif fmt == "axolotl":
        fields = [("messages", pa.list_(message)), ("chosen", message), ("rejected", message)]
    elif fmt == "llamafactory":
        fields = [("conversations", pa.list_(turn)), ("system", pa.string()), ("chosen", turn), ("rejected", turn)]
    else:
        ints = ("id", "user_id", "conversation_id", "message_id", "message_a_id", "message_b_id")
        types = {name: pa.int64() for name in ints}
        types.update(prompt=pa.list_(message), tags=pa.list_(pa.string()), excluded_from_training=pa.bool_())
        return pa.schema([(name, types.get(name, pa.string())) for name in FEEDBACK_FIELDS])
    return pa.schema(fields + metadata)
