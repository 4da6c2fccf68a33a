"""Importing preference datasets into the store (``import_dataset``), e.g. to
seed a fresh install before users arrive.

An imported pair is a ``PreferencePair`` like one built from feedback: the
same content hash deduplicates it (against the store and within the file),
the same hash puts it in train or eval for good, and ``source="import"``
with an ``ImportBatch`` row (linked through ``ImportBatchPair``) records which
file it came from. It has no user, so the per-user cap never holds it back.

The whole file is validated before anything is written; one bad record and
nothing is imported. Importing the same file again adds nothing.

Example::

    >>> with session_scope(engine) as session:
    ...     report = import_dataset(session, Path("pairs.jsonl"), eval_share=0.1)
    >>> report.added, report.duplicates
    (40, 2)
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlmodel import Session, select

from store.exchange.files import DatasetFileError, read_records
from store.exchange.formats import FORMATS, RecordError, detect_format, from_record
from store.exchange.pair_format import Pair
from store.pairs import content_hash, split_for
from store.tables import ImportBatch, ImportBatchPair, PreferencePair

MAX_ERRORS_SHOWN = 5

Progress = Callable[..., Iterable[Any]]


def _no_progress(iterable: Iterable[Any], **_: Any) -> Iterable[Any]:
    return iterable


class DatasetImportError(ValueError):
    """The file cannot be imported; ``errors`` lists each problem as
    ``line 7: "chosen" must be a non-empty list of messages``. Nothing was written."""

    def __init__(self, source: str, errors: list[str]) -> None:
        shown = "; ".join(errors[:MAX_ERRORS_SHOWN])
        more = f" (and {len(errors) - MAX_ERRORS_SHOWN} more)" if len(errors) > MAX_ERRORS_SHOWN else ""
        super().__init__(f"{source}: {shown}{more}; nothing was imported")
        self.errors = errors


@dataclass
class ImportReport:
    filename: str
    format: str
    rows: int = 0
    added: int = 0
    duplicates: int = 0
    added_by_split: dict[str, int] = field(default_factory=lambda: {"train": 0, "eval": 0})
    batch_id: int | None = None
    dry_run: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "filename": self.filename, "format": self.format, "rows": self.rows, "added": self.added,
            "duplicates": self.duplicates, "added_by_split": dict(self.added_by_split),
            "batch_id": self.batch_id, "dry_run": self.dry_run,
        }


def read_pairs(path: Path, fmt: str = "auto", progress: Progress = _no_progress) -> tuple[str, list[Pair]]:
    """Read and validate every record of ``path``; returns the format and the pairs.

    ``fmt`` is trl, axolotl, llamafactory or auto (from the first record's
    columns). Raises ``DatasetImportError`` listing every bad record (line
    and field), ``FileNotFoundError`` for a missing file.
    """
    path = Path(path)
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown import format {fmt!r}; use auto or one of {', '.join(FORMATS)}")
    try:
        records = read_records(path)
    except DatasetFileError as exc:
        raise DatasetImportError(path.name, exc.problems) from exc
    if not records:
        raise DatasetImportError(path.name, ["the file holds no records"])
    if fmt == "auto":
        first = records[0]
        if not isinstance(first.value, dict):
            raise DatasetImportError(path.name, [f"{first.where}: a record must be a JSON object"])
        try:
            fmt = detect_format(set(first.value))
        except ValueError as exc:
            raise DatasetImportError(path.name, [str(exc)]) from exc
    pairs, errors = [], []
    for record in progress(records, total=len(records), desc=f"check {fmt}"):
        try:
            pairs.append(from_record(fmt, record.value))
        except RecordError as exc:
            errors.append(f"{record.where}: {exc}")
        except ValueError as exc:  # Pair's own checks
            errors.append(f"{record.where}: {exc}")
    if errors:
        raise DatasetImportError(path.name, errors)
    return fmt, pairs


def import_dataset(
    session: Session,
    path: Path,
    eval_share: float,
    fmt: str = "auto",
    filename: str | None = None,
    dry_run: bool = False,
    progress: Progress = _no_progress,
) -> ImportReport:
    """Validate ``path``, then add its new pairs to the store in ``session``.

    ``filename`` is the name to record (default: the file's name; the admin
    API passes the uploaded name). With ``dry_run`` nothing is written; the
    report says what would be added. The caller commits: everything the file
    adds lands in one transaction, or nothing does.

    Raises ``DatasetImportError`` (see ``read_pairs``).
    """
    path = Path(path)
    fmt, pairs = read_pairs(path, fmt, progress)
    report = ImportReport(filename=filename or path.name, format=fmt, rows=len(pairs), dry_run=dry_run)
    known = set(session.exec(select(PreferencePair.content_hash)).all())
    new: list[PreferencePair] = []
    for pair in pairs:
        prompt = [{"role": m["role"], "content": m["content"]} for m in pair.prompt]
        digest = content_hash(prompt, pair.chosen, pair.rejected)
        if digest in known:
            report.duplicates += 1
            continue
        known.add(digest)
        split = split_for(digest, eval_share)
        report.added_by_split[split] += 1
        new.append(
            PreferencePair(
                prompt=prompt, chosen=pair.chosen, rejected=pair.rejected, source="import",
                split=split, content_hash=digest,
            )
        )
    report.added = len(new)
    if dry_run or not new:
        return report
    batch = ImportBatch(
        filename=report.filename[:500], format=fmt, file_sha256=_sha256(path), rows=report.rows,
        added=report.added, duplicates=report.duplicates,
    )
    session.add(batch)
    session.add_all(new)
    session.flush()
    session.add_all([ImportBatchPair(pair_id=pair.id, batch_id=batch.id) for pair in new])  # type: ignore[arg-type]
    session.flush()
    report.batch_id = batch.id
    return report


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
