"""The admin dashboard's sign-in and sign-out. An admin account signs in on
the chat's sign-in page (``/login?next=/admin``); the admin token, once, buys a
signed session cookie (``server.admin_auth``), for set-ups without an admin
account. Either way the session's CSRF token goes with every write. Token
attempts are throttled like passwords (``server.login_throttle``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from server import admin_auth, proxies
from server.deps import AdminPage, AdminRender, DbDep, LoginThrottleDep, SettingsDep
from server.identity import BrowserSession
from server.routes.admin.dashboard import pages_router, safe_next

pages = pages_router()


@pages.get("/login", response_class=HTMLResponse)
def login_page(
    request: Request, settings: SettingsDep, db: DbDep, render: AdminRender, next: str | None = None
) -> Response:
    token_session = admin_auth.session_id(settings, request.cookies.get(admin_auth.ADMIN_COOKIE))
    if token_session is not None or admin_auth.admin_account(db, getattr(request.state, "browser", None)):
        return RedirectResponse(safe_next(next), status_code=303)
    return render("login.html", {"next": safe_next(next), "error": None}, None)


@pages.post("/login", response_class=HTMLResponse)
def login(
    request: Request, settings: SettingsDep, render: AdminRender, throttle: LoginThrottleDep,
    token: Annotated[str, Form(max_length=1000)] = "",
    next: Annotated[str, Form(max_length=2000)] = "/admin",
) -> Response:
    address = proxies.client_address(request.scope, settings)
    throttle.check("admin-token", address)
    if not token.strip() or not admin_auth.token_matches(settings, token.strip()):
        throttle.failed("admin-token", address)
        error = (
            "Enter the admin token." if not token.strip()
            else "That is not the admin token. Use the value of TUNELOOP_ADMIN_TOKEN on the server and try again."
        )
        return render("login.html", {"next": safe_next(next), "error": error}, None, status=401)
    response = RedirectResponse(safe_next(next), status_code=303)
    response.headers.append("set-cookie", admin_auth.cookie_header(settings, admin_auth.sign_session(settings)))
    return response


@pages.post("/logout")
def logout(request: Request, admin: AdminPage, settings: SettingsDep) -> Response:
    """Sign out of the dashboard; an admin account is signed out of the chat too."""
    response = RedirectResponse("/admin/login", status_code=303)
    response.headers.append("set-cookie", admin_auth.clear_cookie_header(settings))
    if admin.account is not None:
        request.state.new_browser = BrowserSession.new()
    return response
