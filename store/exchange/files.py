"""Reading and writing dataset files: JSON Lines, JSON arrays and Parquet.

Records read come with where they are in the file (``line 7`` for JSONL,
``record 7`` for a JSON array, ``row 7`` for Parquet; 1-based), so every
error can point at the bad one. pyarrow is imported only when Parquet is used.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FILE_FORMATS = ("jsonl", "parquet")
PARQUET_MAGIC = b"PAR1"


@dataclass
class FileRecord:
    where: str  # "line 7", "record 7" or "row 7"
    value: Any


class DatasetFileError(ValueError):
    """The file cannot be read at all, or some records are not valid JSON."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def file_format_of(path: Path) -> str:
    """``jsonl``, ``json`` or ``parquet``, from the content's first bytes."""
    with open(path, "rb") as handle:
        head = handle.read(4)
        if head == PARQUET_MAGIC:
            return "parquet"
        handle.seek(0)
        for chunk in iter(lambda: handle.read(1), b""):
            if not chunk.isspace():
                return "json" if chunk == b"[" else "jsonl"
    return "jsonl"


def read_records(path: Path) -> list[FileRecord]:
    """Every record of a JSONL, JSON-array or Parquet file.

    Raises ``DatasetFileError`` listing each line that is not valid JSON (or
    why the file cannot be read), ``FileNotFoundError`` if it is missing.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist or is not a file")
    kind = file_format_of(path)
    if kind == "parquet":
        return _read_parquet(path)
    if kind == "json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DatasetFileError([f"{path.name} is not valid JSON ({exc})"]) from exc
        return [FileRecord(f"record {i}", value) for i, value in enumerate(data, start=1)]
    records, problems = [], []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                records.append(FileRecord(f"line {number}", json.loads(raw.decode("utf-8"))))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                problems.append(f"line {number}: not valid JSON ({exc})")
    if problems:
        raise DatasetFileError(problems)
    return records


def _read_parquet(path: Path) -> list[FileRecord]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for damaged files
        raise DatasetFileError([f"{path.name} is not a readable Parquet file ({exc})"]) from exc
    return [FileRecord(f"row {i}", row) for i, row in enumerate(rows, start=1)]


def write_records(rows: Iterable[dict[str, Any]], path: Path, file_format: str, schema: Any = None) -> int:
    """Write ``rows`` to ``path`` as JSONL or Parquet (with the pyarrow
    ``schema``, so even an empty file has its columns); returns the count.

    The file appears complete or not at all (written beside, then renamed).
    """
    if file_format not in FILE_FORMATS:
        raise ValueError(f"unknown file format {file_format!r}; use one of {', '.join(FILE_FORMATS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        if file_format == "jsonl":
            count = 0
            with open(staging, "w", encoding="utf-8") as handle:
                for row in rows:
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                    count += 1
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pylist(list(rows), schema=schema)
            pq.write_table(table, staging)
            count = table.num_rows
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    return count
