"""CSRF protection, in one module: the tokens of browser users and of admin
sessions, where a write carries its token, and the check.

A browser attaches cookies to cross-site requests, so every write made with a
cookie identity (the chat's browser user, the admin dashboard's session) must
also carry a token that a page of another site cannot read: the hidden form
field ``csrf_token`` or the header ``X-CSRF-Token``. Bearer credentials (API
keys, the admin token) need none: no browser sends them by itself.

A token is the hex HMAC-SHA256, under ``TUNELOOP_SECRET_KEY``, of its identity::

    browser session <sid>: hmac(secret, "csrf:<sid>")
    admin session <sid>: hmac(secret, "admin-csrf:<sid>")
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Request

from server.errors import ApiError

CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def _sign(secret_key: str, subject: str) -> str:
    return hmac.new(secret_key.encode(), subject.encode(), hashlib.sha256).hexdigest()


def browser_token(secret_key: str, sid: str) -> str:
    """The token of one browser session (``server.identity.BrowserSession.sid``:
    it exists before any identity does); chat pages put it in forms and in htmx headers."""
    return _sign(secret_key, f"csrf:{sid}")


def admin_session_token(secret_key: str, sid: str) -> str:
    """The token of one admin dashboard session (``sid`` from ``admin_auth.session_id``)."""
    return _sign(secret_key, f"admin-csrf:{sid}")


def token_matches(expected: str, token: str | None) -> bool:
    """Whether a sent token is the expected one (constant-time; a missing token never is)."""
    return bool(token) and hmac.compare_digest(expected.encode(), (token or "").encode())


async def token_from_request(request: Request) -> str | None:
    """The token a request carries: the header, else the form field of a form body."""
    token = request.headers.get(CSRF_HEADER)
    if token:
        return token
    content_type = request.headers.get("content-type", "")
    if content_type.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
        form = await request.form()
        value = form.get(CSRF_FIELD)
        return value if isinstance(value, str) else None
    return None


async def check_browser_write(request: Request, secret_key: str, sid: str) -> None:
    """Raise 403 when ``request`` is a write without the browser session's token."""
    if request.method not in SAFE_METHODS and not token_matches(
        browser_token(secret_key, sid), await token_from_request(request)
    ):
        raise ApiError(403, "missing or wrong CSRF token; reload the page and try again")


async def check_admin_write(request: Request, secret_key: str, sid: str) -> None:
    """Raise 403 when ``request`` is a write without the admin session's token."""
    if request.method not in SAFE_METHODS and not token_matches(
        admin_session_token(secret_key, sid), await token_from_request(request)
    ):
        raise ApiError(403, "missing or wrong CSRF token; reload the admin page and try again")
