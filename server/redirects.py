"""Where to send a browser back to after signing in, without an open redirect."""

from __future__ import annotations


def safe_next(target: str | None, within: str = "/", fallback: str = "/", refuse: tuple[str, ...] = ()) -> str:
    """``target`` if it is a path on this site under ``within`` (not
    protocol-relative ``//host``, no backslash that a browser reads as ``/``,
    none of ``refuse``), else ``fallback``."""
    if (target and target.startswith(within) and not target.startswith(("//", *refuse))
            and "\\" not in target):
        return target
    return fallback
