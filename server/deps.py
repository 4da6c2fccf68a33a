"""Request dependencies, as ``Annotated`` aliases so a handler's signature reads
as its needs.

- What ``create_app`` built, once per app: ``SettingsDep``, ``DbDep`` (the
  SQLAlchemy engine), ``EngineDep`` (the chat engine), ``AdaptersDep``,
  ``AnswersDep``, ``MetricsDep``, ``ApiKeyCacheDep``, ``TemplatesDep``,
  ``StartedAtDep``, ``FeedbackIngestDep`` (the group-commit feedback
  writer). Routes read the app's state only through these.
- Per request: ``SessionDep`` (a database session).
- Who is asking: ``CurrentUser`` (API key or browser cookie), ``BrowserUser``
  (chat pages), ``AdminDep`` (JSON admin API: admin token or dashboard
  session), ``AdminPage`` (dashboard pages: the signed-in session).
- Rendering with an area's base context: ``PageRender`` (chat pages) and
  ``AdminRender`` (dashboard pages).
- Limits: ``rate_limited(action)`` (a route dependency: 429 over the
  per-identity or per-address rate), ``RateLimiterDep`` and
  ``GenerationSlotsDep`` (answers generating at once per identity).
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
from starlette.concurrency import run_in_threadpool

from server import admin_auth, csrf, proxies
from server.adapters import AdapterRegistry
from server.answers import AnswerService
from server.api_key_cache import ApiKeyCache
from server.engine.base import ChatEngine
from server.errors import ApiError, SignInRequired
from server.feedback_ingest import FeedbackIngest
from server.identity import BrowserSession, user_for_api_key
from server.login_throttle import LoginThrottle
from server.metrics import Metrics
from server.rate_limit import ACTIONS, GenerationSlots, RateLimiter
from server.rendering import render
from store import accounts
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


async def get_login_throttle(request: Request) -> LoginThrottle:
    return request.app.state.login_throttle


async def get_started_at(request: Request) -> float:
    return request.app.state.started_at


async def get_feedback_ingest(request: Request) -> FeedbackIngest:
    return request.app.state.feedback


SettingsDep = Annotated[Settings, Depends(get_settings)]
DbDep = Annotated[Engine, Depends(get_db)]
EngineDep = Annotated[ChatEngine, Depends(get_engine)]
AdaptersDep = Annotated[AdapterRegistry, Depends(get_adapters)]
AnswersDep = Annotated[AnswerService, Depends(get_answers)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
ApiKeyCacheDep = Annotated[ApiKeyCache, Depends(get_api_key_cache)]
TemplatesDep = Annotated[Jinja2Templates, Depends(get_templates)]
LoginThrottleDep = Annotated[LoginThrottle, Depends(get_login_throttle)]
StartedAtDep = Annotated[float, Depends(get_started_at)]
"""When the app was built (seconds since the epoch): the ``created`` of /v1/models."""
FeedbackIngestDep = Annotated[FeedbackIngest, Depends(get_feedback_ingest)]
"""Thumbs and choices, group-committed (``server.feedback_ingest``)."""


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


def _resolve_browser(
    db: Engine, settings: Settings, browser: BrowserSession | None, proxy_user: str | None, acting: bool
) -> tuple[User | None, BrowserSession | None]:
    """Who a browser is (run in the thread pool: it reads and may write the
    database). Returns the user -- None when the visitor has no identity yet and
    is only looking -- and the session to write back to the cookie, if it changed.

    Order: the trusted proxy's user header (single sign-on); the cookie's
    identity if its session is still valid (not signed out everywhere, not
    disabled); else, when ``acting`` and anonymous chat is allowed, a new
    anonymous identity (the first write creates it, never a page view)."""
    with Session(db, expire_on_commit=False) as session:
        if proxy_user is not None:
            user = accounts.proxy_account(session, proxy_user)
            session.commit()
            return user, None
        user = session.get(User, browser.uid) if browser is not None and browser.uid is not None else None
        replaced = None
        if browser is not None and browser.uid is not None and not accounts.session_valid(user, browser.epoch):
            user, replaced = None, BrowserSession.new()  # signed out: a fresh session, no identity
        if user is None and acting and browser is not None and settings.anonymous == "chat":
            user = accounts.new_anonymous_identity(session)
            session.commit()
            replaced = BrowserSession((replaced or browser).sid, user.id)
        return user, replaced


def _proxy_user(request: Request, settings: Settings) -> str | None:
    """The single sign-on user named by the trusted reverse proxy, if this
    request came through one and the header is configured."""
    header = settings.trusted_user_header
    if not header or not proxies.from_trusted_proxy(request.scope, settings):
        return None
    return (request.headers.get(header) or "").strip() or None


async def _browser_identity(request: Request, settings: Settings, db: Engine, acting: bool) -> User | None:
    """The browser's user after the CSRF check (writes are checked before any
    identity is created, so a cross-site request cannot mint one)."""
    browser: BrowserSession | None = getattr(request.state, "browser", None)
    if browser is not None:
        await csrf.check_browser_write(request, settings.secret_key, browser.sid)
    user, replaced = await run_in_threadpool(
        _resolve_browser, db, settings, browser, _proxy_user(request, settings), acting
    )
    if replaced is not None:
        request.state.browser = request.state.new_browser = replaced
    return user


async def current_user(
    request: Request, settings: SettingsDep, db: DbDep, api_key_cache: ApiKeyCacheDep
) -> User:
    """API identity: a bearer API key, or the browser cookie (then a CSRF token is
    required on writes, because a browser sends cookies cross-site)."""
    key = _bearer(request)
    if key is not None:
        user = await api_key_cache.user_for(key, lambda k: _user_by_key(db, k))
        if user is None:
            raise ApiError(
                401, "the API key is unknown, revoked, or its account is not active; "
                "create one with `tuneloop keys create NAME`",
            )
        return user
    user = await _browser_identity(request, settings, db, acting=request.method not in csrf.SAFE_METHODS)
    if user is None:
        raise ApiError(401, "send `Authorization: Bearer <api key>` (create one with `tuneloop keys create NAME`)")
    return user


async def browser_user(request: Request, settings: SettingsDep, db: DbDep) -> User:
    """Page identity. A visitor who has done nothing yet is an unsaved anonymous
    user (``id`` None: no conversations, nothing stored); the first write
    creates the identity. Writes need the page's CSRF token (hidden form field
    or X-CSRF-Token header). With ``TUNELOOP_ANONYMOUS=off`` only signed-in
    users get in (``SignInRequired``: pages redirect to the sign-in page)."""
    acting = request.method not in csrf.SAFE_METHODS
    user = await _browser_identity(request, settings, db, acting)
    if user is not None:
        return user
    if settings.anonymous == "off":
        raise SignInRequired("sign in to chat here (anonymous chat is off)")
    if acting:
        raise ApiError(401, "your browser session was not recognised; enable cookies and reload")
    return User(kind="browser")


def browser_session(request: Request) -> BrowserSession:
    """The browser's session (the middleware gives every page request one)."""
    browser = getattr(request.state, "browser", None)
    if browser is None:
        raise ApiError(401, "your browser session was not recognised; enable cookies and reload")
    return browser


async def _admin_session_id(request: Request, settings: Settings, db: Engine) -> tuple[str, str | None] | None:
    """The dashboard session: a token session (``admin_auth``'s cookie) or an
    admin account's browser session. Returns (session id for CSRF, username)."""
    sid = admin_auth.session_id(settings, request.cookies.get(admin_auth.ADMIN_COOKIE))
    if sid is not None:
        return sid, None
    browser: BrowserSession | None = getattr(request.state, "browser", None)
    username = await run_in_threadpool(admin_auth.admin_account, db, browser)
    return (f"account:{browser.sid}", username) if username is not None and browser is not None else None


async def admin(request: Request, settings: SettingsDep, db: DbDep) -> None:
    """The admin token as a bearer, or the dashboard's session (the token's
    session cookie, or an admin account signed in); cookie writes need the
    session's CSRF token, as for browser users."""
    token = _bearer(request)
    found = await _admin_session_id(request, settings, db) if token is None else None
    if found is not None:
        await csrf.check_admin_write(request, settings.secret_key, found[0])
        return
    if not admin_auth.token_matches(settings, token or ""):
        raise ApiError(
            401, "admin endpoints need `Authorization: Bearer $TUNELOOP_ADMIN_TOKEN` or a signed-in admin account"
        )


class LoginRequired(Exception):
    """No valid admin session on a dashboard request (the dashboard's route
    class answers it with a redirect to the login page)."""


@dataclass(frozen=True)
class AdminSession:
    sid: str
    csrf: str
    account: str | None = None
    """The admin account's username; None for a session opened with the admin token."""


async def admin_session(request: Request, settings: SettingsDep, db: DbDep) -> AdminSession:
    """The signed-in admin session; writes must carry its CSRF token (hidden
    ``csrf_token`` field or ``X-CSRF-Token`` header), else 403."""
    found = await _admin_session_id(request, settings, db)
    if found is None:
        raise LoginRequired
    sid, account = found
    await csrf.check_admin_write(request, settings.secret_key, sid)
    return AdminSession(sid, csrf.admin_session_token(settings.secret_key, sid), account)


CurrentUser = Annotated[User, Depends(current_user)]
BrowserUser = Annotated[User, Depends(browser_user)]
BrowserSessionDep = Annotated[BrowserSession, Depends(browser_session)]
AdminDep = Annotated[None, Depends(admin)]
AdminPage = Annotated[AdminSession, Depends(admin_session)]


# --- rate limits and generation slots ------------------------------------------
# Counted per identity (the user the route already depends on) and per client
# address (server.proxies: X-Forwarded-For only from a trusted proxy).


async def get_rate_limiter(request: Request) -> RateLimiter:
    return request.app.state.rate_limiter


async def get_generation_slots(request: Request) -> GenerationSlots:
    return request.app.state.generation_slots


RateLimiterDep = Annotated[RateLimiter, Depends(get_rate_limiter)]
GenerationSlotsDep = Annotated[GenerationSlots, Depends(get_generation_slots)]


async def _count(request: Request, limiter: RateLimiter, settings: Settings, action: str, user: User) -> None:
    address = proxies.client_address(request.scope, settings)
    if limiter.in_process:
        limiter.hit(action, user.id, address)
    else:  # a shared store (redis://...) is a network round trip
        await run_in_threadpool(limiter.hit, action, user.id, address)


def rate_limited(action: str, *, page: bool = False) -> Any:
    """A route dependency counting one ``action`` (``chat``, ``compare``,
    ``feedback``) for the caller -- ``CurrentUser``, or ``BrowserUser`` with
    ``page=True`` -- and its address; over a limit it raises
    ``server.rate_limit.RateLimited`` (429 with ``Retry-After``). Use it as
    ``@router.post(..., dependencies=[rate_limited("chat")])``."""
    if action not in ACTIONS:
        raise ValueError(f"unknown rate-limited action {action!r}; one of {', '.join(ACTIONS)}")

    async def api_caller(
        request: Request, user: CurrentUser, limiter: RateLimiterDep, settings: SettingsDep
    ) -> None:
        await _count(request, limiter, settings, action, user)

    async def page_caller(
        request: Request, user: BrowserUser, limiter: RateLimiterDep, settings: SettingsDep
    ) -> None:
        await _count(request, limiter, settings, action, user)

    return Depends(page_caller if page else api_caller)


# --- rendering with an area's base context ------------------------------------
# async for the same reason: they only bind the request to ``rendering.render``.

ADMIN_HEADERS = {"Vary": "HX-Request, HX-Target", "Cache-Control": "no-store"}


def _page_renderer(
    request: Request, account: User | None, settings: Settings, templates: Jinja2Templates,
    adapters: AdapterRegistry, engine: ChatEngine,
) -> Callable[..., HTMLResponse]:
    def render_page(name: str, context: dict[str, Any], status: int = 200) -> HTMLResponse:
        base = {
            "csrf": csrf.browser_token(settings.secret_key, browser_session(request).sid),
            "account": account,
            "anonymous_policy": settings.anonymous,
            "signup_policy": settings.signup,
            "adapter": adapters.active,
            "engine": engine,
        }
        return render(templates, request, name, context, base, status)

    return render_page


async def page_render(
    request: Request, user: BrowserUser, settings: SettingsDep, templates: TemplatesDep,
    adapters: AdaptersDep, engine: EngineDep,
) -> Callable[..., HTMLResponse]:
    """``render(name, context, status=200)`` for the chat pages: every page gets
    the session's CSRF token, who is signed in, the serving adapter and the engine."""
    account = user if user.kind == "account" else None
    return _page_renderer(request, account, settings, templates, adapters, engine)


async def public_render(
    request: Request, settings: SettingsDep, templates: TemplatesDep, adapters: AdaptersDep, engine: EngineDep,
) -> Callable[..., HTMLResponse]:
    """The same for pages anyone may see without an identity (sign-in, sign-up)."""
    return _page_renderer(request, None, settings, templates, adapters, engine)


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
PublicRender = Annotated[Callable[..., HTMLResponse], Depends(public_render)]
AdminRender = Annotated[Callable[..., HTMLResponse], Depends(admin_render)]
