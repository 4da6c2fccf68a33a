"""Sign-in plumbing of the admin dashboard's pages: the session dependency,
the redirect to the login page, and page rendering with the session's CSRF
token.

Every page route uses :class:`AdminRoute`, which turns a missing or expired
session into a redirect to ``/admin/login?next=...`` (htmx requests get
``HX-Redirect``, so a poll that outlives its session lands on the login page
instead of swapping a login form into a table cell).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import quote, urlsplit

from fastapi import Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.routing import APIRoute

from server import admin_auth
from server.deps import SettingsDep, _csrf_from_request
from server.errors import ApiError

LOGIN_PATH = "/admin/login"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


class LoginRequired(Exception):
    """No valid admin session cookie on a dashboard request."""


@dataclass(frozen=True)
class AdminSession:
    sid: str
    csrf: str


async def admin_session(request: Request, settings: SettingsDep) -> AdminSession:
    """The signed-in admin session; writes must carry its CSRF token (hidden
    ``csrf_token`` field or ``X-CSRF-Token`` header), else 403."""
    sid = admin_auth.session_id(settings, request.cookies.get(admin_auth.ADMIN_COOKIE))
    if sid is None:
        raise LoginRequired
    if request.method not in SAFE_METHODS and not admin_auth.csrf_valid(
        settings, sid, await _csrf_from_request(request)
    ):
        raise ApiError(403, "missing or wrong CSRF token; reload the admin page and try again")
    return AdminSession(sid, admin_auth.csrf_token(settings, sid))


AdminPage = Annotated[AdminSession, Depends(admin_session)]


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a dashboard path only (no open redirect)."""
    if target and target.startswith("/admin") and not target.startswith(("//", "/admin/login")) and "\\" not in target:
        return target
    return "/admin"


def login_redirect(request: Request) -> Response:
    """To the login page, coming back afterwards to this page (for a write: to
    the page it was sent from, if htmx said which)."""
    url = request.url if request.method in SAFE_METHODS else urlsplit(request.headers.get("HX-Current-URL", ""))
    target = url.path + (f"?{url.query}" if url.query else "")
    location = f"{LOGIN_PATH}?next={quote(safe_next(target), safe='')}"
    if is_htmx(request):
        return Response(status_code=204, headers={"HX-Redirect": location})
    return RedirectResponse(location, status_code=303)


class AdminRoute(APIRoute):
    """An APIRoute whose handler answers :class:`LoginRequired` with a redirect."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except LoginRequired:
                return login_redirect(request)

        return route


def is_htmx(request: Request) -> bool:
    return request.headers.get("HX-Request") == "true"


def wants_fragment(request: Request, target_id: str) -> bool:
    """Whether to answer with just the fragment ``#target_id`` (an htmx swap into
    it) rather than the full page (no JS, boosted links, history restore)."""
    headers = request.headers
    return (
        is_htmx(request)
        and headers.get("HX-Target") == target_id
        and headers.get("HX-Boosted") != "true"
        and headers.get("HX-History-Restore-Request") != "true"
    )


def render(
    request: Request, name: str, context: dict[str, Any], admin: AdminSession | None, status: int = 200
) -> HTMLResponse:
    """Render ``admin/<name>`` with the session's CSRF token and the nav state."""
    response = request.app.state.templates.TemplateResponse(
        request,
        f"admin/{name}",
        {"csrf": admin.csrf if admin else "", "signed_in": admin is not None, **context},
        status_code=status,
    )
    response.headers["Vary"] = "HX-Request, HX-Target"
    response.headers["Cache-Control"] = "no-store"
    return response
