"""ASGI middleware: request-size limit and the browser identity cookie.

Both are plain ASGI (not BaseHTTPMiddleware) so streamed answers pass through
untouched and a client that goes away is still noticed by the route.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import error_body
from server.identity import COOKIE_NAME, BrowserSession, cookie_header, read_browser_session, sign_browser_session

_PAGE_EXCLUDED = ("/api/", "/v1/", "/healthz", "/static/", "/metrics", "/favicon")


class _BodyTooLarge(Exception):
    pass


class BodySizeLimit:
    """Refuse request bodies over ``max_bytes`` with a 413 JSON error; paths in
    ``larger`` (path -> (limit, setting name)) have their own limit (dataset uploads)."""

    def __init__(
        self, app: ASGIApp, max_bytes: int, larger: dict[str, tuple[int, str]] | None = None
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.larger = larger or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, setting = self.larger.get(scope["path"], (self.max_bytes, "TUNELOOP_MAX_REQUEST_BYTES"))
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(send, int(declared), limit, setting)
            return
        received = 0
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not response_started:
                await self._refuse(send, received, limit, setting)

    async def _refuse(self, send: Send, size: int, limit: int, setting: str) -> None:
        body = json.dumps(
            error_body(413, f"request body is {size} bytes or more; the limit is {limit} bytes ({setting})")
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class BrowserIdentity:
    """Read the browser session cookie into ``scope["state"]["browser"]`` (a
    ``server.identity.BrowserSession``), and write the cookie back when a
    handler put a new session in ``scope["state"]["new_browser"]`` (sign-in,
    sign-out, the first write of an anonymous visitor).

    No database here: a page view without a cookie gets a fresh session id
    (for its CSRF token), nothing more. API paths never get one minted (they
    authenticate with keys) but do read an existing cookie.
    """

    def __init__(self, app: ASGIApp, secret_key: str, secure: bool) -> None:
        self.app = app
        self.secret_key = secret_key
        self.secure = secure

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        browser = read_browser_session(self.secret_key, _cookie(scope, COOKIE_NAME))
        if browser is None and not scope.get("path", "").startswith(_PAGE_EXCLUDED):
            browser = state["new_browser"] = BrowserSession.new()
        state["browser"] = browser

        async def send_with_cookie(message: Message) -> None:
            new = state.get("new_browser")
            if new is not None and message["type"] == "http.response.start":
                header = cookie_header(sign_browser_session(self.secret_key, new), self.secure)
                message["headers"] = list(message.get("headers", [])) + [(b"set-cookie", header.encode())]
            await send(message)

        await self.app(scope, receive, send_with_cookie)


def _cookie(scope: Scope, name: str) -> str | None:
    for key, value in scope.get("headers", []):
        if key == b"cookie":
            for part in value.decode("latin-1").split(";"):
                k, _, v = part.strip().partition("=")
                if k == name:
                    return v
    return None
