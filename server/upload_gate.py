"""The admin check of an upload, made before its body is read.

FastAPI parses a route's ``File``/``Form`` parameters before it runs the route's
dependencies, so ``POST /api/admin/import`` would spool up to
``TUNELOOP_MAX_IMPORT_BYTES`` of anyone's multipart body to disk before its
admin dependency answered 401. ``AdminBeforeUpload`` answers 401 from the
headers (and, for a signed-in admin account, one lookup in the thread pool)
unless they carry the admin token as a bearer, a valid admin session cookie
or an admin account's browser session (``server.admin_auth``). The route's own dependency still runs
afterwards: a session's CSRF token may be a form field, which needs the body.
"""

from __future__ import annotations

import json

from sqlalchemy.engine import Engine
from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from server import admin_auth
from server.errors import error_body
from server.identity import COOKIE_NAME, read_browser_session
from store.settings import Settings

UPLOAD_PATHS = ("/api/admin/import",)


async def _may_upload(connection: HTTPConnection, settings: Settings, db: Engine) -> bool:
    scheme, _, token = connection.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return admin_auth.token_matches(settings, token.strip())
    if admin_auth.session_id(settings, connection.cookies.get(admin_auth.ADMIN_COOKIE)) is not None:
        return True
    browser = read_browser_session(settings.secret_key, connection.cookies.get(COOKIE_NAME))
    return await run_in_threadpool(admin_auth.admin_account, db, browser) is not None


class AdminBeforeUpload:
    """401, with the connection closed, for an upload to ``paths`` without admin
    credentials; everything else passes untouched (plain ASGI)."""

    def __init__(self, app: ASGIApp, settings: Settings, db: Engine, paths: tuple[str, ...] = UPLOAD_PATHS) -> None:
        self.app = app
        self.settings = settings
        self.db = db
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        guarded = scope["type"] == "http" and scope["path"] in self.paths
        if not guarded or await _may_upload(HTTPConnection(scope), self.settings, self.db):
            await self.app(scope, receive, send)
            return
        message = "admin endpoints need `Authorization: Bearer $TUNELOOP_ADMIN_TOKEN`"
        body = json.dumps(error_body(401, message)).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),  # the unread body must not be taken for the next request
        ]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})
