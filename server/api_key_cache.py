"""A short-lived in-memory cache of API key lookups.

Every API request authenticates by its key; looking the key up in the database
each time costs a thread hop and a query on the path to the first token (17 ms
at 16 concurrent requests on 2 cores, measured by ``bench/serving.py
--profile``). A key seen in the last ``ttl`` seconds is trusted without asking
the database again. A key revoked through this server (admin API or
dashboard) is dropped from the cache at once; one revoked elsewhere (the CLI,
another replica) stops working within ``ttl`` seconds. Unknown keys are never
cached, so a newly created key works at once. ``ttl`` 0 turns caching off.
"""

from __future__ import annotations

import threading
import time

from server.identity import hash_key
from server.models import User


class ApiKeyCache:
    def __init__(self, ttl_seconds: float, max_entries: int = 10_000) -> None:
        self.ttl = ttl_seconds
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, User]] = {}  # key hash -> (expires at, user)
        self._lock = threading.Lock()

    def get(self, key: str) -> User | None:
        if self.ttl <= 0:
            return None
        digest = hash_key(key)
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None:
                return None
            if entry[0] < time.monotonic():
                del self._entries[digest]
                return None
            return entry[1]

    def put(self, key: str, user: User) -> None:
        if self.ttl <= 0:
            return
        with self._lock:
            if len(self._entries) >= self.max_entries:
                self._entries.clear()  # a flood of distinct keys: start over rather than grow
            self._entries[hash_key(key)] = (time.monotonic() + self.ttl, user)

    def forget_user(self, user_id: int) -> None:
        """Drop every cached key of ``user_id`` (its key was just revoked)."""
        with self._lock:
            for digest in [d for d, (_, user) in self._entries.items() if user.id == user_id]:
                del self._entries[digest]
