"""API key lookups are cached for TUNELOOP_API_KEY_CACHE_SECONDS: what that
means for a key revoked elsewhere (the CLI), and that nothing else changes."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import time

from fastapi.testclient import TestClient

from server.api_key_cache import ApiKeyCache
from server.app import create_app
from server.identity import create_api_key, revoke_api_key
from store.db import session_scope
from store.tables import User
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


@contextlib.contextmanager
def _key_used_then_revoked_elsewhere(tmp_path, ttl: float):
    """A client whose key worked once and was then revoked behind the server's back."""
    app = create_app(make_settings(tmp_path, api_key_cache_seconds=ttl))
    with TestClient(app) as client:
        key = _key(app)
        assert _models(client, key) == 200
        _revoke_in_database(app, key)
        yield client, key


def test_key_revoked_elsewhere_stops_working_when_its_cache_entry_expires(tmp_path):
    with _key_used_then_revoked_elsewhere(tmp_path, ttl=0.5) as (client, key):
        assert _models(client, key) == 200  # still cached: the documented window
        time.sleep(0.6)
        assert _models(client, key) == 401


def test_without_a_cache_a_revoked_key_fails_at_once(tmp_path):
    with _key_used_then_revoked_elsewhere(tmp_path, ttl=0) as (client, key):
        assert _models(client, key) == 401


def test_unknown_keys_are_not_cached(tmp_path):
    app = create_app(make_settings(tmp_path))
    with TestClient(app) as client:
        assert _models(client, "tl-not-yet") == 401
        assert app.state.api_key_cache._entries == {}


def run_in_own_loop(coro):
    """asyncio.run in a thread of its own: the browser tests leave a loop running in this one."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def test_concurrent_requests_with_one_key_share_one_lookup_and_forget_drops_only_that_user():
    cache = ApiKeyCache(60)
    users = {"k1": User(id=1, kind="api"), "k2": User(id=2, kind="api")}
    calls: list[str] = []

    def lookup(key: str) -> User | None:
        calls.append(key)
        time.sleep(0.05)
        return users.get(key)

    async def main() -> list[User | None]:
        return await asyncio.gather(*(cache.user_for(k, lookup) for k in ["k1"] * 5 + ["k2", "nope"]))

    found = run_in_own_loop(main())
    assert [u.id if u else None for u in found] == [1, 1, 1, 1, 1, 2, None]
    assert sorted(calls) == ["k1", "k2", "nope"]
    cache.forget_user(1)
    run_in_own_loop(cache.user_for("k1", lookup))
    run_in_own_loop(cache.user_for("k2", lookup))
    assert sorted(calls) == ["k1", "k1", "k2", "nope"]
