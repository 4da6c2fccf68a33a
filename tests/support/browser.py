"""Browser-test helpers that hold under the pages' Content-Security-Policy.

Playwright's ``wait_for_function`` compiles its predicate with ``eval`` inside
the page, which ``script-src 'self'`` (no ``'unsafe-eval'``) forbids. These
poll from Python with ``page.evaluate`` instead, which goes through the
DevTools protocol and is not subject to the page's CSP.
"""

from __future__ import annotations

import time


def wait_for_js(page, expression: str, timeout: float = 30_000, interval_s: float = 0.05) -> None:
    """Wait until ``expression`` (JavaScript, evaluated in the page) is truthy;
    ``timeout`` in milliseconds, as Playwright's own waits."""
    from playwright.sync_api import Error

    deadline = time.monotonic() + timeout / 1000
    while True:
        try:
            if page.evaluate(expression):
                return
        except Error as exc:  # the page navigated meanwhile (as wait_for_function, try again)
            if "context was destroyed" not in str(exc) and "navigat" not in str(exc):
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout / 1000:.0f} s waiting for: {expression}")
        time.sleep(interval_s)
