"""What every admin module builds its routers with, and the dashboard's
sign-in redirect.

The JSON API lives under ``/api/admin`` (bearer ``TUNELOOP_ADMIN_TOKEN``, or
the dashboard's session cookie with its CSRF token on writes:
``server.deps.AdminDep``). The dashboard's pages live under ``/admin``; their
routes use :class:`AdminRoute`, which turns a missing or expired session
(``server.deps.LoginRequired``) into a redirect to ``/admin/login?next=...``
(htmx requests get ``HX-Redirect``, so a poll that outlives its session lands
on the login page instead of swapping a login form into a table cell).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import quote, urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.routing import APIRoute

from server import redirects
from server.csrf import SAFE_METHODS
from server.deps import LoginRequired
from server.rendering import is_htmx

LOGIN_PATH = "/admin/login"


def safe_next(target: str | None) -> str:
    """Where to go after signing in to the dashboard: a dashboard path only."""
    return redirects.safe_next(target, within="/admin", fallback="/admin", refuse=(LOGIN_PATH,))


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


def api_router() -> APIRouter:
    """A router for a resource's JSON admin API."""
    return APIRouter(prefix="/api/admin", tags=["admin"])


def pages_router() -> APIRouter:
    """A router for a resource's dashboard pages."""
    return APIRouter(prefix="/admin", tags=["admin pages"], include_in_schema=False, route_class=AdminRoute)
