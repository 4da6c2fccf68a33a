"""What the store refuses, as typed errors with no HTTP in them.

Each message says what was wrong and what to do; ``server.errors`` maps each
class to its status once (``NotFound`` -> 404, ``Conflict`` -> 409, ...), and
the CLI prints the message. ``field`` names the input the error is about, when
there is one (an OpenAI client shows it as ``param``).
"""

from __future__ import annotations


class StoreError(Exception):
    """Something the store will not do with this input."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidInput(StoreError):
    """The input breaks a rule of the domain (rate a question, an empty turn, ...)."""


class NotFound(StoreError):
    """No such thing, or not the caller's (a stranger is not told it exists)."""


class NotAllowed(StoreError):
    """The caller may not do this (wrong password, a disabled account, sign-up closed)."""


class Conflict(StoreError):
    """Valid, but not now: the thing is in a state that does not allow it."""


class LimitExceeded(StoreError):
    """Over a configured limit (messages per conversation, ...)."""


class UnknownAdapterVersion(StoreError):
    """An adapter version that does not exist, or text that names none."""


class VersionNotServable(StoreError):
    """An adapter version that cannot be served (it failed to load, or its folder
    is not a servable LoRA)."""


class NotStored(StoreError):
    """An accepted write could not be made durable (the database stayed locked
    or away through every retry); nothing may be acknowledged as stored."""
