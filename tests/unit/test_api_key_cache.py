"""API key lookups are cached for TUNELOOP_API_KEY_CACHE_SECONDS: what that
means for a key revoked elsewhere (the CLI), and that nothing else changes."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient

from server.api_key_cache import ApiKeyCache
from server.app import create_app
from server.db import session_scope
from server.identity import create_api_key, revoke_api_key
from server.models import User
from tests.conftest import make_settings


def _key(app) -> str:
    with session_scope(app.state.db) as session:
        _, key = create_api_key(session, "cached")
    return key


def _revoke_in_database(app, key: str) -> None:
    """As `tuneloop keys revoke` does, from another process: the server isn't told."""
    with session_scope(app.state.db) as session:
        assert revoke_api_key(session, key[:10]) is not None


def _models(client, key: str) -> int:
    return client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code


def test_key_revoked_elsewhere_stops_working_when_its_cache_entry_expires(tmp_path):
    app = create_app(make_settings(tmp_path, api_key_cache_seconds=0.5))
    with TestClient(app) as client:
        key = _key(app)
        assert _models(client, key) == 200
        _revoke_in_database(app, key)
        assert _models(client, key) == 200  # still cached: the documented window
        time.sleep(0.6)
        assert _models(client, key) == 401


def test_without_a_cache_a_revoked_key_fails_at_once(tmp_path):
    app = create_app(make_settings(tmp_path, api_key_cache_seconds=0))
    with TestClient(app) as client:
        key = _key(app)
        assert _models(client, key) == 200
        _revoke_in_database(app, key)
        assert _models(client, key) == 401


def test_unknown_keys_are_not_cached(tmp_path):
    app = create_app(make_settings(tmp_path))
    with TestClient(app) as client:
        assert _models(client, "tl-not-yet") == 401
        assert app.state.api_key_cache.get("tl-not-yet") is None


def test_forget_user_drops_only_that_users_keys():
    cache = ApiKeyCache(60)
    cache.put("k1", User(id=1, kind="api"))
    cache.put("k2", User(id=2, kind="api"))
    cache.forget_user(1)
    assert cache.get("k1") is None
    assert cache.get("k2").id == 2
