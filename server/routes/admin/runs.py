"""Training runs: start a retraining cycle now, list runs, follow one.

JSON: ``POST /api/admin/retrain`` (202, or 409 while a cycle runs),
``GET /api/admin/runs`` and ``GET /api/admin/runs/{id}``.
Dashboard: the runs table with "Retrain now", a run's page (ORPO charts,
evaluation, the gate's decision) and its live status widget.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from sqlmodel import Session, col, select

from server import admin_views
from server.deps import AdminDep, AdminPage, AdminRender, DbDep, SessionDep, SettingsDep
from server.errors import ApiError, error_body
from server.plots import training_charts
from server.rendering import is_htmx
from server.retraining import start_cycle
from server.routes.admin.dashboard import api_router, pages_router
from server.routes.admin.shapes import run_json
from store.errors import UnknownAdapterVersion
from store.registry import get_version
from store.run_lease import CycleBusy
from store.tables import TrainingRun

api = api_router()
pages = pages_router()

RUNS_SHOWN = 100


# --- JSON API ------------------------------------------------------------------


@api.post("/retrain", status_code=202)
def retrain(_: AdminDep, settings: SettingsDep, db: DbDep):
    try:
        started = start_cycle(settings, db, "api")
    except CycleBusy as busy:
        body = error_body(409, f"{busy}; wait for it (GET /api/admin/runs/{busy.run_id})")
        body["run_id"] = busy.run_id
        return JSONResponse(body, status_code=409)
    return {"run_id": started.run_id, "status": "queued", "url": f"/api/admin/runs/{started.run_id}"}


@api.get("/runs")
def list_runs(_: AdminDep, session: SessionDep, limit: int = 50) -> list[dict[str, Any]]:
    rows = session.exec(select(TrainingRun).order_by(col(TrainingRun.id).desc()).limit(min(limit, 500))).all()
    return [run_json(r) for r in rows]


@api.get("/runs/{run_id}")
def get_run(run_id: int, _: AdminDep, session: SessionDep) -> dict[str, Any]:
    run = session.get(TrainingRun, run_id)
    if run is None:
        raise ApiError(404, f"training run {run_id} not found")
    return run_json(run)


# --- dashboard -------------------------------------------------------------------


def _runs_context(session: Session, notice: dict | None = None) -> dict:
    runs = session.exec(select(TrainingRun).order_by(col(TrainingRun.id).desc()).limit(RUNS_SHOWN)).all()
    return {
        "nav": "runs", "runs": runs, "notice": notice, "running": admin_views.RUNNING,
        "steps_of": {r.id: len(admin_views.run_steps(r)) for r in runs},
    }


@pages.get("/runs", response_class=HTMLResponse)
def runs_page(admin: AdminPage, session: SessionDep, render: AdminRender) -> HTMLResponse:
    return render("runs.html", _runs_context(session), admin)


@pages.post("/runs/retrain")
def retrain_now(
    request: Request, admin: AdminPage, session: SessionDep, settings: SettingsDep, db: DbDep, render: AdminRender
) -> Response:
    """Start a cycle exactly as ``POST /api/admin/retrain`` does; 409 when one runs."""
    try:
        started = start_cycle(settings, db, "manual")
    except CycleBusy as busy:
        notice = {
            "kind": "error", "run_id": busy.run_id,
            "text": f"A retraining run is already in progress (run {busy.run_id}); wait for it to finish.",
        }
        if is_htmx(request):
            return render("_notice.html", {"notice": notice}, admin, status=409)
        return render("runs.html", _runs_context(session, notice), admin, status=409)
    url = f"/admin/runs/{started.run_id}"
    if is_htmx(request):
        return Response(status_code=204, headers={"HX-Redirect": url})
    return RedirectResponse(url, status_code=303)


def _run_or_404(session: Session, run_id: int) -> TrainingRun:
    run = session.get(TrainingRun, run_id)
    if run is None:
        raise ApiError(404, f"training run {run_id} not found; the runs page lists them")
    return run


@pages.get("/runs/{run_id}", response_class=HTMLResponse)
def run_page(run_id: int, admin: AdminPage, session: SessionDep, render: AdminRender) -> HTMLResponse:
    run = _run_or_404(session, run_id)
    steps = admin_views.run_steps(run)
    adapter = None
    if run.adapter_version is not None:
        try:
            adapter = get_version(session, run.adapter_version)
        except UnknownAdapterVersion:
            adapter = None
    metrics = run.metrics if isinstance(run.metrics, dict) else {}
    context = {
        "nav": "runs", "run": run, "steps": steps, "last_step": steps[-1] if steps else None,
        "charts": training_charts(steps), "adapter": adapter,
        "evaluation": admin_views.evaluation(adapter) if adapter else None,
        "pairs_info": metrics.get("pairs") if isinstance(metrics.get("pairs"), dict) else None,
        "decision": metrics.get("decision") if isinstance(metrics.get("decision"), dict) else None,
        "train": metrics.get("train") if isinstance(metrics.get("train"), dict) else None,
        "skip_reason": metrics.get("reason"), "running": admin_views.RUNNING,
    }
    return render("run.html", context, admin)


@pages.get("/runs/{run_id}/status", response_class=HTMLResponse)
def run_status(
    run_id: int, request: Request, admin: AdminPage, session: SessionDep, render: AdminRender,
    was: str | None = None,
) -> HTMLResponse:
    """The live status widget. It carries its own ``hx-trigger="every 2s"`` only
    while the run is queued or running, so polling stops by itself; when a
    polled run has just finished, the page reloads once to show the final charts."""
    run = _run_or_404(session, run_id)
    steps = admin_views.run_steps(run)
    response = render(
        "_run_status.html",
        {"run": run, "last_step": steps[-1] if steps else None, "running": admin_views.RUNNING}, admin,
    )
    if is_htmx(request) and was in admin_views.RUNNING and run.status not in admin_views.RUNNING:
        response.headers["HX-Refresh"] = "true"
    return response
