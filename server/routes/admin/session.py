"""The admin dashboard's sign-in and sign-out: the admin token, once, buys a
signed session cookie (``server.admin_auth``); the session's CSRF token then
goes with every write."""

from __future__ import annotations

from typing import Annotated

from fastapi import Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from server import admin_auth
from server.deps import AdminPage, AdminRender, SettingsDep
from server.routes.admin.dashboard import pages_router, safe_next

pages = pages_router()


@pages.get("/login", response_class=HTMLResponse)
def login_page(request: Request, settings: SettingsDep, render: AdminRender, next: str | None = None) -> Response:
    if admin_auth.session_id(settings, request.cookies.get(admin_auth.ADMIN_COOKIE)) is not None:
        return RedirectResponse(safe_next(next), status_code=303)
    return render("login.html", {"next": safe_next(next), "error": None}, None)


@pages.post("/login", response_class=HTMLResponse)
def login(
    settings: SettingsDep, render: AdminRender,
    token: Annotated[str, Form(max_length=1000)] = "",
    next: Annotated[str, Form(max_length=2000)] = "/admin",
) -> Response:
    if not token.strip() or not admin_auth.token_matches(settings, token.strip()):
        error = (
            "Enter the admin token." if not token.strip()
            else "That is not the admin token. Use the value of TUNELOOP_ADMIN_TOKEN on the server and try again."
        )
        return render("login.html", {"next": safe_next(next), "error": error}, None, status=401)
    response = RedirectResponse(safe_next(next), status_code=303)
    response.headers.append("set-cookie", admin_auth.cookie_header(settings, admin_auth.sign_session(settings)))
    return response


@pages.post("/logout")
def logout(admin: AdminPage, settings: SettingsDep) -> Response:
    response = RedirectResponse("/admin/login", status_code=303)
    response.headers.append("set-cookie", admin_auth.clear_cookie_header(settings))
    return response
