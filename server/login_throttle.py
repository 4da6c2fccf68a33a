"""Throttling of sign-in attempts, so passwords and the admin token cannot be
guessed at speed.

Only failures count, in moving windows of the ``limits`` library (the one the
rate limits use, in the same storage: ``TUNELOOP_RATE_LIMIT_STORAGE``): per
account name (any address: a slow spread-out guesser) and per client address
(any name: one machine trying many accounts). Over either limit the attempt is
refused before the password is checked, with 429 and ``Retry-After``; a
success does not reset the count (an attacker who knows one password cannot
use it to keep guessing others). Sign-ups count against the address like a
failure, so one machine cannot mint accounts at speed.
"""

from __future__ import annotations

from limits import parse
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter

from server.rate_limit import RateLimited, seconds_until_allowed

PER_NAME = parse("10/15 minutes")
PER_ADDRESS = parse("30/15 minutes")


class LoginThrottle:
    def __init__(self, storage_uri: str) -> None:
        self.limiter = MovingWindowRateLimiter(storage_from_string(storage_uri))

    def _keys(self, name: str | None, address: str | None):
        if name is not None:
            yield PER_NAME, f"login:name:{name.strip().lower()}"
        if address:
            yield PER_ADDRESS, f"login:ip:{address}"

    def check(self, name: str | None, address: str | None) -> None:
        """Raise RateLimited when this name or address has failed too often lately
        (``name`` None: the address only, as for sign-ups)."""
        for item, key in self._keys(name, address):
            if not self.limiter.test(item, key):
                wait = seconds_until_allowed(self.limiter, item, key)
                raise RateLimited(f"too many failed sign-ins; try again in {wait} s", wait)

    def failed(self, name: str | None, address: str | None) -> None:
        for item, key in self._keys(name, address):
            self.limiter.hit(item, key)
