"""Polling until something real happens (a process, a replica, a run)."""

from __future__ import annotations

import time


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    """``predicate()``'s first truthy value, asked every ``interval`` seconds;
    AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
