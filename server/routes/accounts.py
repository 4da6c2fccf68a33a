"""Sign-up, sign-in and sign-out of end users (``store.accounts`` holds the
rules). Signing in replaces the browser session (a fresh session id, so a
session id planted before sign-in is worthless) with one naming the account
and its ``session_epoch``; "sign out everywhere" raises the epoch.

The forms carry the browser session's CSRF token like every other write, so
another site cannot sign a visitor in or out. Failed sign-ins are throttled
per name and per address (``server.login_throttle``).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlmodel import Session

from server import csrf, proxies
from server.deps import (
    BrowserSessionDep,
    DbDep,
    LoginThrottleDep,
    PublicRender,
    SettingsDep,
)
from server.errors import ApiError
from server.identity import BrowserSession
from server.redirects import safe_next
from store import accounts
from store.errors import StoreError
from store.settings import Settings
from store.tables import User

router = APIRouter(include_in_schema=False)

Username = Annotated[str, Form(max_length=200)]
Password = Annotated[str, Form(max_length=accounts.MAX_PASSWORD_CHARS + 1)]
Next = Annotated[str, Form(max_length=2000)]
CsrfField = Annotated[str, Form(alias=csrf.CSRF_FIELD, max_length=200)]


def _check_csrf(settings: Settings, browser: BrowserSession, token: str) -> None:
    if not csrf.token_matches(csrf.browser_token(settings.secret_key, browser.sid), token):
        raise ApiError(403, "missing or wrong CSRF token; reload the page and try again")


def _signed_in(request: Request, user: User, to: str) -> Response:
    """Redirect to ``to`` with a fresh browser session naming ``user``."""
    request.state.new_browser = BrowserSession.new(user.id, user.session_epoch)
    return RedirectResponse(to, status_code=303)


def _current_account(db, browser: BrowserSession) -> User | None:
    with Session(db) as session:
        return accounts.signed_in_account(session, browser.uid, browser.epoch)


@router.get("/login", response_class=HTMLResponse)
def login_page(
    browser: BrowserSessionDep, db: DbDep, settings: SettingsDep, render: PublicRender, next: str | None = None
) -> Response:
    if _current_account(db, browser) is not None:
        return RedirectResponse(safe_next(next), status_code=303)
    return render("login.html", {"next": safe_next(next), "error": None, "username": ""})


@router.post("/login", response_class=HTMLResponse)
def login(
    request: Request, browser: BrowserSessionDep, db: DbDep, settings: SettingsDep, render: PublicRender,
    throttle: LoginThrottleDep, token: CsrfField = "", username: Username = "", password: Password = "",
    next: Next = "/",
) -> Response:
    _check_csrf(settings, browser, token)
    address = proxies.client_address(request.scope, settings)
    throttle.check(username, address)
    with Session(db) as session:
        try:
            user = accounts.authenticate(session, username, password)
        except StoreError as exc:
            throttle.failed(username, address)
            context = {"next": safe_next(next), "error": str(exc), "username": username}
            return render("login.html", context, status=401)
    return _signed_in(request, user, safe_next(next))


@router.get("/signup", response_class=HTMLResponse)
def signup_page(browser: BrowserSessionDep, db: DbDep, render: PublicRender) -> Response:
    if _current_account(db, browser) is not None:
        return RedirectResponse("/", status_code=303)
    return render("signup.html", {"error": None, "username": "", "pending": False})


@router.post("/signup", response_class=HTMLResponse)
def signup(
    request: Request, browser: BrowserSessionDep, db: DbDep, settings: SettingsDep, render: PublicRender,
    throttle: LoginThrottleDep, token: CsrfField = "", username: Username = "", password: Password = "",
) -> Response:
    _check_csrf(settings, browser, token)
    address = proxies.client_address(request.scope, settings)
    throttle.check(None, address)
    with Session(db, expire_on_commit=False) as session:
        try:
            user = accounts.sign_up(session, username, password, settings.signup)
            session.commit()
        except StoreError as exc:
            session.rollback()
            return render("signup.html", {"error": str(exc), "username": username, "pending": False}, status=400)
    throttle.failed(None, address)
    if user.status != "active":
        return render("signup.html", {"error": None, "username": user.username, "pending": True}, status=202)
    return _signed_in(request, user, "/admin" if user.role == "admin" else "/")


@router.post("/logout")
def logout(request: Request, browser: BrowserSessionDep, settings: SettingsDep, token: CsrfField = "") -> Response:
    _check_csrf(settings, browser, token)
    request.state.new_browser = BrowserSession.new()
    return RedirectResponse("/login", status_code=303)


@router.post("/logout/everywhere")
def logout_everywhere(
    request: Request, browser: BrowserSessionDep, db: DbDep, settings: SettingsDep, token: CsrfField = ""
) -> Response:
    """Sign this account out on every browser and API session cookie (keys stay)."""
    _check_csrf(settings, browser, token)
    with Session(db) as session:
        user = accounts.signed_in_account(session, browser.uid, browser.epoch)
        if user is None:
            raise ApiError(401, "you are not signed in")
        accounts.revoke_sessions(session, user)
        session.commit()
    request.state.new_browser = BrowserSession.new()
    return RedirectResponse("/login", status_code=303)
