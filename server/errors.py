"""Errors as clients see them: always JSON (or an HTML fragment for pages),
always saying what was wrong and what to do; never a bare 500.

Shape (the OpenAI one, so OpenAI clients surface the message)::

    {"error": {"message": "messages.0.content: ...", "type": "invalid_request_error",
               "param": "messages.0.content", "code": 422}}
"""

from __future__ import annotations

import logging
import traceback
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pydantic
import sqlalchemy
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from sqlalchemy.exc import DataError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.engine.base import EngineUnavailable
from server.rate_limit import RateLimited
from store import errors as store_errors

log = logging.getLogger("tuneloop.errors")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "request_timeout",
    409: "conflict_error",
    413: "request_too_large",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


# Each store error class has one status; a status is never chosen by message text.
STORE_ERROR_STATUS: dict[type[store_errors.StoreError], int] = {
    store_errors.InvalidInput: 400,
    store_errors.LimitExceeded: 400,
    store_errors.NotFound: 404,
    store_errors.UnknownAdapterVersion: 404,
    store_errors.Conflict: 409,
    store_errors.VersionNotServable: 409,
    store_errors.NotAllowed: 403,
    store_errors.NotStored: 503,
}


def store_error_status(exc: store_errors.StoreError) -> int:
    for cls in type(exc).__mro__:
        if cls in STORE_ERROR_STATUS:
            return STORE_ERROR_STATUS[cls]
    return 400


class ApiError(Exception):
    """An error meant for the client: status code, message, optional field name."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


class SignInRequired(ApiError):
    """Only signed-in users may do this: a page view is sent to the sign-in
    page (and back afterwards), anything else gets 401."""

    def __init__(self, message: str) -> None:
        super().__init__(401, message)


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "error"),
            "param": param,
            "code": status,
        }
    }


def _wants_html(request: Request) -> bool:
    path = request.url.path
    if path.startswith(("/api/", "/v1/", "/healthz", "/metrics")):
        return False
    return "text/html" in request.headers.get("accept", "") or "HX-Request" in request.headers


def error_response(
    request: Request, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None
):
    if status == 503:
        headers = {"Retry-After": "10", **(headers or {})}
    if _wants_html(request):
        fragment = f'<div class="error" role="alert"><strong>Error {status}:</strong> {escape(message)}</div>'
        # htmx does not swap 4xx/5xx by default; the page's script shows it in the error bar.
        return HTMLResponse(fragment, status_code=status, headers=headers)
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


def _describe_validation(exc: RequestValidationError | pydantic.ValidationError) -> tuple[str, str | None]:
    parts = []
    first_param = None
    for err in exc.errors()[:5]:
        if err.get("type") == "json_invalid":
            position = err.get("loc", ("body", "?"))[-1]
            reason = (err.get("ctx") or {}).get("error", "syntax error")
            parts.append(f"the body is not valid JSON ({reason} at character {position})")
            continue
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
        where = ".".join(loc) or "body"
        first_param = first_param or where
        parts.append(f"{where}: {err.get('msg', 'invalid value')}")
    return "; ".join(parts) or "invalid request", first_param


# SQLSTATE class 22 "data exception", code 22003: a number out of the column type's range
_NUMERIC_OUT_OF_RANGE = "22003"
_SQLALCHEMY_DIR = Path(sqlalchemy.__file__).parent


def _driver_overflow(exc: OverflowError) -> bool:
    """Whether the driver raised it binding a parameter: sqlite3 refuses ints
    beyond 64 bits with a bare OverflowError, raised from SQLAlchemy's execute."""
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and Path(frames[-1].filename).is_relative_to(_SQLALCHEMY_DIR)


def _out_of_range(request: Request, reason: str):
    """A number beyond the database's integer range: no row can have it, so an id
    in the path is a 404 like any other missing id; elsewhere the request is wrong."""
    ids = [str(value) for value in request.path_params.values() if str(value).lstrip("-").isdigit()]
    if ids:
        return error_response(request, 404, f"nothing has id {ids[0]}: it is beyond the database's range")
    return error_response(
        request, 400, f"a number in the request is beyond the database's range ({reason}); use a smaller one"
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(request, exc.status, exc.message, exc.param)

    @app.exception_handler(SignInRequired)
    async def _sign_in_required(request: Request, exc: SignInRequired):
        page_view = request.method == "GET" and not request.url.path.startswith(("/api/", "/v1/"))
        if page_view and "HX-Request" not in request.headers:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)
        return error_response(request, exc.status, exc.message, exc.param)

    @app.exception_handler(store_errors.StoreError)
    async def _store_error(request: Request, exc: store_errors.StoreError):
        return error_response(request, store_error_status(exc), exc.message, exc.field)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and message == "Not Found":
            message = f"nothing at {request.method} {request.url.path}"
        if exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return error_response(request, exc.status_code, message)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        message, param = _describe_validation(exc)
        return error_response(request, 422, message, param)

    @app.exception_handler(pydantic.ValidationError)
    async def _handler_validation_error(request: Request, exc: pydantic.ValidationError):
        message, param = _describe_validation(exc)  # a shape a handler built from form fields
        return error_response(request, 422, message, param)

    @app.exception_handler(DataError)
    async def _value_refused_by_database(request: Request, exc: DataError):
        reason = str(exc.orig).splitlines()[0] if exc.orig else "invalid value"
        if getattr(exc.orig, "sqlstate", None) == _NUMERIC_OUT_OF_RANGE:
            return _out_of_range(request, reason)
        return error_response(
            request, 400, f"the database cannot store a value of this request ({reason}); nothing was saved, "
            "correct the value and send it again",
        )

    @app.exception_handler(OverflowError)
    async def _overflow(request: Request, exc: OverflowError):
        if not _driver_overflow(exc):
            raise exc  # a bug, not a request: the 500 handler logs it
        return _out_of_range(request, str(exc))

    @app.exception_handler(RateLimited)
    async def _rate_limited(request: Request, exc: RateLimited):
        return error_response(request, 429, exc.message, headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(EngineUnavailable)
    async def _engine_unavailable(request: Request, exc: EngineUnavailable):
        return error_response(
            request, 503, f"the model engine is not available right now ({exc}); retry shortly"
        )

    @app.exception_handler(OperationalError)
    async def _database_unavailable(request: Request, exc: OperationalError):
        log.warning("database error on %s %s: %s", request.method, request.url.path, exc.orig)
        return error_response(
            request, 503,
            f"the database could not take the write ({exc.orig}); nothing was saved, retry shortly",
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(request, 500, "internal error; it has been logged")
