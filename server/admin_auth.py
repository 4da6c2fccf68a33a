"""The admin dashboard's sign-in. Two ways in: an admin account signed in on
the chat's sign-in page (its browser session, revocable per account; see
:func:`admin_account`), or the admin token, which once buys a signed session
cookie (for set-ups without accounts yet). Writes made with either cookie need
the session's CSRF token (``server.csrf.admin_session_token``).

Functions over the settings and the cookie value, so the dashboard pages
(``server.deps.admin_session``), the JSON admin API (``server.deps.admin``)
and the upload gate accept the same sessions.

The cookie holds a random session id and a fingerprint of the admin token
(never the token), signed and time-stamped with ``TUNELOOP_SECRET_KEY``: it
expires after :data:`SESSION_MAX_AGE_S`, and changing the admin token signs
every session out.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlalchemy.engine import Engine
from sqlmodel import Session

from server.identity import BrowserSession
from store import accounts
from store.settings import Settings

ADMIN_COOKIE = "tuneloop_admin"
SESSION_MAX_AGE_S = 12 * 3600


def _serializer(secret_key: str) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(secret_key, salt="tuneloop.admin-session")


def _token_fingerprint(settings: Settings) -> str:
    digest = hmac.new(settings.secret_key.encode(), f"admin-token:{settings.admin_token}".encode(), hashlib.sha256)
    return digest.hexdigest()[:32]


def token_matches(settings: Settings, token: str) -> bool:
    """Whether ``token`` is the admin token (constant-time comparison)."""
    return hmac.compare_digest(token.encode(), settings.admin_token.encode())


def sign_session(settings: Settings) -> str:
    """A new session cookie value (call only after :func:`token_matches`)."""
    payload = {"sid": secrets.token_urlsafe(16), "fp": _token_fingerprint(settings)}
    return _serializer(settings.secret_key).dumps(payload)


def session_id(settings: Settings, cookie: str | None, max_age_s: int = SESSION_MAX_AGE_S) -> str | None:
    """The session id in a cookie value, or None when it is absent, tampered with,
    older than ``max_age_s`` or signed for a previous admin token."""
    if not cookie:
        return None
    try:
        data = _serializer(settings.secret_key).loads(cookie, max_age=max_age_s)
    except BadSignature:  # SignatureExpired is a BadSignature
        return None
    if not isinstance(data, dict) or not isinstance(data.get("sid"), str):
        return None
    if not hmac.compare_digest(str(data.get("fp", "")), _token_fingerprint(settings)):
        return None
    return data["sid"]


def admin_account(db: Engine, browser: BrowserSession | None) -> str | None:
    """The username of the admin account a browser session is signed in as: an
    active admin whose sessions were not revoked. Reads the database: call it
    from the thread pool."""
    if browser is None:
        return None
    with Session(db) as session:
        user = accounts.signed_in_account(session, browser.uid, browser.epoch)
        return user.username if user is not None and user.role == "admin" else None


def cookie_header(settings: Settings, value: str) -> str:
    """``Set-Cookie`` value: path ``/`` so ``/api/admin/*`` downloads accept it too."""
    attrs = f"{ADMIN_COOKIE}={value}; Path=/; Max-Age={SESSION_MAX_AGE_S}; HttpOnly; SameSite=Strict"
    return attrs + "; Secure" if settings.env == "production" else attrs


def clear_cookie_header(settings: Settings) -> str:
    attrs = f"{ADMIN_COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict"
    return attrs + "; Secure" if settings.env == "production" else attrs
