"""Who is asking: the browser session cookie and API keys. Their CSRF tokens
are in ``server.csrf``.

A browser holds one signed cookie naming its session: a random session id
(``sid``, which the CSRF token is derived from), and, once it has one, the
identity it acts as (``uid``) with the account's ``session_epoch``. A visitor
who only looks gets a cookie but no database row; the anonymous identity is
created on the first write. Signing in swaps in a fresh ``sid`` (no session
fixation) naming the account; raising the account's epoch revokes every
cookie at once.

API callers send ``Authorization: Bearer <key>``; keys are random, shown
once, stored only as their SHA-256, and act as the account they belong to.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from itsdangerous import BadSignature, URLSafeSerializer
from sqlmodel import Session, select

from store.tables import ApiKey, User, utcnow

COOKIE_NAME = "tuneloop_id"
COOKIE_MAX_AGE_S = 365 * 24 * 3600
KEY_PREFIX = "tl-"


@dataclass(frozen=True)
class BrowserSession:
    """What a browser's cookie says: its session id and who it acts as (if anyone yet)."""

    sid: str
    uid: int | None = None
    epoch: int = 0

    @classmethod
    def new(cls, uid: int | None = None, epoch: int = 0) -> BrowserSession:
        return cls(secrets.token_urlsafe(18), uid, epoch)


def _cookie_serializer(secret_key: str) -> URLSafeSerializer:
    return URLSafeSerializer(secret_key, salt="tuneloop.browser-session")


def sign_browser_session(secret_key: str, browser: BrowserSession) -> str:
    return _cookie_serializer(secret_key).dumps({"sid": browser.sid, "uid": browser.uid, "ep": browser.epoch})


def read_browser_session(secret_key: str, value: str | None) -> BrowserSession | None:
    """The session in a cookie value, or None when absent or tampered with."""
    if not value:
        return None
    try:
        data = _cookie_serializer(secret_key).loads(value)
    except BadSignature:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("sid"), str):
        return None
    uid, epoch = data.get("uid"), data.get("ep", 0)
    if (uid is not None and not isinstance(uid, int)) or not isinstance(epoch, int):
        return None
    return BrowserSession(data["sid"], uid, epoch)


def cookie_header(value: str, secure: bool) -> str:
    """``Set-Cookie`` value of the browser session (``SameSite=Lax`` so a link
    from elsewhere opens the chat signed in; writes need the CSRF token anyway)."""
    attrs = f"{COOKIE_NAME}={value}; Path=/; Max-Age={COOKIE_MAX_AGE_S}; HttpOnly; SameSite=Lax"
    return attrs + "; Secure" if secure else attrs


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_api_key(session: Session, name: str, user: User | None = None) -> tuple[ApiKey, str]:
    """Create a key. With ``user`` (an account) the key acts as that account:
    its chats and feedback are the account's, under the account's limits and
    training policy. Without, the key gets an identity of its own (kind
    ``api``: automation). Returns the row and the key (shown once)."""
    name = name.strip()
    if not name:
        raise ValueError("an API key needs a non-empty name")
    if user is None:
        user = User(kind="api", name=name)
        session.add(user)
        session.flush()
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(user_id=user.id, name=name, prefix=key[:10], key_hash=hash_key(key))
    session.add(row)
    session.flush()
    return row, key


def user_for_api_key(session: Session, key: str) -> User | None:
    row = session.exec(
        select(ApiKey).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))  # type: ignore[union-attr]
    ).first()
    user = session.get(User, row.user_id) if row else None
    return user if user is not None and user.status == "active" else None


def revoke_api_key(session: Session, key_id_or_prefix: str) -> ApiKey | None:
    """Revoke by numeric id or by the key's visible prefix; returns the row or None."""
    query = select(ApiKey).where(ApiKey.revoked_at.is_(None))  # type: ignore[union-attr]
    if key_id_or_prefix.isdigit():
        query = query.where(ApiKey.id == int(key_id_or_prefix))
    else:
        query = query.where(ApiKey.prefix == key_id_or_prefix[:10])
    row = session.exec(query).first()
    if row:
        row.revoked_at = utcnow()
        session.add(row)
    return row
