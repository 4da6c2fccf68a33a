"""What users said, on the admin dashboard: the feedback overview (the
dashboard's home), conversations with their feedback and corrections, and the
preference pairs built from it (each one can be excluded from training here).
Their data leaves as files through ``datasets``.

Server-rendered pages that work without JavaScript (forms and links); htmx
upgrades them: filter forms swap only the results and push the URL. Full pages
extend ``admin/base.html``; fragments are ``admin/_name.html``.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timezone

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlmodel import Session, col, func, select

from server import admin_views
from server.deps import AdminPage, AdminRender, SessionDep
from server.errors import ApiError
from server.plots import daily_feedback_chart
from server.rendering import wants_fragment
from server.routes.admin.dashboard import pages_router
from store.pairs import SOURCES
from store.tables import Conversation, Correction, Message

pages = pages_router()

PAIR_EXPORTS = ("trl", "axolotl", "llamafactory")
FILE_FORMATS = ("jsonl", "parquet")


def _today():
    return datetime.now(timezone.utc).date()


def _page_number(value: str | None) -> int:
    return int(value) if value and value.isdigit() and 0 < int(value) < 100_000 else 1


@pages.get("")
def home(admin: AdminPage) -> Response:
    return RedirectResponse("/admin/feedback", status_code=303)


# --- feedback overview -------------------------------------------------------


@pages.get("/feedback", response_class=HTMLResponse)
def feedback_overview(
    request: Request, admin: AdminPage, session: SessionDep, render: AdminRender,
    start: str | None = None, end: str | None = None, tag: str | None = None, adapter: str | None = None,
) -> HTMLResponse:
    filters = admin_views.parse_filters(start, end, tag, adapter, _today())
    stats = admin_views.feedback_stats(session, filters)
    context = {
        "nav": "feedback",
        "filters": filters,
        "stats": stats,
        "corrections": _count_corrections(session, filters),
        "chart": _daily_chart(stats) if stats.ratings else None,
        "adapters": admin_views.adapter_choices(session),
        "file_formats": FILE_FORMATS,
    }
    status = 400 if filters.errors else 200
    if wants_fragment(request, "feedback-results"):
        return render("_feedback_results.html", context, admin, status)
    return render("feedback.html", context, admin, status)


def _count_corrections(session: Session, filters: admin_views.Filters) -> int:
    """Corrections last changed in the filters' date range, of answers by the filtered adapter."""
    query = (
        select(func.count()).select_from(Correction).join(Message, col(Message.id) == Correction.message_id)
        .where(Correction.updated_at >= filters.since, Correction.updated_at < filters.until)
    )
    if filters.adapter:
        query = query.where(Message.adapter_version == filters.adapter_value)
    return session.exec(query).one()


def _daily_chart(stats: admin_views.FeedbackStats):
    days = stats.days
    return daily_feedback_chart([d.day for d in days], [d.up for d in days], [d.down for d in days])


# --- conversations -------------------------------------------------------------


@pages.get("/conversations", response_class=HTMLResponse)
def conversations(
    request: Request, admin: AdminPage, session: SessionDep, render: AdminRender,
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
        return render("_conversation_results.html", context, admin, status)
    return render("conversations.html", context, admin, status)


@pages.get("/conversations/{conversation_id}", response_class=HTMLResponse)
def conversation_view(conversation_id: int, admin: AdminPage, session: SessionDep, render: AdminRender) -> HTMLResponse:
    conversation = session.get(Conversation, conversation_id)
    if conversation is None:
        raise ApiError(404, f"conversation {conversation_id} not found")
    detail = admin_views.conversation_detail(session, conversation)
    return render("conversation.html", {"nav": "conversations", "d": detail,
                                        "corrections": _corrections_of(session, conversation)}, admin)


def _corrections_of(session: Session, conversation: Conversation) -> dict[int, list[Correction]]:
    """The conversation's corrections, by the answer they correct."""
    found: dict[int, list[Correction]] = defaultdict(list)
    for correction in session.exec(
        select(Correction).join(Message, col(Message.id) == Correction.message_id)
        .where(Message.conversation_id == conversation.id).order_by(col(Correction.id))
    ).all():
        found[correction.message_id].append(correction)
    return dict(found)


# --- pairs -------------------------------------------------------------------------


@pages.get("/pairs", response_class=HTMLResponse)
def pairs(
    request: Request, admin: AdminPage, session: SessionDep, render: AdminRender,
    split: str | None = None, source: str | None = None, run: str | None = None, page: str | None = None,
    done: str | None = None,
) -> HTMLResponse:
    split_value = split if split in ("train", "eval") else ""
    run_id = int(run) if run and run.isdigit() else None
    number = _page_number(page)
    rows, has_next = admin_views.pair_rows(session, split_value, (source or "").strip(), run_id, number)
    context = {
        "nav": "pairs", "rows": rows, "page": number, "has_next": has_next,
        "split": split_value, "source": (source or "").strip(), "run_id": run_id,
        "sources": sorted(set(SOURCES) | set(admin_views.pair_sources(session))),
        "pair_exports": PAIR_EXPORTS, "file_formats": FILE_FORMATS,
        "notice": {"kind": "ok", "text": done[:200]} if done else None,
    }
    if wants_fragment(request, "pair-results"):
        return render("_pair_results.html", context, admin)
    return render("pairs.html", context, admin)
