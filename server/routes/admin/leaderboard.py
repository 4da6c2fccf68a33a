"""The leaderboard: every version ever served (the base model included),
ranked by a Bradley–Terry fit on the A/B votes between answers of different
versions, with bootstrap intervals, the position and length terms, each
version's thumbs-up rate and a chart of the scores as the votes came in. The
statistics live in ``store.leaderboard``; this module only serves them.

JSON: ``GET /api/admin/leaderboard``. Dashboard: ``/admin/leaderboard``.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import HTMLResponse

from server.deps import AdminDep, AdminPage, AdminRender, SessionDep
from server.plots import leaderboard_chart
from server.routes.admin.dashboard import api_router, pages_router
from store.leaderboard import ANCHOR_SCORE, LEVEL, leaderboard

api = api_router()
pages = pages_router()


@api.get("/leaderboard")
def leaderboard_json(_: AdminDep, session: SessionDep) -> dict[str, Any]:
    """Versions in rank order (unscored ones last, with a ``note``), the
    position and length terms, and ``history``: the scores refitted as the
    votes accumulate. Scores are Elo-like: base = 1000 (see ``anchor``)."""
    return leaderboard(session).to_json()


@pages.get("/leaderboard", response_class=HTMLResponse)
def leaderboard_page(admin: AdminPage, session: SessionDep, render: AdminRender) -> HTMLResponse:
    board = leaderboard(session)
    context = {
        "nav": "leaderboard", "board": board, "level": LEVEL, "anchor_score": ANCHOR_SCORE,
        "chart": leaderboard_chart(board.history, ANCHOR_SCORE),
    }
    return render("leaderboard.html", context, admin)
