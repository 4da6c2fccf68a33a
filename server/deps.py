"""Request dependencies, as ``Annotated`` aliases so a handler's signature reads
as its needs.

- What ``create_app`` built, once per app: ``SettingsDep``, ``DbDep`` (the
  SQLAlchemy engine), ``EngineDep`` (the chat engine), ``AdaptersDep``,
  ``AnswersDep``, ``MetricsDep``, ``ApiKeyCacheDep``, ``TemplatesDep``,
  ``StartedAtDep``. Routes read the app's state only through these.
- Per request: ``SessionDep`` (a database session).
- Who is asking: ``CurrentUser`` (API key or browser cookie), ``BrowserUser``
  (chat pages), ``AdminDep`` (JSON admin API: admin token or dashboard
  session), ``AdminPage`` (dashboard pages: the signed-in session).
- Rendering with an area's base context: ``PageRender`` (chat pages) and
  ``AdminRender`` (dashboard pages).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from sqlalchemy.engine import Engine
from sqlmodel import Session

from server import admin_auth, csrf
from server.adapters import AdapterRegistry
from server.answers import AnswerService
from server.api_key_cache import ApiKeyCache
from server.engine.base import ChatEngine
from server.errors import ApiError
from server.identity import user_for_api_key
from server.metrics import Metrics
from server.rendering import render
from store.settings import Settings
from store.tables import User

# --- what create_app built ----------------------------------------------------
# async: each is an attribute read, not worth a hop to the thread pool.


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_db(request: Request) -> Engine:
    return request.app.state.db


async def get_engine(request: Request) -> ChatEngine:
    return request.app.state.engine


async def get_adapters(request: Request) -> AdapterRegistry:
    return request.app.state.adapters


async def get_answers(request: Request) -> AnswerService:
    return request.app.state.answers


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_api_key_cache(request: Request) -> ApiKeyCache:
    return request.app.state.api_key_cache


async def get_templates(request: Request) -> Jinja2Templates:
    return request.app.state.templates


async def get_started_at(request: Request) -> float:
    return request.app.state.started_at


SettingsDep = Annotated[Settings, Depends(get_settings)]
DbDep = Annotated[Engine, Depends(get_db)]
EngineDep = Annotated[ChatEngine, Depends(get_engine)]
AdaptersDep = Annotated[AdapterRegistry, Depends(get_adapters)]
AnswersDep = Annotated[AnswerService, Depends(get_answers)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
ApiKeyCacheDep = Annotated[ApiKeyCache, Depends(get_api_key_cache)]
TemplatesDep = Annotated[Jinja2Templates, Depends(get_templates)]
StartedAtDep = Annotated[float, Depends(get_started_at)]
"""When the app was built (seconds since the epoch): the ``created`` of /v1/models."""


def get_session(db: DbDep) -> Iterator[Session]:
    with Session(db, expire_on_commit=False) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session, scope="function")]


# --- who is asking ------------------------------------------------------------


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def _user_by_key(db: Engine, key: str) -> User | None:
    """Key lookup off the event loop, in a session of its own (streams must not
    hold a pooled connection for their whole duration)."""
    with Session(db, expire_on_commit=False) as session:
        user = user_for_api_key(session, key)
        if user is not None:
            session.expunge(user)
        return user


async def current_user(
    request: Request, session: SessionDep, settings: SettingsDep, db: DbDep, api_key_cache: ApiKeyCacheDep
) -> User:
    """API identity: a bearer API key, or the browser cookie (then a CSRF token is
    required on writes, because a browser sends cookies cross-site)."""
    key = _bearer(request)
    if key is not None:
        user = await api_key_cache.user_for(key, lambda k: _user_by_key(db, k))
        if user is None:
            raise ApiError(401, "the API key is unknown or revoked; create one with `tuneloop keys create NAME`")
        return user
    uid = request.state.browser_user_id if hasattr(request.state, "browser_user_id") else None
    user = session.get(User, uid) if uid is not None else None
    if user is None:
        raise ApiError(401, "send `Authorization: Bearer <api key>` (create one with `tuneloop keys create NAME`)")
    await csrf.check_browser_write(request, settings.secret_key, user.id)
    return user


async def browser_user(request: Request, session: SessionDep, settings: SettingsDep) -> User:
    """Page identity: the cookie user (the middleware mints one on first visit).
    Writes need the page's CSRF token (hidden form field or X-CSRF-Token header)."""
    uid = getattr(request.state, "browser_user_id", None)
    user = session.get(User, uid) if uid is not None else None
    if user is None:
        raise ApiError(401, "your browser identity was not recognised; enable cookies and reload")
    await csrf.check_browser_write(request, settings.secret_key, user.id)
    return user


def _admin_session_id(request: Request, settings: Settings) -> str | None:
    return admin_auth.session_id(settings, request.cookies.get(admin_auth.ADMIN_COOKIE))


async def admin(request: Request, settings: SettingsDep) -> None:
    """The admin token as a bearer, or the admin dashboard's session cookie
    (then writes need the session's CSRF token, as for browser users)."""
    token = _bearer(request)
    sid = _admin_session_id(request, settings) if token is None else None
    if sid is not None:
        await csrf.check_admin_write(request, settings.secret_key, sid)
        return
    if not admin_auth.token_matches(settings, token or ""):
        raise ApiError(401, "admin endpoints need `Authorization: Bearer $TUNELOOP_ADMIN_TOKEN`")


class LoginRequired(Exception):
    """No valid admin session cookie on a dashboard request (the dashboard's
    route class answers it with a redirect to the login page)."""


@dataclass(frozen=True)
class AdminSession:
    sid: str
    csrf: str


async def admin_session(request: Request, settings: SettingsDep) -> AdminSession:
    """The signed-in admin session; writes must carry its CSRF token (hidden
    ``csrf_token`` field or ``X-CSRF-Token`` header), else 403."""
    sid = _admin_session_id(request, settings)
    if sid is None:
        raise LoginRequired
    await csrf.check_admin_write(request, settings.secret_key, sid)
    return AdminSession(sid, csrf.admin_session_token(settings.secret_key, sid))


CurrentUser = Annotated[User, Depends(current_user)]
BrowserUser = Annotated[User, Depends(browser_user)]
AdminDep = Annotated[None, Depends(admin)]
AdminPage = Annotated[AdminSession, Depends(admin_session)]


# --- rendering with an area's base context ------------------------------------
# async for the same reason: they only bind the request to ``rendering.render``.

ADMIN_HEADERS = {"Vary": "HX-Request, HX-Target", "Cache-Control": "no-store"}


async def page_render(
    request: Request, user: BrowserUser, settings: SettingsDep, templates: TemplatesDep,
    adapters: AdaptersDep, engine: EngineDep,
) -> Callable[..., HTMLResponse]:
    """``render(name, context, status=200)`` for the chat pages: every page gets
    the user's CSRF token, the serving adapter and the engine."""

    def render_page(name: str, context: dict[str, Any], status: int = 200) -> HTMLResponse:
        base = {
            "csrf": csrf.browser_token(settings.secret_key, user.id),
            "adapter": adapters.active,
            "engine": engine,
        }
        return render(templates, request, name, context, base, status)

    return render_page


async def admin_render(request: Request, templates: TemplatesDep) -> Callable[..., HTMLResponse]:
    """``render(name, context, admin, status=200)`` for ``admin/<name>``: with the
    session's CSRF token and the nav state (``admin`` is None on the login page);
    dashboard answers are never cached."""

    def render_admin(
        name: str, context: dict[str, Any], admin: AdminSession | None, status: int = 200
    ) -> HTMLResponse:
        base = {"csrf": admin.csrf if admin else "", "signed_in": admin is not None}
        return render(templates, request, f"admin/{name}", context, base, status, ADMIN_HEADERS)

    return render_admin


PageRender = Annotated[Callable[..., HTMLResponse], Depends(page_render)]
AdminRender = Annotated[Callable[..., HTMLResponse], Depends(admin_render)]
