"""Users decide: the online canary and the post-promotion watch.

**Canary.** With ``TUNELOOP_CANARY`` on, a candidate that passes the offline
gate (``trainer.evaluate.gate``) does not become active: it becomes the
``canary``. Every server serves it beside the active version
(``ChatEngine.serve_beside``), and a share of chat turns
(``TUNELOOP_CANARY_AB_RATE``) become blind A/B turns of the two, sides at
random and the same sampling for both. Each decided vote scores the canary:
1 a win, 0 a loss, 0.5 a tie or "both bad". An always-valid sequential test
(``store.sequential``) looks after every vote and promotes the canary once it
is shown not worse than the active version by more than
``TUNELOOP_CANARY_MARGIN`` (or shown better, with
``TUNELOOP_CANARY_REQUIRE_BETTER``), rejects it once it is shown worse, and
otherwise waits; at ``TUNELOOP_CANARY_MAX_VOTES`` votes or
``TUNELOOP_CANARY_MAX_HOURS`` it ends with ``TUNELOOP_CANARY_DEFAULT``
(``reject``: the active version keeps serving). An admin can end it by hand
either way. The votes are ordinary feedback too: they become training pairs.

**Watch.** A version made active by the loop (the canary's or the gate's
promotion) is watched for its first ``TUNELOOP_WATCH_ANSWERS`` rated answers
(at most ``TUNELOOP_WATCH_HOURS``): its thumbs-up rate against the previous
version's (the previous version's last rated answers, a fixed baseline), and,
when the previous version is an adapter, its A/B record against it (served
beside, as a canary is). A drop shown by the same kind of test rolls it back
automatically, with the reason kept on the version; a version is rolled back
automatically at most once (it becomes ``rolled_back``, which nothing
re-activates but an admin).

**Trust.** Only the votes and thumbs of identities allowed to train count
(``store.selection``'s rules: not excluded, not disabled, anonymous only with
``TUNELOOP_TRAIN_ON_ANONYMOUS``), and at most ``TUNELOOP_CANARY_VOTES_PER_USER``
of each user's, the first ones: no single user decides a promotion or a
rollback.

The state lives on the version row (``metrics["canary"]``, ``metrics["watch"]``)
and the run that made it. :func:`referee` runs in every server every
``TUNELOOP_CANARY_CHECK_SECONDS``; each decision locks the active row first,
so two servers never decide the same canary twice.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.engine import Engine
from sqlalchemy.orm import aliased
from sqlmodel import Session, col, select

from store.adapter_signal import signal_change
from store.db import session_scope
from store.errors import Conflict
from store.registry import BASE, activate, active_version, get_version, rollback
from store.sequential import CanaryVerdict, RateDropVerdict, canary_verdict, rate_drop_verdict
from store.settings import Settings
from store.tables import (
    AdapterVersion,
    Comparison,
    Conversation,
    Feedback,
    Message,
    TrainingRun,
    User,
    as_utc,
    utcnow,
)

log = logging.getLogger("tuneloop.canary")

CANARY = "canary"
WIN, LOSS, NO_PREFERENCE = 1.0, 0.0, 0.5


def canary_version(session: Session) -> AdapterVersion | None:
    """The version on trial as the canary, if any (at most one)."""
    return session.exec(
        select(AdapterVersion).where(AdapterVersion.status == CANARY).order_by(col(AdapterVersion.version).desc())
    ).first()


def start_canary(session: Session, row: AdapterVersion, compared_with: str) -> None:
    """``row`` passed the offline gate against ``compared_with`` (the active
    version's name, or ``base``): users judge it now. Servers are signalled (they
    serve it beside the active version). The caller commits."""
    row.status = CANARY
    _set_state(row, CANARY, {"status": "running", "started_at": utcnow().isoformat(), "compared_with": compared_with})
    session.add(row)
    session.flush()
    signal_change(session)


def beside_version(session: Session, active: AdapterVersion | None) -> tuple[AdapterVersion, str] | None:
    """The version every server serves beside the active one, for A/B turns of
    the two, and why: ``"canary"``, or ``"watch"`` -- during the watch of
    ``active``, the version it replaced (when that one is an adapter)."""
    canary = canary_version(session)
    if canary is not None:
        return canary, CANARY
    watch = _watching(active)
    if watch is None or watch["previous"] == BASE:
        return None
    previous = session.exec(
        select(AdapterVersion).where(AdapterVersion.version == int(watch["previous"][1:]))
    ).first()
    return (previous, "watch") if previous is not None else None


# -- votes -------------------------------------------------------------------


def duel_votes(
    session: Session, challenger: str, incumbent: str, since: datetime, settings: Settings
) -> list[float]:
    """The decided A/B votes between versions ``challenger`` and ``incumbent``
    (names; ``base`` for no adapter) made since ``since``, oldest first, scored
    for the challenger (1 win, 0 loss, 0.5 tie or both bad); trusted voters
    only, each user's first ``TUNELOOP_CANARY_VOTES_PER_USER``."""
    side_a, side_b = aliased(Message), aliased(Message)
    rows = session.exec(
        select(Comparison.user_id, Comparison.winner, side_a.adapter_version, side_b.adapter_version)
        .join(side_a, side_a.id == Comparison.message_a_id)
        .join(side_b, side_b.id == Comparison.message_b_id)
        .join(User, User.id == Comparison.user_id)
        .join(Conversation, Conversation.id == Comparison.conversation_id)
        .where(
            col(Comparison.winner).is_not(None), col(Comparison.decided_at) >= since,
            side_a.status == "complete", side_b.status == "complete",
            *_trusted(settings), Conversation.excluded_from_training == False,  # noqa: E712
        )
        .order_by(col(Comparison.decided_at), col(Comparison.id))
    ).all()
    scored = []
    for user_id, winner, version_a, version_b in rows:
        sides = {"a": version_a or BASE, "b": version_b or BASE}
        if set(sides.values()) != {challenger, incumbent}:
            continue  # an ordinary A/B turn (two samples of one version), or other versions
        score = (WIN if sides[winner] == challenger else LOSS) if winner in ("a", "b") else NO_PREFERENCE
        scored.append((user_id, score))
    return _first_per_user(scored, settings.canary_votes_per_user)


def thumbs(session: Session, version: str, settings: Settings, since: datetime | None = None,
           newest: int | None = None) -> list[float]:
    """Thumbs on answers of ``version`` (1 up, 0 down), oldest first: those given
    since ``since``, or the ``newest`` ones; trusted users only, each user's
    first ``TUNELOOP_CANARY_VOTES_PER_USER`` (of those)."""
    produced_by = Message.adapter_version.is_(None) if version == BASE else Message.adapter_version == version
    query = (
        select(Feedback.user_id, Feedback.rating)
        .join(Message, Message.id == Feedback.message_id)
        .join(User, User.id == Feedback.user_id)
        .where(produced_by, *_trusted(settings), Message.excluded_from_training == False)  # noqa: E712
    )
    if since is not None:
        query = query.where(col(Feedback.created_at) >= since)
    rows = session.exec(query.order_by(col(Feedback.created_at), col(Feedback.id))).all()
    scored = _first_per_user(((user, WIN if rating == "up" else LOSS) for user, rating in rows),
                             settings.canary_votes_per_user)
    return scored[-newest:] if newest else scored


def _trusted(settings: Settings) -> list:
    conditions = [User.excluded_from_training == False, User.status != "disabled"]  # noqa: E712
    if not settings.train_on_anonymous:
        conditions.append(User.kind != "browser")
    return conditions


def _first_per_user(scored: Iterable[tuple[int, float]], cap: int) -> list[float]:
    seen: Counter[int] = Counter()
    kept = []
    for user_id, score in scored:
        seen[user_id] += 1
        if seen[user_id] <= cap:
            kept.append(score)
    return kept


# -- the canary --------------------------------------------------------------


@dataclass(frozen=True)
class CanaryStatus:
    """Where a running canary stands: the test's verdict on the votes so far,
    and how long it has run."""

    version: str
    compared_with: str
    started_at: datetime
    hours: float
    verdict: CanaryVerdict

    def to_json(self) -> dict:
        return {"version": self.version, "compared_with": self.compared_with,
                "started_at": self.started_at.isoformat(), "hours": round(self.hours, 3), **self.verdict.to_json()}


def canary_status(session: Session, settings: Settings, row: AdapterVersion | None = None) -> CanaryStatus | None:
    """The running canary's standing (None when there is none)."""
    row = row or canary_version(session)
    if row is None:
        return None
    state = (row.metrics or {}).get(CANARY) or {}
    started = as_utc(datetime.fromisoformat(state.get("started_at") or row.created_at.isoformat()))
    compared_with = state.get("compared_with", BASE)
    votes = duel_votes(session, row.name, compared_with, started, settings)
    return CanaryStatus(row.name, compared_with, started, (utcnow() - started).total_seconds() / 3600,
                        _verdict(votes, settings))


def _verdict(votes: Sequence[float], settings: Settings) -> CanaryVerdict:
    return canary_verdict(
        votes, margin=settings.canary_margin, alpha=settings.canary_alpha, min_votes=settings.canary_min_votes,
        max_votes=settings.canary_max_votes, require_better=settings.canary_require_better,
        default=settings.canary_default,
    )


def check_canary(session: Session, settings: Settings) -> str | None:
    """Decide the canary if the test (or its vote or time limit) says so:
    ``"promoted"``, ``"rejected"``, or None (no canary, or still undecided).
    The caller commits."""
    active = active_version(session, lock=True)  # two servers never decide the same canary twice
    status = canary_status(session, settings)
    if status is None:
        return None
    row = get_version(session, int(status.version[1:]))
    active_name = active.name if active else BASE
    if active_name != status.compared_with:
        return _finish(session, settings, row, False, "active version changed",
                       f"the active version changed to {active_name} while the canary ran against "
                       f"{status.compared_with}; a canary is judged against one version", status.verdict)
    verdict = status.verdict
    if verdict.outcome != "continue":
        return _finish(session, settings, row, verdict.outcome == "promote", "sequential test", verdict.reason, verdict)
    if status.hours >= settings.canary_max_hours:
        promote = settings.canary_default == "promote"
        return _finish(session, settings, row, promote, "time limit",
                       f"undecided after {status.hours:.1f} h "
                       f"(TUNELOOP_CANARY_MAX_HOURS={settings.canary_max_hours:g}) "
                       f"with {verdict.votes} votes: {'promoted' if promote else 'rejected'} as "
                       f"TUNELOOP_CANARY_DEFAULT says", verdict)
    return None


def end_canary(session: Session, settings: Settings, promote: bool, note: str = "") -> str:
    """An admin ends the canary by hand: ``"promoted"`` or ``"rejected"``.
    Raises Conflict when no canary runs. The caller commits."""
    active_version(session, lock=True)
    status = canary_status(session, settings)
    if status is None:
        raise Conflict("no canary is running")
    row = get_version(session, int(status.version[1:]))
    reason = f"ended by an admin ({'promoted' if promote else 'rejected'})" + (f": {note}" if note else "")
    return _finish(session, settings, row, promote, "admin", reason, status.verdict)


def _finish(session: Session, settings: Settings, row: AdapterVersion, promote: bool, decided_by: str,
            reason: str, verdict: CanaryVerdict) -> str:
    outcome = "promoted" if promote else "rejected"
    state = {**((row.metrics or {}).get(CANARY) or {}), "status": outcome, "decided_by": decided_by,
             "reason": reason, "decided_at": utcnow().isoformat(), "verdict": verdict.to_json()}
    compared_with = state.get("compared_with", BASE)
    if promote:
        activate(session, row.version)
    else:
        row.status = "rejected"
        signal_change(session)  # servers stop serving it beside
    _set_state(row, CANARY, state)
    if promote:
        start_watch(row, compared_with, settings)
    session.add(row)
    run = session.get(TrainingRun, row.training_run_id) if row.training_run_id is not None else None
    if run is not None:
        run.status = outcome
        run.metrics = {**(run.metrics or {}), CANARY: state}
        session.add(run)
    session.flush()
    log.info("canary %s %s (%s): %s", row.name, outcome, decided_by, reason)
    return outcome


# -- the watch after a promotion ---------------------------------------------


def start_watch(row: AdapterVersion, previous: str, settings: Settings) -> None:
    """``row`` was just made active by the loop, replacing ``previous``: watch
    it (:func:`check_watch`), unless TUNELOOP_WATCH_ANSWERS is 0. The caller commits."""
    if settings.watch_answers <= 0:
        return
    _set_state(row, "watch", {
        "status": "watching", "previous": previous, "started_at": utcnow().isoformat(),
        "activated_at": row.activated_at.isoformat() if row.activated_at else None,
    })


def _watching(active: AdapterVersion | None) -> dict | None:
    """The watch of ``active`` if it is still watching *this* activation (a
    version activated again by hand later is not watched again)."""
    watch = (active.metrics or {}).get("watch") if active is not None else None
    if not watch or watch.get("status") != "watching":
        return None
    stamp = watch.get("activated_at")
    if stamp is None or active.activated_at is None \
            or abs((as_utc(datetime.fromisoformat(stamp)) - as_utc(active.activated_at)).total_seconds()) > 1:
        return None
    return watch


@dataclass(frozen=True)
class WatchStatus:
    version: str
    previous: str
    started_at: datetime
    hours: float
    thumbs: RateDropVerdict | None  # None: the previous version had too few rated answers for a baseline
    baseline_up_rate: float | None
    ab: CanaryVerdict

    def to_json(self) -> dict:
        return {"version": self.version, "previous": self.previous, "started_at": self.started_at.isoformat(),
                "hours": round(self.hours, 3), "baseline_up_rate": self.baseline_up_rate,
                "thumbs": self.thumbs.to_json() if self.thumbs else None, "ab": self.ab.to_json()}


def watch_status(session: Session, settings: Settings, active: AdapterVersion | None) -> WatchStatus | None:
    watch = _watching(active)
    if watch is None or settings.watch_answers <= 0:
        return None
    assert active is not None
    started = as_utc(datetime.fromisoformat(watch["started_at"]))
    previous = watch["previous"]
    baseline = thumbs(session, previous, settings, newest=settings.watch_answers)
    mine = thumbs(session, active.name, settings, since=started)[:settings.watch_answers]
    rate = sum(baseline) / len(baseline) if len(baseline) >= settings.canary_min_votes else None
    thumbs_verdict = None if rate is None else rate_drop_verdict(
        mine, rate, margin=settings.canary_margin, alpha=settings.canary_alpha, min_votes=settings.canary_min_votes)
    ab = duel_votes(session, active.name, previous, started, settings)
    return WatchStatus(active.name, previous, started, (utcnow() - started).total_seconds() / 3600,
                       thumbs_verdict, rate, _verdict(ab, settings))


def check_watch(session: Session, settings: Settings) -> str | None:
    """Roll the watched active version back if its thumbs-up rate or its A/B
    record against the previous version is shown to have dropped
    (``"rolled_back"``); end the watch when it has seen enough
    (``"passed"``); else None. The caller commits."""
    active = active_version(session, lock=True)
    status = watch_status(session, settings, active)
    if status is None:
        return None
    assert active is not None
    reasons = []
    if status.thumbs is not None and status.thumbs.outcome == "reject":
        reasons.append(f"its thumbs-up rate dropped below {status.previous}'s "
                       f"({status.baseline_up_rate:.2f}): {status.thumbs.reason}")
    if status.ab.outcome == "reject" and status.ab.votes >= settings.canary_min_votes:
        reasons.append(f"it lost to {status.previous} on A/B turns: {status.ab.reason}")
    state = {**active.metrics["watch"], "numbers": status.to_json()}
    if reasons:
        rollback(session)
        state |= {"status": "rolled_back", "reason": "; ".join(reasons), "ended_at": utcnow().isoformat()}
        outcome = "rolled_back"
        log.warning("automatic rollback of %s: %s", active.name, state["reason"])
    elif (status.thumbs is not None and status.thumbs.votes >= settings.watch_answers) \
            or status.hours >= settings.watch_hours:
        state |= {"status": "passed", "ended_at": utcnow().isoformat()}
        outcome = "passed"
    else:
        return None
    _set_state(active, "watch", state)
    session.add(active)
    session.flush()
    signal_change(session)  # the previous version is no longer needed beside it
    return outcome


def _set_state(row: AdapterVersion, key: str, state: dict) -> None:
    # a new dict: the JSON column only notices assignment
    row.metrics = {**(row.metrics or {}), key: state}


def referee(db: Engine, settings: Settings) -> list[str]:
    """One look at the canary and the watch (each in its own transaction); what
    happened, for the log. Never raises: the next look tries again."""
    happened = []
    for check in (check_canary, check_watch):
        try:
            with session_scope(db) as session:
                outcome = check(session, settings)
            if outcome:
                happened.append(f"{check.__name__}: {outcome}")
        except Exception:
            log.exception("%s failed; trying again at the next look", check.__name__)
    return happened


def training_waits_for(session: Session) -> str | None:
    """Why a new training run should wait, if it should: a canary is deciding."""
    row = canary_version(session)
    return f"{row.name} is a canary that users are judging" if row is not None else None

