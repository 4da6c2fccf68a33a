"""Adapter versions: which one serves, activate any version (or ``base``, the
base model), roll back, and the lineage of a version.

JSON: ``GET /api/admin/adapters``, ``GET /api/admin/adapters/{version}`` (with the
servers that could not load it), ``POST /api/admin/adapters/{version}/activate``,
``POST /api/admin/adapters/rollback``, ``GET /api/admin/adapters/{version}/lineage``.
Dashboard: the adapter table (evaluation, gate, actions) and the lineage page.

Versions are written as the CLI writes them (``v3``, ``3`` or ``base``) and read
by ``store.registry.parse_version`` alone. Every dashboard write is a form POST
carrying the session's CSRF token. Activate and roll back change what users are
served, so they ask first: htmx shows ``hx-confirm``; without JavaScript the
button leads to a confirmation page whose form does the POST.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlmodel import Session

from server import admin_views
from server.deps import AdminDep, AdminPage, AdminRender, AdminSession, SessionDep, SettingsDep
from server.errors import store_error_status
from server.rendering import is_htmx
from server.routes.admin.dashboard import api_router, pages_router
from server.routes.admin.shapes import adapter_detail_json, adapter_json, lineage_json, trials_json
from store.errors import InvalidInput, StoreError, UnknownAdapterVersion
from store.registry import activate, active_version, get_version, list_versions, parse_version, rollback, version_name
from store.settings import Settings

api = api_router()
pages = pages_router()


def _adapter_number(text: str) -> int:
    """A version that must name an adapter (``base`` has no lineage)."""
    number = parse_version(text)
    if number is None:
        raise UnknownAdapterVersion("the base model is no adapter version; name one such as v3", "version")
    return number


# --- JSON API ------------------------------------------------------------------


@api.get("/adapters")
def adapters(_: AdminDep, session: SessionDep) -> list[dict[str, Any]]:
    return [adapter_json(r) for r in list_versions(session)]


@api.get("/adapters/{version}")
def adapter_detail(version: str, _: AdminDep, session: SessionDep) -> dict[str, Any]:
    """One version, with ``load_failures``: each server that could not load it
    since it was last activated (it is marked failed only when every live
    server has failed to load it)."""
    return adapter_detail_json(session, get_version(session, _adapter_number(version)))


@api.post("/adapters/{version}/activate")
def activate_version(version: str, _: AdminDep, session: SessionDep) -> dict[str, Any]:
    """``version``: v3, 3, or base (serve the base model)."""
    row = activate(session, parse_version(version))
    session.commit()
    return {"active": row.name if row else None, "note": "servers swap to it at once"}


@api.post("/adapters/rollback")
def rollback_adapter(_: AdminDep, session: SessionDep) -> dict[str, Any]:
    row = rollback(session)
    session.commit()
    return {"active": row.name if row else None}


@api.get("/adapters/{version}/lineage")
def lineage(version: str, _: AdminDep, session: SessionDep) -> dict[str, Any]:
    """The version, its parent, its run and evaluation, and the pairs it trained
    on with the feedback rows they came from."""
    return lineage_json(session, get_version(session, _adapter_number(version)))


# --- dashboard -------------------------------------------------------------------


def _adapters_context(session: Session, settings: Settings, notice: dict | None = None) -> dict:
    current, previous = admin_views.rollback_target(session)
    return {
        "nav": "adapters", "rows": admin_views.adapter_rows(session), "notice": notice,
        "active": current, "rollback_to": previous, "trials": trials_json(session, settings),
    }


def adapters_answer(
    request: Request, render: Callable[..., HTMLResponse], admin: AdminSession, session: Session,
    settings: Settings, notice: dict, status: int, done_query: str,
) -> Response:
    """The adapters panel after a dashboard action: the panel for htmx, else
    the page (an error) or a redirect to it (done)."""
    if is_htmx(request):
        return render("_adapters.html", _adapters_context(session, settings, notice), admin, status=status)
    if status >= 400:
        return render("adapters.html", _adapters_context(session, settings, notice), admin, status=status)
    return RedirectResponse(f"/admin/adapters?{done_query}", status_code=303)


def _named_version(text: str | None) -> str | None:
    """The version a query parameter names, written canonically; None when it names none."""
    if not text:
        return None
    try:
        return version_name(parse_version(text))
    except InvalidInput:
        return None


@pages.get("/adapters", response_class=HTMLResponse)
def adapters_page(
    admin: AdminPage, session: SessionDep, render: AdminRender, settings: SettingsDep,
    activated: str | None = None, rolled_back_to: str | None = None,
) -> HTMLResponse:
    notice = None
    activated, rolled_back_to = _named_version(activated), _named_version(rolled_back_to)
    if activated:
        notice = {"kind": "ok", "text": f"{activated} is now active; servers swap to it at once."}
    elif rolled_back_to:
        target = "the base model" if rolled_back_to == "base" else rolled_back_to
        notice = {"kind": "ok", "text": f"Rolled back: {target} now serves; servers swap at once."}
    return render("adapters.html", _adapters_context(session, settings, notice), admin)


@pages.get("/adapters/rollback", response_class=HTMLResponse)
def confirm_rollback(admin: AdminPage, session: SessionDep, render: AdminRender) -> HTMLResponse:
    current, previous = admin_views.rollback_target(session)
    if current is None:
        text = "No adapter is active (the base model serves); there is nothing to roll back."
        return render("confirm.html", {"nav": "adapters", "title": "Roll back", "text": text,
                                       "action": None, "cancel": "/admin/adapters"}, admin, status=409)
    target = previous.name if previous else "the base model"
    return render("confirm.html", {
        "nav": "adapters", "title": f"Roll back {current.name}?",
        "text": f"{current.name} is marked rolled back and {target} serves again.",
        "action": "/admin/adapters/rollback", "button": f"Roll back to {target}", "cancel": "/admin/adapters",
    }, admin)


@pages.post("/adapters/rollback")
def rollback_page(
    request: Request, admin: AdminPage, session: SessionDep, render: AdminRender, settings: SettingsDep
) -> Response:
    try:
        row = rollback(session)
    except StoreError as exc:  # shown in the page's notice, with the status the API would answer
        return adapters_answer(request, render, admin, session, settings, {"kind": "error", "text": exc.message},
                                store_error_status(exc), "")
    session.commit()
    target = row.name if row else "base"
    text = f"Rolled back: {row.name if row else 'the base model'} now serves; servers swap at once."
    return adapters_answer(request, render, admin, session, settings, {"kind": "ok", "text": text}, 200,
                            f"rolled_back_to={target}")


@pages.get("/adapters/{version}/activate", response_class=HTMLResponse)
def confirm_activate(version: str, admin: AdminPage, session: SessionDep, render: AdminRender) -> HTMLResponse:
    number = parse_version(version)
    row = get_version(session, number) if number is not None else None
    name = version_name(number)
    current = active_version(session)
    replacing = current is not None and (row is None or current.id != row.id)
    serving = f"{row.name} ({row.status})" if row else "The base model (no adapter)"
    return render("confirm.html", {
        "nav": "adapters", "title": f"Activate {name}?",
        "text": f"{serving} will answer every new request" + (f", replacing {current.name}." if replacing else "."),
        "action": f"/admin/adapters/{name}/activate", "button": f"Activate {name}",
        "cancel": "/admin/adapters",
    }, admin)


@pages.post("/adapters/{version}/activate")
def activate_page(
    version: str, request: Request, admin: AdminPage, session: SessionDep, render: AdminRender,
    settings: SettingsDep,
) -> Response:
    try:
        row = activate(session, parse_version(version))
    except StoreError as exc:  # shown in the page's notice, with the status the API would answer
        return adapters_answer(request, render, admin, session, settings, {"kind": "error", "text": exc.message},
                                store_error_status(exc), "")
    session.commit()
    name = row.name if row else "base"
    text = f"{name} is now active; servers swap to it at once."
    return adapters_answer(request, render, admin, session, settings, {"kind": "ok", "text": text}, 200,
                           f"activated={name}")


@pages.get("/adapters/{version}/lineage", response_class=HTMLResponse)
def lineage_page(version: str, admin: AdminPage, session: SessionDep, render: AdminRender) -> HTMLResponse:
    """The JSON lineage, as a page: the chain of parents, the run, the evaluation
    and every pair the run trained on or was evaluated with."""
    number = _adapter_number(version)
    row = get_version(session, number)
    return render("lineage.html", {
        "nav": "adapters", "data": lineage_json(session, row), "row": row, "evaluation": admin_views.evaluation(row),
        "chain": admin_views.ancestry(list_versions(session), number),
    }, admin)
