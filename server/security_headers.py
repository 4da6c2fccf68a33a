"""Headers that tell browsers what a tuneloop response may do.

The Content-Security-Policy allows scripts, styles and connections from this
server only, so text a user or the model wrote can never run as script even if
it reached the page unescaped. It holds because templates carry no inline
``<script>``, ``<style>``, ``style=`` or ``on...=`` attributes and htmx runs
with ``allowEval: false`` (a test reads every template).

FastAPI's ``/docs`` and ``/redoc`` pages load Swagger UI and ReDoc from a CDN
with an inline script, so they get every header but the policy; turn them off
with ``TUNELOOP_API_DOCS=false``.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'self'; form-action 'self'"
)
HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
]
THIRD_PARTY_PAGES = ("/docs", "/redoc")


class SecurityHeaders:
    """Add the policy and the headers above to every HTTP response (plain ASGI,
    so streamed answers pass through untouched)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        added = list(HEADERS)
        if not scope["path"].startswith(THIRD_PARTY_PAGES):
            added.append((b"content-security-policy", CONTENT_SECURITY_POLICY.encode()))

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *added]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
