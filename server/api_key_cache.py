"""A short-lived in-memory cache of API key lookups.

Every API request authenticates by its key; looking the key up in the database
each time costs a thread hop and a query on the path to the first token (17 ms
at 16 concurrent requests on 2 cores, measured by ``bench/serving.py
--profile``). A key seen in the last ``ttl`` seconds is trusted without asking
the database again, and concurrent requests with a key not cached yet share one
lookup. A key revoked through this server (the admin dashboard) is dropped from
the cache at once; one revoked elsewhere (the CLI, another replica) stops
working within ``ttl`` seconds. Unknown keys are never cached, so a newly
created key works at once. ``ttl`` 0 turns caching off.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

from starlette.concurrency import run_in_threadpool

from server.identity import hash_key
from store.tables import User


class ApiKeyCache:
    def __init__(self, ttl_seconds: float, max_entries: int = 10_000) -> None:
        self.ttl = ttl_seconds
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, User]] = {}  # key hash -> (expires at, user)
        self._lock = threading.Lock()  # forget_user() may run in a worker thread
        self._in_flight: dict[str, asyncio.Future[User | None]] = {}  # event loop only

    async def user_for(self, key: str, lookup: Callable[[str], User | None]) -> User | None:
        """The user owning ``key``: from the cache, or from ``lookup(key)`` (run in
        a worker thread, once for all requests waiting on the same key)."""
        digest = hash_key(key)
        user = self._get(digest)
        if user is not None:
            return user
        pending = self._in_flight.get(digest)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[User | None] = asyncio.get_running_loop().create_future()
        self._in_flight[digest] = future
        try:
            user = await run_in_threadpool(lookup, key)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning without waiters
            raise
        finally:
            del self._in_flight[digest]
        future.set_result(user)
        if user is not None:
            self._put(digest, user)
        return user

    def _get(self, digest: str) -> User | None:
        if self.ttl <= 0:
            return None
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None:
                return None
            if entry[0] < time.monotonic():
                del self._entries[digest]
                return None
            return entry[1]

    def _put(self, digest: str, user: User) -> None:
        if self.ttl <= 0:
            return
        with self._lock:
            if len(self._entries) >= self.max_entries:
                self._entries.clear()  # a flood of distinct keys: start over rather than grow
            self._entries[digest] = (time.monotonic() + self.ttl, user)

    def forget_user(self, user_id: int) -> None:
        """Drop every cached key of ``user_id`` (its key was just revoked)."""
        with self._lock:
            for digest in [d for d, (_, user) in self._entries.items() if user.id == user_id]:
                del self._entries[digest]
