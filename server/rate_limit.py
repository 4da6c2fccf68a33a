"""Rate limits and the cap on concurrent generations.

Limits are counted per identity (account, API key's account, anonymous
visitor) and per client address, for three actions: ``chat`` (a chat turn, a
regeneration, an OpenAI-API completion), ``compare`` (``POST
/api/comparisons``) and ``feedback`` (thumbs and A/B choices). They use the
``limits`` library (moving windows; the same one slowapi builds on), kept in
memory by default or shared by every server through
``TUNELOOP_RATE_LIMIT_STORAGE`` (e.g. ``redis://127.0.0.1:6379``). A refused
request gets 429 with ``Retry-After``.

``GenerationSlots`` caps how many answers one identity has generating at once
(``TUNELOOP_MAX_CONCURRENT_GENERATIONS``), so one caller cannot fill the
engine's batch and starve everyone else.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import Counter
from collections.abc import Iterator

from limits import RateLimitItem, parse
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter

from store.errors import LimitExceeded
from store.settings import Settings

ACTIONS = ("chat", "compare", "feedback")


class RateLimited(Exception):
    """Too many requests; ``retry_after`` seconds until one more is allowed."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = max(1, retry_after)


def _parse(text: str, setting: str) -> RateLimitItem:
    try:
        return parse(text)
    except ValueError as exc:
        raise ValueError(f"{setting}={text!r} is not a rate such as '30/minute' or '5 per second'") from exc


def seconds_until_allowed(limiter: MovingWindowRateLimiter, item: RateLimitItem, key: str) -> int:
    """Whole seconds (at least 1) until ``key`` may be hit once more: the Retry-After."""
    return max(1, math.ceil(limiter.get_window_stats(item, key).reset_time - time.time()))


class RateLimiter:
    """Per identity and per address limits for each action."""

    def __init__(self, settings: Settings) -> None:
        self.per_identity = {
            "chat": _parse(settings.rate_limit_chat, "TUNELOOP_RATE_LIMIT_CHAT"),
            "compare": _parse(settings.rate_limit_compare, "TUNELOOP_RATE_LIMIT_COMPARE"),
            "feedback": _parse(settings.rate_limit_feedback, "TUNELOOP_RATE_LIMIT_FEEDBACK"),
        }
        self.per_address = _parse(settings.rate_limit_per_address, "TUNELOOP_RATE_LIMIT_PER_ADDRESS")
        self.enabled = settings.rate_limits
        # Counting in this process's memory does no I/O: callers may count on the
        # event loop (which also makes test-then-hit atomic); a shared store is a
        # network round trip and belongs in the thread pool.
        self.in_process = settings.rate_limit_storage.startswith("memory://")
        self.limiter = MovingWindowRateLimiter(storage_from_string(settings.rate_limit_storage))

    def hit(self, action: str, identity: int | None, address: str | None) -> None:
        """Count one ``action``; raise RateLimited (nothing counted) when over a limit."""
        if not self.enabled:
            return
        checks = []
        if identity is not None:
            checks.append((self.per_identity[action], f"{action}:id:{identity}", f"{action} requests"))
        if address:
            checks.append((self.per_address, f"all:ip:{address}", "requests from your address"))
        for item, key, what in checks:
            if not self.limiter.test(item, key):
                wait = seconds_until_allowed(self.limiter, item, key)
                raise RateLimited(f"too many {what} (limit {item}); retry in {wait} s", wait)
        for item, key, _ in checks:
            self.limiter.hit(item, key)


class GenerationSlots:
    """At most ``limit`` answers generating at once per identity (0: no cap).

    ``take`` is for a generation that outlives the code starting it (it runs in
    a task of its own): the caller hands the lease on, and whoever ends the
    generation releases it. ``hold`` is the same for one block of code."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: Counter[int] = Counter()
        self._lock = threading.Lock()

    def held(self, identity: int) -> int:
        """How many slots ``identity`` holds now."""
        with self._lock:
            return self._held[identity]

    def check(self, identity: int, count: int = 1) -> None:
        """Raise RateLimited if ``count`` slots are not free now (holds nothing)."""
        with self._lock:
            self._refuse_if_full(identity, count)

    def take(self, identity: int, count: int = 1) -> SlotLease:
        """Take ``count`` slots; RateLimited (nothing taken) if they are not free,
        ``store.errors.LimitExceeded`` if ``count`` is over the limit itself."""
        with self._lock:
            self._refuse_if_full(identity, count)
            self._held[identity] += count
        return SlotLease(self, identity, count)

    @contextlib.contextmanager
    def hold(self, identity: int, count: int = 1) -> Iterator[None]:
        """Hold ``count`` slots for the duration; RateLimited if they are not free."""
        lease = self.take(identity, count)
        try:
            yield
        finally:
            lease.close()

    def _refuse_if_full(self, identity: int, count: int) -> None:
        if not self.limit:
            return
        if count > self.limit:  # waiting would not help: a 400, not a 429
            raise LimitExceeded(
                f"this request would generate {count} answers at once, more than the {self.limit} one identity "
                "may have generating (TUNELOOP_MAX_CONCURRENT_GENERATIONS); ask for fewer", "n",
            )
        held = self._held[identity]
        if held + count > self.limit:
            raise RateLimited(
                f"you already have {held} answer{'s' if held != 1 else ''} being generated and may have at most "
                f"{self.limit} at once (TUNELOOP_MAX_CONCURRENT_GENERATIONS); retry when one has finished", 2,
            )

    def _give_back(self, identity: int, count: int) -> None:
        with self._lock:
            self._held[identity] -= count
            if self._held[identity] <= 0:
                del self._held[identity]


class SlotLease:
    """Slots one identity took for a request's answers: each answer releases
    one when it ends; ``close`` gives back whatever is left. Releasing more
    than was taken does nothing, so an answer and a clean-up may both release."""

    def __init__(self, slots: GenerationSlots, identity: int, count: int) -> None:
        self._slots = slots
        self.identity = identity
        self._left = count
        self._lock = threading.Lock()

    @property
    def left(self) -> int:
        return self._left

    def release(self, count: int = 1) -> None:
        with self._lock:
            count = min(count, self._left)
            self._left -= count
        if count:
            self._slots._give_back(self.identity, count)

    def close(self) -> None:
        self.release(self._left)
