"""API keys on the admin dashboard: list, create (the key is shown once, only
its SHA-256 is stored) and revoke. The CLI does the same (``tuneloop keys``);
there is no JSON API for keys.

Revoking asks first: htmx shows ``hx-confirm``; without JavaScript the button
leads to a confirmation page whose form does the POST.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlmodel import Session, col, select

from server.deps import AdminPage, AdminRender, AdminSession, ApiKeyCacheDep, SessionDep
from server.errors import ApiError
from server.identity import create_api_key, revoke_api_key
from server.rendering import is_htmx
from server.routes.admin.dashboard import pages_router
from store import accounts
from store.errors import StoreError
from store.tables import ApiKey, User

pages = pages_router()


def _keys_context(session: Session, notice: dict | None = None, new_key: str | None = None) -> dict:
    keys = session.exec(select(ApiKey).order_by(col(ApiKey.id).desc())).all()
    owners = {k.id: session.get(User, k.user_id) for k in keys}
    acts_as = {k.id: owners[k.id].username if owners[k.id] and owners[k.id].kind == "account" else None for k in keys}
    return {"nav": "keys", "keys": keys, "acts_as": acts_as, "notice": notice, "new_key": new_key}


def _keys_answer(
    request: Request, render: Callable[..., HTMLResponse], admin: AdminSession, session: Session,
    status: int = 200, **context,
) -> Response:
    name = "_keys.html" if is_htmx(request) else "keys.html"
    return render(name, _keys_context(session, **context), admin, status=status)


@pages.get("/keys", response_class=HTMLResponse)
def keys_page(admin: AdminPage, session: SessionDep, render: AdminRender, revoked: str | None = None) -> HTMLResponse:
    notice = {"kind": "ok", "text": f"Key {revoked} is revoked."} if revoked and revoked.isdigit() else None
    return render("keys.html", _keys_context(session, notice), admin)


@pages.post("/keys")
def create_key(
    request: Request, admin: AdminPage, session: SessionDep, render: AdminRender,
    name: Annotated[str, Form(max_length=200)] = "",
    account: Annotated[str, Form(max_length=200)] = "",
) -> Response:
    """Create a key and show it once (never stored, only its SHA-256); with an
    account's username, the key acts as that account."""
    if not name.strip():
        notice = {"kind": "error", "text": "Give the key a name (who or what will use it), then create it."}
        return _keys_answer(request, render, admin, session, status=400, notice=notice)
    owner = None
    if account.strip():
        try:
            owner = accounts.find_account(session, account.strip())
        except StoreError as exc:
            return _keys_answer(request, render, admin, session, status=400, notice={"kind": "error", "text": str(exc)})
    row, key = create_api_key(session, name, owner)
    session.commit()
    notice = {"kind": "ok", "text": f"Key “{row.name}” created. Copy it now: it is shown only this once."}
    return _keys_answer(request, render, admin, session, status=201, notice=notice, new_key=key)


def _key_or_404(session: Session, key_id: int) -> ApiKey:
    row = session.get(ApiKey, key_id)
    if row is None:
        raise ApiError(404, f"there is no API key {key_id}; the keys page lists them")
    return row


@pages.get("/keys/{key_id}/revoke", response_class=HTMLResponse)
def confirm_revoke(key_id: int, admin: AdminPage, session: SessionDep, render: AdminRender) -> HTMLResponse:
    row = _key_or_404(session, key_id)
    return render("confirm.html", {
        "nav": "keys", "title": f"Revoke key “{row.name}”?",
        "text": f"Clients using {row.prefix}… get 401 from now on. This cannot be undone; create a new key instead.",
        "action": f"/admin/keys/{row.id}/revoke", "button": "Revoke key", "cancel": "/admin/keys",
    }, admin)


@pages.post("/keys/{key_id}/revoke")
def revoke_key(
    key_id: int, request: Request, admin: AdminPage, session: SessionDep, render: AdminRender,
    api_key_cache: ApiKeyCacheDep,
) -> Response:
    row = _key_or_404(session, key_id)
    if row.revoked_at is not None:
        notice = {"kind": "error", "text": f"Key “{row.name}” was already revoked."}
        return _keys_answer(request, render, admin, session, status=409, notice=notice)
    revoke_api_key(session, str(key_id))
    session.commit()
    api_key_cache.forget_user(row.user_id)
    if not is_htmx(request):
        return RedirectResponse(f"/admin/keys?revoked={key_id}", status_code=303)
    return _keys_answer(request, render, admin, session, notice={"kind": "ok", "text": f"Key “{row.name}” is revoked."})
