"""The canary and the post-promotion watch (``store.canary``): where they
stand, and ending a canary by hand.

JSON: ``GET /api/admin/canary`` (``{"canary": ..., "watch": ...}``, each null
when none runs), ``POST /api/admin/canary/promote`` and ``.../reject`` (body
``{"note": "..."}``, optional). Dashboard: the canary panel of the adapters
page, whose buttons ask first (htmx ``hx-confirm``; without JavaScript a
confirmation page whose form does the POST).
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from server.deps import AdminDep, AdminPage, AdminRender, SessionDep, SettingsDep
from server.rendering import is_htmx
from server.routes.admin.adapters import adapters_answer
from server.routes.admin.dashboard import api_router, pages_router
from server.routes.admin.shapes import trials_json
from store.canary import canary_status, end_canary
from store.errors import Conflict

api = api_router()
pages = pages_router()

ENDINGS = {"promote": True, "reject": False}


class CanaryEndIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    note: str = Field("", max_length=500, description="why, kept with the decision")


def _ending(action: str) -> bool:
    if action not in ENDINGS:
        raise Conflict(f"a canary is ended with promote or reject, not {action!r}")
    return ENDINGS[action]


@api.get("/canary")
def canary(_: AdminDep, session: SessionDep, settings: SettingsDep) -> dict[str, Any]:
    return trials_json(session, settings)


@api.post("/canary/{action}")
def end(action: str, _: AdminDep, session: SessionDep, settings: SettingsDep,
        body: CanaryEndIn | None = None) -> dict[str, Any]:
    """End the running canary now: ``promote`` (it becomes active) or ``reject``.
    409 when none runs."""
    outcome = end_canary(session, settings, _ending(action), body.note if body else "")
    session.commit()
    return {"outcome": outcome, **trials_json(session, settings)}


@pages.get("/canary/{action}", response_class=HTMLResponse)
def confirm_end(action: str, admin: AdminPage, session: SessionDep, settings: SettingsDep,
                render: AdminRender) -> HTMLResponse:
    promote = _ending(action)
    status = canary_status(session, settings)
    if status is None:
        return render("confirm.html", {"nav": "adapters", "title": "No canary", "text": "No canary is running.",
                                       "action": None, "cancel": "/admin/adapters"}, admin, status=409)
    text = (f"{status.version} becomes active now, replacing {status.compared_with}." if promote
            else f"{status.version} is rejected now; {status.compared_with} keeps serving.")
    return render("confirm.html", {
        "nav": "adapters", "title": f"{action.capitalize()} {status.version}?",
        "text": f"{text} Votes so far: {status.verdict.votes}.", "action": f"/admin/canary/{action}",
        "button": f"{action.capitalize()} {status.version}", "cancel": "/admin/adapters",
    }, admin)


@pages.post("/canary/{action}")
def end_page(action: str, request: Request, admin: AdminPage, session: SessionDep, settings: SettingsDep,
             render: AdminRender) -> Response:
    outcome = end_canary(session, settings, _ending(action), "from the dashboard")
    session.commit()
    text = f"Canary {outcome}; servers follow at once."
    if is_htmx(request):
        return adapters_answer(request, render, admin, session, settings, {"kind": "ok", "text": text}, 200, "")
    return RedirectResponse("/admin/adapters", status_code=303)
