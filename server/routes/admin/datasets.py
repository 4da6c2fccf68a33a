"""Admin dataset download and upload (bearer ``TUNELOOP_ADMIN_TOKEN``):

- ``GET /api/admin/export?format=trl&file_format=jsonl&split=all&since=2026-11-01``
  (format: trl | axolotl | llamafactory | feedback; file_format: jsonl |
  parquet; split: train | eval | all; since optional) streams the file as
  an attachment; LLaMA-Factory comes as a zip holding the data file and its
  ``dataset_info.json``.
- ``POST /api/admin/import`` (multipart: ``file``, optional ``format`` =
  auto|trl|axolotl|llamafactory and ``dry_run``) validates and imports a pair
  file, answering with the import report. Uploads are bounded by
  ``TUNELOOP_MAX_REQUEST_BYTES``; use ``tuneloop import FILE`` for big files.
"""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import File, Form, UploadFile
from fastapi.responses import FileResponse, JSONResponse
from sqlalchemy.exc import IntegrityError
from starlette.background import BackgroundTask

from server.deps import AdminDep, SessionDep, SettingsDep
from server.errors import ApiError, error_body
from server.routes.admin.dashboard import api_router
from store.exchange.export import DATASET_INFO, default_filename, export_dataset, parse_since
from store.exchange.importing import DatasetImportError, import_dataset

api = api_router()

MEDIA_TYPES = {"jsonl": "application/x-ndjson", "parquet": "application/vnd.apache.parquet", "zip": "application/zip"}


@api.get("/export")
def export(
    _: AdminDep,
    session: SessionDep,
    settings: SettingsDep,
    format: Literal["trl", "axolotl", "llamafactory", "trl-unpaired", "feedback"] = "trl",
    file_format: Literal["jsonl", "parquet"] = "jsonl",
    split: Literal["train", "eval", "all"] = "all",
    since: str | None = None,
) -> FileResponse:
    try:
        since_at = parse_since(since)
    except ValueError as exc:
        raise ApiError(400, str(exc), "since") from exc
    workdir = Path(tempfile.mkdtemp(prefix="tuneloop-export-"))
    cleanup = BackgroundTask(shutil.rmtree, workdir, ignore_errors=True)
    try:
        name = default_filename(format, file_format, split)
        report = export_dataset(
            session, format, workdir / name, file_format, split, since_at, eval_share=settings.eval_share
        )
        session.commit()  # the pairs the export built
        path, media_type = report.path, MEDIA_TYPES[file_format]
        if format == "llamafactory":
            path, media_type = workdir / f"{Path(name).stem}.zip", MEDIA_TYPES["zip"]
            with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as bundle:
                bundle.write(report.path, report.path.name)
                bundle.write(workdir / DATASET_INFO, DATASET_INFO)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    headers = {"X-Tuneloop-Rows": str(report.rows), "X-Tuneloop-Skipped": str(report.skipped)}
    return FileResponse(path, media_type=media_type, filename=path.name, headers=headers, background=cleanup)


@api.post("/import")
def import_file(
    _: AdminDep,
    session: SessionDep,
    settings: SettingsDep,
    file: Annotated[UploadFile, File(description="a trl, axolotl or llamafactory export (JSONL, JSON or Parquet)")],
    format: Annotated[Literal["auto", "trl", "axolotl", "llamafactory"], Form()] = "auto",
    dry_run: Annotated[bool, Form()] = False,
) -> Any:
    filename = Path(file.filename or "").name
    if filename in ("", ".", ".."):
        filename = "upload"
    with tempfile.TemporaryDirectory(prefix="tuneloop-import-") as workdir:
        path = Path(workdir) / filename
        with open(path, "wb") as handle:
            shutil.copyfileobj(file.file, handle)
        try:
            report = import_dataset(session, path, settings.eval_share, format, filename=filename, dry_run=dry_run)
            session.commit()
        except DatasetImportError as exc:
            session.rollback()
            body = error_body(400, str(exc), "file")
            body["error"]["errors"] = exc.errors[:100]
            return JSONResponse(body, status_code=400)
        except IntegrityError as exc:
            session.rollback()
            raise ApiError(
                409, "some of these pairs were added meanwhile by another process; nothing was imported, send it again"
            ) from exc
    return report.to_json()
