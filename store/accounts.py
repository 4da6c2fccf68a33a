"""Accounts: sign-up under a policy, sign-in, roles, approval, disabling, and
the anonymous identities of visitors who chat without one.

Passwords are hashed with argon2id through ``pwdlib`` (maintained, the hash
FastAPI's own security guide uses); only the hash is stored. Every session
cookie carries the account's ``session_epoch``; raising it (disable, sign out
everywhere) revokes all its sessions at once.

Sign-up policy (``TUNELOOP_SIGNUP``), as Open WebUI does it: the first account
ever becomes an active admin; after that ``open`` activates new accounts,
``approval`` (the default) leaves them pending until an admin approves, and
``closed`` refuses sign-up (admins create accounts with the CLI or dashboard).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from store.errors import Conflict, InvalidInput, NotAllowed, NotFound
from store.tables import User

SIGNUP_POLICIES = ("open", "approval", "closed")
ROLES = ("user", "admin")
USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{2,63}$")
MIN_PASSWORD_CHARS = 8
MAX_PASSWORD_CHARS = 256  # argon2 takes any length; this bounds the work per attempt
WRONG_CREDENTIALS = "wrong username or password"


@lru_cache(maxsize=1)
def _hasher():
    from pwdlib import PasswordHash

    return PasswordHash.recommended()


@lru_cache(maxsize=1)
def _dummy_hash() -> str:
    return _hasher().hash("not a password anyone has")


def hash_password(password: str) -> str:
    return _hasher().hash(password)


def check_username(username: str) -> str:
    username = username.strip()
    if not USERNAME.match(username):
        raise InvalidInput(
            "a username has 3 to 64 characters: letters, digits, and . _ - (not first)", "username"
        )
    return username


def check_password(password: str) -> str:
    if not MIN_PASSWORD_CHARS <= len(password) <= MAX_PASSWORD_CHARS:
        raise InvalidInput(
            f"a password has {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS} characters", "password"
        )
    return password


def account_by_name(session: Session, username: str) -> User | None:
    return session.exec(select(User).where(User.username == username.strip())).first()


def find_account(session: Session, name_or_id: str | int) -> User:
    """An account by username or numeric id; NotFound otherwise."""
    user = None
    if isinstance(name_or_id, int) or str(name_or_id).isdigit():
        user = session.get(User, int(name_or_id))
        user = user if user is not None and user.kind == "account" else None
    if user is None and isinstance(name_or_id, str):
        user = account_by_name(session, name_or_id)
    if user is None:
        raise NotFound(f"there is no account {name_or_id!r}; `tuneloop users list` shows them")
    return user


def has_admin(session: Session) -> bool:
    return session.exec(
        select(User.id).where(User.kind == "account", User.role == "admin", User.status == "active")
    ).first() is not None


def create_account(
    session: Session, username: str, password: str, *, admin: bool = False, status: str = "active"
) -> User:
    """A new account (the CLI and the dashboard create active ones). Raises
    InvalidInput for a bad name or password, Conflict if the name is taken."""
    username = check_username(username)
    check_password(password)
    if account_by_name(session, username) is not None:
        raise Conflict(f"the username {username!r} is taken; choose another", "username")
    user = User(
        kind="account", name=username, username=username, password_hash=hash_password(password),
        role="admin" if admin else "user", status=status,
    )
    session.add(user)
    session.flush()
    return user


def sign_up(session: Session, username: str, password: str, policy: str) -> User:
    """Self-service sign-up under ``policy``: the first account becomes an active
    admin; later ones are active (``open``), pending (``approval``) or refused
    (``closed``, NotAllowed)."""
    if policy not in SIGNUP_POLICIES:
        raise InvalidInput(f"unknown sign-up policy {policy!r}; use one of {', '.join(SIGNUP_POLICIES)}")
    if not has_admin(session):
        return create_account(session, username, password, admin=True)
    if policy == "closed":
        raise NotAllowed("sign-up is closed here; ask an administrator for an account")
    return create_account(session, username, password, status="active" if policy == "open" else "pending")


def authenticate(session: Session, username: str, password: str) -> User:
    """The account these credentials open. NotAllowed with one message for a
    wrong name or password (a hash is checked either way, so the time does not
    tell which), and a clear one for a pending or disabled account."""
    user = account_by_name(session, username) if len(password) <= MAX_PASSWORD_CHARS else None
    hashed = user.password_hash if user is not None and user.password_hash else _dummy_hash()
    valid = _hasher().verify(password[:MAX_PASSWORD_CHARS], hashed)
    if user is None or not valid:
        raise NotAllowed(WRONG_CREDENTIALS)
    if user.status == "pending":
        raise NotAllowed("your account is waiting for an administrator's approval")
    if user.status == "disabled":
        raise NotAllowed("this account is disabled; ask an administrator")
    return user


def set_password(session: Session, user: User, password: str) -> None:
    """New password; every other session of the account is signed out."""
    user.password_hash = hash_password(check_password(password))
    revoke_sessions(session, user)


def revoke_sessions(session: Session, user: User) -> None:
    user.session_epoch += 1
    session.add(user)
    session.flush()


def set_status(session: Session, user: User, status: str) -> User:
    """Approve (``active``) or disable an account. Disabling signs it out
    everywhere; the last active admin cannot be disabled."""
    if status not in ("active", "disabled"):
        raise InvalidInput("status must be active or disabled", "status")
    if status == "disabled" and user.role == "admin" and _active_admins(session) <= 1 and user.status == "active":
        raise Conflict("this is the last active admin; make another account admin first")
    user.status = status
    session.add(user)
    if status == "disabled":
        revoke_sessions(session, user)
    session.flush()
    return user


def set_role(session: Session, user: User, role: str) -> User:
    if role not in ROLES:
        raise InvalidInput("role must be user or admin", "role")
    if role == "user" and user.role == "admin" and _active_admins(session) <= 1:
        raise Conflict("this is the last active admin; make another account admin first")
    user.role = role
    session.add(user)
    session.flush()
    return user


def _active_admins(session: Session) -> int:
    return len(session.exec(
        select(User.id).where(User.kind == "account", User.role == "admin", User.status == "active")
    ).all())


def list_accounts(session: Session) -> Sequence[User]:
    return session.exec(select(User).where(User.kind == "account").order_by(col(User.id))).all()


PROXY_USERNAME = re.compile(r"^[^\s\x00-\x1f]{1,64}$")


def proxy_account(session: Session, username: str) -> User:
    """The account a trusted reverse proxy's user header names (single sign-on):
    the proxy has authenticated the person, so an account seen for the first
    time is created active with role ``user`` and no password (admins promote
    it). E-mail addresses are accepted as names. NotAllowed for a pending or
    disabled account, InvalidInput for a name no account can have."""
    username = username.strip()
    if not PROXY_USERNAME.match(username):
        raise InvalidInput("the single sign-on user name is empty, too long (64) or has spaces", "username")
    user = account_by_name(session, username)
    if user is None:
        try:
            with session.begin_nested():  # two first requests at once: the second finds the first's row
                user = User(kind="account", name=username, username=username, role="user", status="active")
                session.add(user)
        except IntegrityError:
            user = account_by_name(session, username)
            assert user is not None
    if user.status == "pending":
        raise NotAllowed("your account is waiting for an administrator's approval")
    if user.status == "disabled":
        raise NotAllowed("this account is disabled; ask an administrator")
    return user


def new_anonymous_identity(session: Session) -> User:
    """The identity of a visitor without an account, created on their first action."""
    user = User(kind="browser")
    session.add(user)
    session.flush()
    return user


def signed_in_account(session: Session, user_id: int | None, epoch: int) -> User | None:
    """The account a session cookie (``user_id``, ``epoch``) is signed in as,
    or None: no such account, an anonymous identity, or a revoked session."""
    user = session.get(User, user_id) if user_id is not None else None
    return user if user is not None and user.kind == "account" and session_valid(user, epoch) else None


def session_valid(user: User | None, epoch: int) -> bool:
    """A session cookie (``epoch``) still opens ``user``: not revoked, not disabled."""
    if user is None:
        return False
    if user.kind == "account":
        return user.status == "active" and user.session_epoch == epoch
    return user.status != "disabled"
