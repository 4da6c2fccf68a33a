"""Admin API (bearer ``TUNELOOP_ADMIN_TOKEN``): retrain now, runs, adapters,
activation, rollback, lineage."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlmodel import col, select

from server.deps import AdminDep, SessionDep, SettingsDep
from server.errors import ApiError, error_body
from server.retraining import start_cycle
from store.errors import UnknownAdapterVersion
from store.registry import activate, get_version, lineage_pairs, list_versions, parse_version, rollback, version_name
from store.run_lease import CycleBusy
from store.tables import AdapterVersion, TrainingRun

router = APIRouter(prefix="/api/admin", tags=["admin"])


def run_json(run: TrainingRun) -> dict[str, Any]:
    return {
        "id": run.id, "status": run.status, "trigger": run.trigger, "progress": run.progress,
        "metrics": run.metrics, "error": run.error, "adapter_version": _name(run.adapter_version),
        "parent_version": _name(run.parent_version),
        "created_at": _iso(run.created_at), "started_at": _iso(run.started_at),
        "finished_at": _iso(run.finished_at), "heartbeat_at": _iso(run.heartbeat_at),
    }


def adapter_json(row: AdapterVersion) -> dict[str, Any]:
    return {
        "version": row.name, "status": row.status, "path": row.path,
        "parent_version": _name(row.parent_version), "training_run_id": row.training_run_id,
        "metrics": row.metrics, "error": row.error,
        "created_at": _iso(row.created_at), "activated_at": _iso(row.activated_at),
    }


def _name(version: int | None) -> str | None:
    return version_name(version) if version is not None else None


def _iso(value) -> str | None:
    return value.isoformat() if value else None


@router.post("/retrain", status_code=202)
def retrain(_: AdminDep, settings: SettingsDep, request: Request):
    try:
        started = start_cycle(settings, request.app.state.db, "api")
    except CycleBusy as busy:
        body = error_body(409, f"{busy}; wait for it (GET /api/admin/runs/{busy.run_id})")
        body["run_id"] = busy.run_id
        return JSONResponse(body, status_code=409)
    return {"run_id": started.run_id, "status": "queued", "url": f"/api/admin/runs/{started.run_id}"}


@router.get("/runs")
def list_runs(_: AdminDep, session: SessionDep, limit: int = 50) -> list[dict[str, Any]]:
    rows = session.exec(select(TrainingRun).order_by(col(TrainingRun.id).desc()).limit(min(limit, 500))).all()
    return [run_json(r) for r in rows]


@router.get("/runs/{run_id}")
def get_run(run_id: int, _: AdminDep, session: SessionDep) -> dict[str, Any]:
    run = session.get(TrainingRun, run_id)
    if run is None:
        raise ApiError(404, f"training run {run_id} not found")
    return run_json(run)


@router.get("/adapters")
def adapters(_: AdminDep, session: SessionDep) -> list[dict[str, Any]]:
    return [adapter_json(r) for r in list_versions(session)]


@router.post("/adapters/{version}/activate")
def activate_version(version: str, _: AdminDep, session: SessionDep) -> dict[str, Any]:
    """``version``: v3, 3, or base (serve the base model)."""
    row = activate(session, parse_version(version))
    session.commit()
    return {"active": row.name if row else None, "note": "servers swap to it within a few seconds"}


@router.post("/adapters/rollback")
def rollback_adapter(_: AdminDep, session: SessionDep) -> dict[str, Any]:
    row = rollback(session)
    session.commit()
    return {"active": row.name if row else None}


def _adapter_number(text: str) -> int:
    """A version that must name an adapter (``base`` has no lineage)."""
    number = parse_version(text)
    if number is None:
        raise UnknownAdapterVersion("the base model is no adapter version; name one such as v3", "version")
    return number


@router.get("/adapters/{version}/lineage")
def lineage(version: str, _: AdminDep, session: SessionDep) -> dict[str, Any]:
    """The version, its parent, its run and evaluation, and the pairs it trained
    on with the feedback rows they came from."""
    row = get_version(session, _adapter_number(version))
    run = session.get(TrainingRun, row.training_run_id) if row.training_run_id else None
    pairs = lineage_pairs(session, row)
    return {
        "adapter": adapter_json(row),
        "parent": _name(row.parent_version),
        "run": run_json(run) if run else None,
        "evaluation": row.metrics,
        "pairs": [
            {
                "id": pair.id, "role": link.role, "source": pair.source, "split": pair.split,
                "user_id": pair.user_id, "comparison_id": pair.comparison_id,
                "chosen_message_id": pair.chosen_message_id, "rejected_message_id": pair.rejected_message_id,
                "chosen_feedback_id": pair.chosen_feedback_id, "rejected_feedback_id": pair.rejected_feedback_id,
            }
            for link, pair in pairs
        ],
    }
