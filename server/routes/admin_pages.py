"""The admin dashboard for product teams, part 1: sign in and out, the
feedback overview, conversations with their feedback, and preference pairs.
Training runs, adapters and API keys are in ``server.routes.admin_ops``.

Server-rendered pages that work without JavaScript (forms and links); htmx
upgrades them: filter forms swap only the results and push the URL. Full pages
extend ``admin/base.html``; fragments are ``admin/_name.html``.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from server import admin_auth, admin_views
from server.deps import SessionDep, SettingsDep
from server.errors import ApiError
from server.plots import daily_feedback_chart
from server.routes.admin_session import AdminPage, AdminRoute, render, safe_next, wants_fragment
from store.tables import Conversation

router = APIRouter(prefix="/admin", tags=["admin pages"], include_in_schema=False, route_class=AdminRoute)

PAIR_EXPORTS = ("trl", "axolotl", "llamafactory")
FILE_FORMATS = ("jsonl", "parquet")


def _today():
    return datetime.now(timezone.utc).date()


def _page_number(value: str | None) -> int:
    return int(value) if value and value.isdigit() and 0 < int(value) < 100_000 else 1


# --- sign in / out ---------------------------------------------------------


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, settings: SettingsDep, next: str | None = None) -> Response:
    if admin_auth.session_id(settings, request.cookies.get(admin_auth.ADMIN_COOKIE)) is not None:
        return RedirectResponse(safe_next(next), status_code=303)
    return render(request, "login.html", {"next": safe_next(next), "error": None}, None)


@router.post("/login", response_class=HTMLResponse)
def login(
    request: Request, settings: SettingsDep,
    token: Annotated[str, Form(max_length=1000)] = "",
    next: Annotated[str, Form(max_length=2000)] = "/admin",
) -> Response:
    if not token.strip() or not admin_auth.token_matches(settings, token.strip()):
        error = (
            "Enter the admin token." if not token.strip()
            else "That is not the admin token. Use the value of TUNELOOP_ADMIN_TOKEN on the server and try again."
        )
        return render(request, "login.html", {"next": safe_next(next), "error": error}, None, status=401)
    response = RedirectResponse(safe_next(next), status_code=303)
    response.headers.append("set-cookie", admin_auth.cookie_header(settings, admin_auth.sign_session(settings)))
    return response


@router.post("/logout")
def logout(admin: AdminPage, settings: SettingsDep) -> Response:
    response = RedirectResponse("/admin/login", status_code=303)
    response.headers.append("set-cookie", admin_auth.clear_cookie_header(settings))
    return response


@router.get("")
def home(admin: AdminPage) -> Response:
    return RedirectResponse("/admin/feedback", status_code=303)


# --- feedback overview -------------------------------------------------------


@router.get("/feedback", response_class=HTMLResponse)
def feedback_overview(
    request: Request, admin: AdminPage, session: SessionDep,
    start: str | None = None, end: str | None = None, tag: str | None = None, adapter: str | None = None,
) -> HTMLResponse:
    filters = admin_views.parse_filters(start, end, tag, adapter, _today())
    stats = admin_views.feedback_stats(session, filters)
    context = {
        "nav": "feedback",
        "filters": filters,
        "stats": stats,
        "chart": _daily_chart(stats) if stats.ratings else None,
        "adapters": admin_views.adapter_choices(session),
        "file_formats": FILE_FORMATS,
    }
    status = 400 if filters.errors else 200
    if wants_fragment(request, "feedback-results"):
        return render(request, "_feedback_results.html", context, admin, status)
    return render(request, "feedback.html", context, admin, status)


def _daily_chart(stats: admin_views.FeedbackStats):
    days = stats.days
    return daily_feedback_chart([d.day for d in days], [d.up for d in days], [d.down for d in days])


# --- conversations -------------------------------------------------------------


@router.get("/conversations", response_class=HTMLResponse)
def conversations(
    request: Request, admin: AdminPage, session: SessionDep,
    start: str | None = None, end: str | None = None, tag: str | None = None, adapter: str | None = None,
    rated: str | None = None, page: str | None = None,
) -> HTMLResponse:
    filters = admin_views.parse_filters(start, end, tag, adapter, _today())
    number = _page_number(page)
    rated_only = rated in ("1", "on", "true")
    rows, has_next = admin_views.conversation_summaries(session, filters, rated_only, number)
    context = {
        "nav": "conversations", "filters": filters, "rows": rows, "page": number, "has_next": has_next,
        "rated": rated_only, "rated_param": "1" if rated_only else None,
        "adapters": admin_views.adapter_choices(session),
    }
    status = 400 if filters.errors else 200
    if wants_fragment(request, "conversation-results"):
        return render(request, "_conversation_results.html", context, admin, status)
    return render(request, "conversations.html", context, admin, status)


@router.get("/conversations/{conversation_id}", response_class=HTMLResponse)
def conversation_view(conversation_id: int, request: Request, admin: AdminPage, session: SessionDep) -> HTMLResponse:
    conversation = session.get(Conversation, conversation_id)
    if conversation is None:
        raise ApiError(404, f"conversation {conversation_id} not found")
    detail = admin_views.conversation_detail(session, conversation)
    return render(request, "conversation.html", {"nav": "conversations", "d": detail}, admin)


# --- pairs -------------------------------------------------------------------------


@router.get("/pairs", response_class=HTMLResponse)
def pairs(
    request: Request, admin: AdminPage, session: SessionDep,
    split: str | None = None, source: str | None = None, run: str | None = None, page: str | None = None,
) -> HTMLResponse:
    split_value = split if split in ("train", "eval") else ""
    run_id = int(run) if run and run.isdigit() else None
    number = _page_number(page)
    rows, has_next = admin_views.pair_rows(session, split_value, (source or "").strip(), run_id, number)
    context = {
        "nav": "pairs", "rows": rows, "page": number, "has_next": has_next,
        "split": split_value, "source": (source or "").strip(), "run_id": run_id,
        "sources": admin_views.pair_sources(session),
        "pair_exports": PAIR_EXPORTS, "file_formats": FILE_FORMATS,
    }
    if wants_fragment(request, "pair-results"):
        return render(request, "_pair_results.html", context, admin)
    return render(request, "pairs.html", context, admin)
