"""Who is asking: browser identities (signed cookie) and API keys. Their CSRF
tokens are in ``server.csrf``.

A browser gets a user row on its first page view and a signed cookie naming
it. API callers send ``Authorization: Bearer <key>``; keys are random, shown
once, and stored only as their SHA-256.
"""

from __future__ import annotations

import hashlib
import secrets

from itsdangerous import BadSignature, URLSafeSerializer
from sqlmodel import Session, select

from store.tables import ApiKey, User, utcnow

COOKIE_NAME = "tuneloop_id"
KEY_PREFIX = "tl-"


def _cookie_serializer(secret_key: str) -> URLSafeSerializer:
    return URLSafeSerializer(secret_key, salt="tuneloop.identity")


def sign_user_cookie(secret_key: str, user_id: int) -> str:
    return _cookie_serializer(secret_key).dumps({"uid": user_id})


def read_user_cookie(secret_key: str, value: str | None) -> int | None:
    """The user id in a cookie value, or None when absent or tampered with."""
    if not value:
        return None
    try:
        data = _cookie_serializer(secret_key).loads(value)
    except BadSignature:
        return None
    uid = data.get("uid") if isinstance(data, dict) else None
    return uid if isinstance(uid, int) else None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_api_key(session: Session, name: str) -> tuple[ApiKey, str]:
    """Create an API user and its key. Returns the row and the key (shown once)."""
    name = name.strip()
    if not name:
        raise ValueError("an API key needs a non-empty name")
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
    return session.get(User, row.user_id) if row else None


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
