"""The admin dashboard, part 2: training runs (live status, ORPO charts,
"Retrain now"), adapter versions (evaluation, activate, roll back, lineage) and
API keys. Sign-in and the session are in ``server.routes.admin_session``.

Every write is a form POST carrying the session's CSRF token. Actions that
change what users are served (activate, roll back, revoke) ask first: htmx
shows ``hx-confirm``; without JavaScript the button leads to a confirmation
page whose form does the POST.
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlmodel import col, select

from server import admin_views
from server.deps import SessionDep, SettingsDep
from server.errors import ApiError, store_error_status
from server.identity import create_api_key, revoke_api_key
from server.plots import training_charts
from server.retraining import start_cycle
from server.routes import admin as admin_api
from server.routes.admin_session import AdminPage, AdminRoute, is_htmx, render
from store.errors import StoreError, UnknownAdapterVersion
from store.registry import activate, active_version, get_version, list_versions, parse_version, rollback
from store.run_lease import CycleBusy
from store.tables import ApiKey, TrainingRun

router = APIRouter(prefix="/admin", tags=["admin pages"], include_in_schema=False, route_class=AdminRoute)

RUNS_SHOWN = 100
_VERSION_OR_BASE = re.compile(r"^(v\d{1,9}|base)$")


def _version_number(text: str) -> int:
    """``v3`` or ``3`` -> 3; anything else is a 400 saying how to write it."""
    return admin_api._adapter_number(text)


# --- training runs -------------------------------------------------------------


def _runs_context(session, notice: dict | None = None) -> dict:
    runs = session.exec(select(TrainingRun).order_by(col(TrainingRun.id).desc()).limit(RUNS_SHOWN)).all()
    return {
        "nav": "runs", "runs": runs, "notice": notice, "running": admin_views.RUNNING,
        "steps_of": {r.id: len(admin_views.run_steps(r)) for r in runs},
    }


@router.get("/runs", response_class=HTMLResponse)
def runs_page(request: Request, admin: AdminPage, session: SessionDep) -> HTMLResponse:
    return render(request, "runs.html", _runs_context(session), admin)


@router.post("/runs/retrain")
def retrain_now(request: Request, admin: AdminPage, session: SessionDep, settings: SettingsDep) -> Response:
    """Start a cycle exactly as ``POST /api/admin/retrain`` does; 409 when one runs."""
    try:
        started = start_cycle(settings, request.app.state.db, "manual")
    except CycleBusy as busy:
        notice = {
            "kind": "error", "run_id": busy.run_id,
            "text": f"A retraining run is already in progress (run {busy.run_id}); wait for it to finish.",
        }
        if is_htmx(request):
            return render(request, "_notice.html", {"notice": notice}, admin, status=409)
        return render(request, "runs.html", _runs_context(session, notice), admin, status=409)
    url = f"/admin/runs/{started.run_id}"
    if is_htmx(request):
        return Response(status_code=204, headers={"HX-Redirect": url})
    return RedirectResponse(url, status_code=303)


def _run_or_404(session, run_id: int) -> TrainingRun:
    run = session.get(TrainingRun, run_id)
    if run is None:
        raise ApiError(404, f"training run {run_id} not found; the runs page lists them")
    return run


@router.get("/runs/{run_id}", response_class=HTMLResponse)
def run_page(run_id: int, request: Request, admin: AdminPage, session: SessionDep) -> HTMLResponse:
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
    return render(request, "run.html", context, admin)


@router.get("/runs/{run_id}/status", response_class=HTMLResponse)
def run_status(
    run_id: int, request: Request, admin: AdminPage, session: SessionDep, was: str | None = None
) -> HTMLResponse:
    """The live status widget. It carries its own ``hx-trigger="every 2s"`` only
    while the run is queued or running, so polling stops by itself; when a
    polled run has just finished, the page reloads once to show the final charts."""
    run = _run_or_404(session, run_id)
    steps = admin_views.run_steps(run)
    response = render(
        request, "_run_status.html",
        {"run": run, "last_step": steps[-1] if steps else None, "running": admin_views.RUNNING}, admin,
    )
    if is_htmx(request) and was in admin_views.RUNNING and run.status not in admin_views.RUNNING:
        response.headers["HX-Refresh"] = "true"
    return response


# --- adapter versions ------------------------------------------------------------


def _adapters_context(session, notice: dict | None = None) -> dict:
    current, previous = admin_views.rollback_target(session)
    return {
        "nav": "adapters", "rows": admin_views.adapter_rows(session), "notice": notice,
        "active": current, "rollback_to": previous,
    }


def _adapters_answer(request: Request, admin, session, notice: dict, status: int, done_query: str) -> Response:
    if is_htmx(request):
        return render(request, "_adapters.html", _adapters_context(session, notice), admin, status=status)
    if status >= 400:
        return render(request, "adapters.html", _adapters_context(session, notice), admin, status=status)
    return RedirectResponse(f"/admin/adapters?{done_query}", status_code=303)


@router.get("/adapters", response_class=HTMLResponse)
def adapters_page(
    request: Request, admin: AdminPage, session: SessionDep,
    activated: str | None = None, rolled_back_to: str | None = None,
) -> HTMLResponse:
    notice = None
    if activated and _VERSION_OR_BASE.match(activated):
        notice = {"kind": "ok", "text": f"{activated} is now active; servers swap to it within a few seconds."}
    elif rolled_back_to and _VERSION_OR_BASE.match(rolled_back_to):
        target = "the base model" if rolled_back_to == "base" else rolled_back_to
        notice = {"kind": "ok", "text": f"Rolled back: {target} now serves; servers swap within a few seconds."}
    return render(request, "adapters.html", _adapters_context(session, notice), admin)


@router.get("/adapters/rollback", response_class=HTMLResponse)
def confirm_rollback(request: Request, admin: AdminPage, session: SessionDep) -> HTMLResponse:
    current, previous = admin_views.rollback_target(session)
    if current is None:
        text = "No adapter is active (the base model serves); there is nothing to roll back."
        return render(request, "confirm.html", {"nav": "adapters", "title": "Roll back", "text": text,
                                                "action": None, "cancel": "/admin/adapters"}, admin, status=409)
    target = previous.name if previous else "the base model"
    return render(request, "confirm.html", {
        "nav": "adapters", "title": f"Roll back {current.name}?",
        "text": f"{current.name} is marked rolled back and {target} serves again.",
        "action": "/admin/adapters/rollback", "button": f"Roll back to {target}", "cancel": "/admin/adapters",
    }, admin)


@router.post("/adapters/rollback")
def rollback_adapter(request: Request, admin: AdminPage, session: SessionDep) -> Response:
    try:
        row = rollback(session)
    except StoreError as exc:
        return _adapters_answer(request, admin, session, {"kind": "error", "text": exc.message},
                                store_error_status(exc), "")
    session.commit()
    target = row.name if row else "base"
    text = f"Rolled back: {row.name if row else 'the base model'} now serves; servers swap within a few seconds."
    return _adapters_answer(request, admin, session, {"kind": "ok", "text": text}, 200, f"rolled_back_to={target}")


@router.get("/adapters/{version}/activate", response_class=HTMLResponse)
def confirm_activate(version: str, request: Request, admin: AdminPage, session: SessionDep) -> HTMLResponse:
    row = get_version(session, _version_number(version))
    current = active_version(session)
    return render(request, "confirm.html", {
        "nav": "adapters", "title": f"Activate {row.name}?",
        "text": f"{row.name} ({row.status}) will answer every new request"
        + (f", replacing {current.name}." if current and current.id != row.id else "."),
        "action": f"/admin/adapters/{row.name}/activate", "button": f"Activate {row.name}",
        "cancel": "/admin/adapters",
    }, admin)


@router.post("/adapters/{version}/activate")
def activate_adapter(version: str, request: Request, admin: AdminPage, session: SessionDep) -> Response:
    try:
        row = activate(session, parse_version(version))
    except StoreError as exc:
        return _adapters_answer(request, admin, session, {"kind": "error", "text": exc.message},
                                store_error_status(exc), "")
    session.commit()
    name = row.name if row else "base"
    text = f"{name} is now active; servers swap to it within a few seconds."
    return _adapters_answer(request, admin, session, {"kind": "ok", "text": text}, 200, f"activated={name}")


@router.get("/adapters/{version}/lineage", response_class=HTMLResponse)
def lineage_page(version: str, request: Request, admin: AdminPage, session: SessionDep) -> HTMLResponse:
    """The JSON admin API's lineage, as a page: the chain of parents, the run,
    the evaluation and every pair the run trained on or was evaluated with."""
    data = admin_api.lineage(version, None, session)
    number = _version_number(version)
    row = get_version(session, number)
    return render(request, "lineage.html", {
        "nav": "adapters", "data": data, "row": row, "evaluation": admin_views.evaluation(row),
        "chain": admin_views.ancestry(list_versions(session), number),
    }, admin)


# --- API keys ----------------------------------------------------------------------


def _keys_context(session, notice: dict | None = None, new_key: str | None = None) -> dict:
    keys = session.exec(select(ApiKey).order_by(col(ApiKey.id).desc())).all()
    return {"nav": "keys", "keys": keys, "notice": notice, "new_key": new_key}


def _keys_answer(request: Request, admin, session, status: int = 200, **context) -> Response:
    name = "_keys.html" if is_htmx(request) else "keys.html"
    return render(request, name, _keys_context(session, **context), admin, status=status)


@router.get("/keys", response_class=HTMLResponse)
def keys_page(request: Request, admin: AdminPage, session: SessionDep, revoked: str | None = None) -> HTMLResponse:
    notice = {"kind": "ok", "text": f"Key {revoked} is revoked."} if revoked and revoked.isdigit() else None
    return render(request, "keys.html", _keys_context(session, notice), admin)


@router.post("/keys")
def create_key(
    request: Request, admin: AdminPage, session: SessionDep, name: Annotated[str, Form(max_length=200)] = ""
) -> Response:
    """Create a key and show it once (never stored, only its SHA-256)."""
    if not name.strip():
        notice = {"kind": "error", "text": "Give the key a name (who or what will use it), then create it."}
        return _keys_answer(request, admin, session, status=400, notice=notice)
    row, key = create_api_key(session, name)
    session.commit()
    notice = {"kind": "ok", "text": f"Key “{row.name}” created. Copy it now: it is shown only this once."}
    return _keys_answer(request, admin, session, status=201, notice=notice, new_key=key)


def _key_or_404(session, key_id: int) -> ApiKey:
    row = session.get(ApiKey, key_id)
    if row is None:
        raise ApiError(404, f"there is no API key {key_id}; the keys page lists them")
    return row


@router.get("/keys/{key_id}/revoke", response_class=HTMLResponse)
def confirm_revoke(key_id: int, request: Request, admin: AdminPage, session: SessionDep) -> HTMLResponse:
    row = _key_or_404(session, key_id)
    return render(request, "confirm.html", {
        "nav": "keys", "title": f"Revoke key “{row.name}”?",
        "text": f"Clients using {row.prefix}… get 401 from now on. This cannot be undone; create a new key instead.",
        "action": f"/admin/keys/{row.id}/revoke", "button": "Revoke key", "cancel": "/admin/keys",
    }, admin)


@router.post("/keys/{key_id}/revoke")
def revoke_key(key_id: int, request: Request, admin: AdminPage, session: SessionDep) -> Response:
    row = _key_or_404(session, key_id)
    if row.revoked_at is not None:
        notice = {"kind": "error", "text": f"Key “{row.name}” was already revoked."}
        return _keys_answer(request, admin, session, status=409, notice=notice)
    revoke_api_key(session, str(key_id))
    session.commit()
    request.app.state.api_key_cache.forget_user(row.user_id)
    if not is_htmx(request):
        return RedirectResponse(f"/admin/keys?revoked={key_id}", status_code=303)
    return _keys_answer(request, admin, session, notice={"kind": "ok", "text": f"Key “{row.name}” is revoked."})
