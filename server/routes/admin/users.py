"""Who the model learns from, on the dashboard and the JSON API: accounts
(approve, disable, make admin, sign out everywhere, create), the identities
that gave the most feedback (anonymous and API ones included, to spot a
flood), and exclusion from training of a user, a conversation, a message or a
pair. A user's row says which adapter versions their feedback reached, so an
admin who excludes someone knows what to roll back (the adapters page does it).

The CLI does the same: ``tuneloop users ...`` and ``tuneloop exclude ...``.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import quote

from fastapi import Form
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel, Field
from sqlalchemy import func
from sqlmodel import Session, select

from server.deps import AdminDep, AdminPage, AdminRender, ApiKeyCacheDep, SessionDep, SettingsDep
from server.errors import ApiError
from server.routes.admin.dashboard import api_router, pages_router, safe_next
from store import accounts, exclusions
from store.errors import StoreError
from store.settings import Settings
from store.tables import PreferencePair, User

api = api_router()
pages = pages_router()

TOP_IDENTITIES = 20


def _pair_counts(session: Session) -> dict[int, int]:
    rows = session.exec(select(PreferencePair.user_id, func.count()).group_by(PreferencePair.user_id)).all()
    return {user_id: count for user_id, count in rows}


def _user_view(session: Session, user: User, pairs: int) -> dict:
    return {
        "id": user.id, "kind": user.kind, "username": user.username, "name": user.name, "role": user.role,
        "status": user.status, "excluded_from_training": user.excluded_from_training,
        "created_at": user.created_at.isoformat(), "pairs": pairs,
        "adapters_reached": exclusions.adapters_reached(session, user.id) if pairs else [],
    }


def _users_context(session: Session, settings: Settings, notice: dict | None = None) -> dict:
    pairs = _pair_counts(session)
    account_rows = [_user_view(session, u, pairs.get(u.id, 0)) for u in accounts.list_accounts(session)]
    busiest = sorted(((n, uid) for uid, n in pairs.items()), reverse=True)[:TOP_IDENTITIES]
    identities = [_user_view(session, user, n) for n, uid in busiest if (user := session.get(User, uid))]
    anonymous = session.exec(select(func.count()).select_from(User).where(User.kind == "browser")).one()
    return {
        "nav": "users", "accounts": account_rows, "identities": identities, "anonymous_count": anonymous,
        "train_on_anonymous": settings.train_on_anonymous, "signup": settings.signup, "notice": notice,
    }


@pages.get("/users", response_class=HTMLResponse)
def users_page(admin: AdminPage, session: SessionDep, settings: SettingsDep, render: AdminRender,
               done: str | None = None) -> HTMLResponse:
    notice = {"kind": "ok", "text": done[:200]} if done else None
    return render("users.html", _users_context(session, settings, notice), admin)


def _account(session: Session, user_id: int) -> User:
    user = session.get(User, user_id)
    if user is None or user.kind != "account":
        raise ApiError(404, f"there is no account {user_id}; the users page lists them")
    return user


def _done(text: str, back: str = "/admin/users") -> Response:
    return RedirectResponse(f"{safe_next(back)}{'&' if '?' in back else '?'}done={quote(text)}", status_code=303)


Choice = Annotated[str, Form(max_length=16)]


@pages.post("/users/{user_id}/status")
def set_status(
    user_id: int, admin: AdminPage, session: SessionDep, api_key_cache: ApiKeyCacheDep, status: Choice = ""
) -> Response:
    user = _account(session, user_id)
    accounts.set_status(session, user, status)
    session.commit()
    api_key_cache.forget_user(user.id)  # its keys stop with the account, not a cache period later
    verb = "approved and active" if status == "active" else "disabled and signed out everywhere"
    return _done(f"{user.username} is {verb}.")


@pages.post("/users/{user_id}/role")
def set_role(user_id: int, admin: AdminPage, session: SessionDep, role: Choice = "") -> Response:
    user = _account(session, user_id)
    accounts.set_role(session, user, role)
    session.commit()
    return _done(f"{user.username} is now {'an admin' if role == 'admin' else 'a user'}.")


@pages.post("/users/{user_id}/signout")
def sign_out_everywhere(user_id: int, admin: AdminPage, session: SessionDep) -> Response:
    user = _account(session, user_id)
    accounts.revoke_sessions(session, user)
    session.commit()
    return _done(f"{user.username} is signed out on every browser (API keys still work; revoke them on the keys page).")


@pages.post("/users")
def create_account(
    admin: AdminPage, session: SessionDep, settings: SettingsDep, render: AdminRender,
    username: Annotated[str, Form(max_length=200)] = "",
    password: Annotated[str, Form(max_length=accounts.MAX_PASSWORD_CHARS + 1)] = "",
    role: Choice = "user",
) -> Response:
    try:
        user = accounts.create_account(session, username, password, admin=role == "admin")
        session.commit()
    except StoreError as exc:
        session.rollback()
        notice = {"kind": "error", "text": str(exc)}
        return render("users.html", _users_context(session, settings, notice), admin, status=400)
    return _done(f"Account {user.username} created ({user.role}).")


@pages.post("/exclusions")
def exclude(
    admin: AdminPage, session: SessionDep,
    kind: Annotated[str, Form(max_length=16)] = "", id: Annotated[int, Form()] = 0,
    excluded: Annotated[bool, Form()] = True, back: Annotated[str, Form(max_length=2000)] = "/admin/users",
) -> Response:
    """Exclude (or include again) a user, conversation, message or pair; back to the page it was sent from."""
    exclusions.set_excluded(session, kind, id, excluded)
    session.commit()
    reached = exclusions.adapters_reached(session, id) if kind == "user" and excluded else []
    text = f"{kind} {id} is {'excluded from' if excluded else 'included in'} training from the next run on."
    if reached:
        text += f" Their feedback already reached {', '.join(reached)}: roll back on the adapters page if needed."
    return _done(text, back)


# --- JSON API ----------------------------------------------------------------


class ExclusionIn(BaseModel):
    kind: str = Field(max_length=16, description="user | conversation | message | pair")
    id: int = Field(ge=1, le=2**63 - 1)
    excluded: bool = True


@api.get("/users")
def list_users(_: AdminDep, session: SessionDep, settings: SettingsDep) -> dict:
    """Accounts and the identities with the most feedback, with the adapters each reached."""
    context = _users_context(session, settings)
    return {key: context[key] for key in ("accounts", "identities", "anonymous_count", "train_on_anonymous")}


@api.post("/exclusions")
def set_exclusion(body: ExclusionIn, _: AdminDep, session: SessionDep) -> dict:
    exclusions.set_excluded(session, body.kind, body.id, body.excluded)
    session.commit()
    reached = exclusions.adapters_reached(session, body.id) if body.kind == "user" else []
    return {"kind": body.kind, "id": body.id, "excluded": body.excluded, "adapters_reached": reached}
