"""Request dependencies, as ``Annotated`` aliases so a handler's signature reads
as its needs: ``SessionDep``, ``SettingsDep``, ``CurrentUser``, ``BrowserUser``,
``CsrfChecked``, ``AdminDep``."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlmodel import Session

from server import admin_auth
from server.answers import AnswerService
from server.errors import ApiError
from server.identity import csrf_token_valid, user_for_api_key
from store.settings import Settings
from store.tables import User

CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    with Session(request.app.state.db, expire_on_commit=False) as session:
        yield session


def get_answers(request: Request) -> AnswerService:
    return request.app.state.answers


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
AnswersDep = Annotated[AnswerService, Depends(get_answers)]


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


async def _csrf_from_request(request: Request) -> str | None:
    token = request.headers.get(CSRF_HEADER)
    if token:
        return token
    content_type = request.headers.get("content-type", "")
    if content_type.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
        form = await request.form()
        value = form.get(CSRF_FIELD)
        return value if isinstance(value, str) else None
    return None


async def _require_csrf_on_writes(request: Request, settings: Settings, user: User) -> None:
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return
    if not csrf_token_valid(settings.secret_key, user.id, await _csrf_from_request(request)):
        raise ApiError(403, "missing or wrong CSRF token; reload the page and try again")


def _user_by_key(db, key: str) -> User | None:
    """Key lookup off the event loop, in a session of its own (streams must not
    hold a pooled connection for their whole duration)."""
    with Session(db, expire_on_commit=False) as session:
        user = user_for_api_key(session, key)
        if user is not None:
            session.expunge(user)
        return user


async def current_user(request: Request, session: SessionDep, settings: SettingsDep) -> User:
    """API identity: a bearer API key, or the browser cookie (then a CSRF token is
    required on writes, because a browser sends cookies cross-site)."""
    key = _bearer(request)
    if key is not None:
        db = request.app.state.db
        user = await request.app.state.api_key_cache.user_for(key, lambda k: _user_by_key(db, k))
        if user is None:
            raise ApiError(401, "the API key is unknown or revoked; create one with `tuneloop keys create NAME`")
        return user
    uid = request.state.browser_user_id if hasattr(request.state, "browser_user_id") else None
    user = session.get(User, uid) if uid is not None else None
    if user is None:
        raise ApiError(401, "send `Authorization: Bearer <api key>` (create one with `tuneloop keys create NAME`)")
    await _require_csrf_on_writes(request, settings, user)
    return user


async def browser_user(request: Request, session: SessionDep, settings: SettingsDep) -> User:
    """Page identity: the cookie user (the middleware mints one on first visit).
    Writes need the page's CSRF token (hidden form field or X-CSRF-Token header)."""
    uid = getattr(request.state, "browser_user_id", None)
    user = session.get(User, uid) if uid is not None else None
    if user is None:
        raise ApiError(401, "your browser identity was not recognised; enable cookies and reload")
    await _require_csrf_on_writes(request, settings, user)
    return user


async def admin(request: Request, settings: SettingsDep) -> None:
    """The admin token as a bearer, or the admin dashboard's session cookie
    (then writes need the session's CSRF token, as for browser users)."""
    token = _bearer(request)
    sid = admin_auth.session_id(settings, request.cookies.get(admin_auth.ADMIN_COOKIE)) if token is None else None
    if sid is not None:
        if request.method not in ("GET", "HEAD", "OPTIONS") and not admin_auth.csrf_valid(
            settings, sid, await _csrf_from_request(request)
        ):
            raise ApiError(403, "missing or wrong CSRF token; reload the admin page and try again")
        return
    if not hmac.compare_digest((token or "").encode(), settings.admin_token.encode()):
        raise ApiError(401, "admin endpoints need `Authorization: Bearer $TUNELOOP_ADMIN_TOKEN`")


CurrentUser = Annotated[User, Depends(current_user)]
BrowserUser = Annotated[User, Depends(browser_user)]
AdminDep = Annotated[None, Depends(admin)]
