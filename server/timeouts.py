"""How long a client may take to send its request.

Covered here and by ``tuneloop serve``'s uvicorn settings:

- the body: ``BodyReadTimeout`` answers 408 (and closes the connection) when
  the next part of a request body takes longer than
  ``TUNELOOP_BODY_TIMEOUT_SECONDS``; a slow but steady upload is not cut;
- between requests on a kept-alive connection: uvicorn's ``timeout_keep_alive``;
- header size: ``h11_max_incomplete_event_size`` (uvicorn's h11 protocol; the
  httptools one accepts headers of any size, so ``tuneloop serve`` picks h11).

Not covered: how long the request line and headers take. uvicorn has no header
timeout, and its keep-alive timer only runs between requests, so a client that
opens a connection and trickles its headers holds it. Put a reverse proxy with
a header timeout (nginx ``client_header_timeout``) in front of a server others
can reach.
"""

from __future__ import annotations

import asyncio
import json

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import error_body

KEEP_ALIVE_SECONDS = 5
MAX_HEADER_BYTES = 16 * 1024


class BodyReadTimeout:
    """Answer 408 when a request body stalls for ``seconds`` between parts.

    Plain ASGI: once the body is complete, ``receive`` is left alone (a
    streaming response waits on it for the client going away)."""

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body_complete = timed_out = response_started = False
        message_408 = (
            f"the request body stopped arriving for {self.seconds:g} s (TUNELOOP_BODY_TIMEOUT_SECONDS); "
            "send it again in one go"
        )

        async def timed_receive() -> Message:
            nonlocal body_complete, timed_out
            if body_complete or timed_out:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.seconds)
            except TimeoutError:
                timed_out = True
                # FastAPI turns other errors raised while reading a body into 400; an HTTPException passes through
                raise HTTPException(408, message_408) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_complete = True
            return message

        async def closing_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
                if timed_out:  # the rest of the body may still come: never read it as the next request
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, timed_receive, closing_send)
        except Exception:
            if not timed_out or response_started:
                raise
        if timed_out and not response_started:  # the app swallowed the timeout without answering
            body = json.dumps(error_body(408, message_408)).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await closing_send({"type": "http.response.start", "status": 408, "headers": headers})
            await send({"type": "http.response.body", "body": body})
