"""The leaderboard of served versions (``/admin/leaderboard``): every version
that ever answered or served (the base model included), ranked by a
Bradley–Terry fit on the A/B votes between answers of *different* versions,
with Chatbot Arena's style control, plus each version's thumbs-up rate.

The model, for one decided comparison of answer A (version i, shown left) and
answer B (version j)::

    log-odds(A wins) = (s_i - s_j) + position + length * (len_A - len_B) / (len_A + len_B)

``position`` is the left-side bias (what a voter gives A whatever it says),
``length`` the style term: a voter who prefers longer answers raises it
instead of the longer-answering version's strength. Lengths are characters.
Outcomes: ``a`` 1, ``b`` 0, ``tie`` and ``both_bad`` ½ — half a win each, as
Chatbot Arena counts both kinds of tie: ``both_bad`` says neither answer was
better than the other, which is all a pairwise model reads from a vote.
Comparisons still waiting for a choice, and those between two answers of one
version (they say nothing about versions), are left out.

The fit is penalised maximum likelihood (scipy's L-BFGS-B on the exact
gradient) with a small L2 prior on every parameter (:data:`L2`): a version
with few votes, or one that won every vote, stays finite. Scores are on an
Elo-like scale, ``1000 + 400/ln(10) * (s - s_base)``: base is 1000 when it has
cross-version votes, otherwise the scored versions average 1000. Intervals are
bootstrap percentiles: the comparisons resampled with replacement
(:data:`RESAMPLES`, fixed :data:`SEED`), refitted, each resample anchored the
same way. Thumbs-up rates get a Wilson score interval.

Pure functions take rows (:class:`Vote`, :class:`ThumbCount`); :func:`read_rows`
is the one query, and :func:`leaderboard` puts both together.
"""

from __future__ import annotations

import functools
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
from sqlalchemy import func
from sqlalchemy.orm import aliased
from sqlmodel import Session, col, select

from store.registry import BASE, active_version
from store.tables import AdapterVersion, Comparison, Feedback, Message

OUTCOMES = {"a": 1.0, "b": 0.0, "tie": 0.5, "both_bad": 0.5}
L2 = 0.1  # prior precision: a N(0, ~3.2²) log-odds prior, worth well under one vote
ELO_PER_LOG_ODDS = 400 / math.log(10)
ANCHOR_SCORE = 1000.0
RESAMPLES = 200
SEED = 14
LEVEL = 0.95
HISTORY_POINTS = 12


@dataclass(frozen=True)
class Vote:
    """One decided comparison: the versions that wrote A (left) and B, the
    choice (``a``, ``b``, ``tie``, ``both_bad``) and the answers' lengths."""

    version_a: str
    version_b: str
    winner: str | None
    length_a: int
    length_b: int
    decided_at: datetime | None = None

    @property
    def cross_version(self) -> bool:
        return self.version_a != self.version_b and self.winner in OUTCOMES


@dataclass(frozen=True)
class ThumbCount:
    version: str
    up: int
    down: int


@dataclass(frozen=True)
class Interval:
    low: float
    high: float

    def to_json(self, digits: int) -> list[float]:
        return [round(self.low, digits), round(self.high, digits)]


@dataclass(frozen=True)
class Fit:
    """A point estimate. ``scores``: Elo-like, anchored (see the module doc);
    ``position`` and ``length`` in log-odds (``length`` None without style control)."""

    scores: dict[str, float]
    position: float
    length: float | None
    anchor: str | None  # "base", or None: the scored versions average ANCHOR_SCORE


@dataclass(frozen=True)
class Ratings:
    """A fit with bootstrap intervals for each score and for both covariates."""

    fit: Fit
    score_intervals: dict[str, Interval]
    position_interval: Interval
    length_interval: Interval | None
    resamples: int


@dataclass(frozen=True)
class HistoryPoint:
    at: datetime | None
    votes: int
    scores: dict[str, float]


@dataclass
class Standing:
    """One version's row on the leaderboard."""

    version: str
    active: bool
    rank: int | None = None
    score: float | None = None
    interval: Interval | None = None
    wins: float = 0
    losses: float = 0
    ties: float = 0
    same_version_votes: int = 0
    up: int = 0
    down: int = 0
    up_rate: float | None = None
    up_interval: Interval | None = None
    note: str | None = None

    @property
    def votes(self) -> int:
        return int(self.wins + self.losses + self.ties)

    @property
    def thumbs(self) -> int:
        return self.up + self.down

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version, "active": self.active, "rank": self.rank,
            "score": None if self.score is None else round(self.score, 1),
            "interval": self.interval.to_json(1) if self.interval else None,
            "votes": self.votes, "wins": int(self.wins), "losses": int(self.losses), "ties": int(self.ties),
            "same_version_votes": self.same_version_votes,
            "thumbs": {
                "up": self.up, "down": self.down, "total": self.thumbs,
                "up_rate": None if self.up_rate is None else round(self.up_rate, 4),
                "interval": self.up_interval.to_json(4) if self.up_interval else None,
            },
            "note": self.note,
        }


@dataclass
class Leaderboard:
    standings: list[Standing]
    votes: int  # decided comparisons between different versions
    same_version_votes: int
    ratings: Ratings | None
    history: list[HistoryPoint] = field(default_factory=list)

    @property
    def anchor(self) -> str | None:
        return self.ratings.fit.anchor if self.ratings else None

    def to_json(self) -> dict[str, Any]:
        ratings = self.ratings
        return {
            "votes": self.votes,
            "same_version_votes": self.same_version_votes,
            "anchor": {"version": self.anchor if ratings else None, "score": ANCHOR_SCORE,
                       "rule": "base = 1000 when base has cross-version votes, else the scored versions average 1000"},
            "method": {
                "model": "Bradley-Terry with a position term and a length covariate (style control)",
                "ties": "tie and both_bad count as half a win for each side",
                "l2": L2, "resamples": ratings.resamples if ratings else RESAMPLES, "seed": SEED, "level": LEVEL,
            },
            "position": None if ratings is None else {
                "log_odds": round(ratings.fit.position, 4), "interval": ratings.position_interval.to_json(4),
                "a_wins": round(_sigmoid(ratings.fit.position), 4),
            },
            "length": None if ratings is None or ratings.fit.length is None else {
                "log_odds": round(ratings.fit.length, 4),
                "interval": ratings.length_interval.to_json(4) if ratings.length_interval else None,
            },
            "versions": [s.to_json() for s in self.standings],
            "history": [
                {"at": p.at.isoformat() if p.at else None, "votes": p.votes,
                 "scores": {v: round(s, 1) for v, s in p.scores.items()}}
                for p in self.history
            ],
        }


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def version_order(name: str) -> tuple[int, int, str]:
    """base first, then v1, v2, ... by number."""
    if name == BASE:
        return (0, 0, name)
    if name[:1] == "v" and name[1:].isdigit():
        return (1, int(name[1:]), name)
    return (2, 0, name)


# --- the fit ---------------------------------------------------------------------------


def _design(votes: Sequence[Vote], versions: Sequence[str], style_control: bool) -> tuple[np.ndarray, np.ndarray]:
    """Rows: +1 for A's version, -1 for B's, 1 for the position term, the
    normalised length difference (with style control). Outcomes in [0, 1]."""
    index = {v: i for i, v in enumerate(versions)}
    width = len(versions) + (2 if style_control else 1)
    design = np.zeros((len(votes), width))
    rows = np.arange(len(votes))
    design[rows, [index[v.version_a] for v in votes]] = 1.0
    design[rows, [index[v.version_b] for v in votes]] = -1.0
    design[:, len(versions)] = 1.0
    if style_control:
        total = np.array([v.length_a + v.length_b for v in votes], dtype=float)
        diff = np.array([v.length_a - v.length_b for v in votes], dtype=float)
        design[:, len(versions) + 1] = np.divide(diff, total, out=np.zeros_like(diff), where=total > 0)
    return design, np.array([OUTCOMES[v.winner] for v in votes])


def _solve(design: np.ndarray, outcome: np.ndarray, weights: np.ndarray, l2: float, start: np.ndarray) -> np.ndarray:
    """Penalised maximum likelihood of the logistic model (fractional outcomes).
    Convex with a handful of parameters: Newton steps on the exact Hessian
    (scipy's trust-exact) converge in a few iterations, which keeps 200
    bootstrap refits cheap."""
    from scipy.optimize import minimize  # ~1.5 s with scipy.stats: only the leaderboard pays it
    from scipy.special import expit

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        z = design @ theta
        loss = weights @ (outcome * np.logaddexp(0.0, -z) + (1 - outcome) * np.logaddexp(0.0, z))
        gradient = design.T @ (weights * (expit(z) - outcome)) + l2 * theta
        return float(loss + 0.5 * l2 * theta @ theta), gradient

    def hessian(theta: np.ndarray) -> np.ndarray:
        p = expit(design @ theta)
        return (design.T * (weights * p * (1 - p))) @ design + l2 * np.eye(len(theta))

    result = minimize(objective, start, jac=True, hess=hessian, method="trust-exact", options={"gtol": 1e-8})
    return result.x


def _anchored(strengths: np.ndarray, versions: Sequence[str]) -> np.ndarray:
    zero = strengths[list(versions).index(BASE)] if BASE in versions else strengths.mean()
    return ANCHOR_SCORE + ELO_PER_LOG_ODDS * (strengths - zero)


def _cross(votes: Iterable[Vote]) -> list[Vote]:
    return [v for v in votes if v.cross_version]


def _versions(votes: Sequence[Vote]) -> list[str]:
    return sorted({v.version_a for v in votes} | {v.version_b for v in votes}, key=version_order)


def _point_fit(
    votes: Iterable[Vote], style_control: bool, l2: float
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """The versions, design, outcomes and fitted parameters of the cross-version votes."""
    cross = _cross(votes)
    if not cross:
        raise ValueError("no decided A/B votes between different versions to fit")
    versions = _versions(cross)
    design, outcome = _design(cross, versions, style_control)
    theta = _solve(design, outcome, np.ones(len(cross)), l2, np.zeros(design.shape[1]))
    return versions, design, outcome, theta


def fit_bradley_terry(votes: Iterable[Vote], *, style_control: bool = True, l2: float = L2) -> Fit:
    """The point estimate on the cross-version votes among ``votes`` (others are
    ignored). Raises ValueError when there is none."""
    versions, _, _, theta = _point_fit(votes, style_control, l2)
    return _fit_of(theta, versions, style_control)


def _fit_of(theta: np.ndarray, versions: Sequence[str], style_control: bool) -> Fit:
    count = len(versions)
    scores = _anchored(theta[:count], versions)
    return Fit(
        scores=dict(zip(versions, scores.tolist(), strict=True)), position=float(theta[count]),
        length=float(theta[count + 1]) if style_control else None, anchor=BASE if BASE in versions else None,
    )


def rate_versions(
    votes: Iterable[Vote], *, style_control: bool = True, l2: float = L2,
    resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL,
) -> Ratings:
    """The fit plus percentile bootstrap intervals: ``resamples`` times, the
    cross-version votes drawn with replacement (as many as there are) and
    refitted. Raises ValueError when there is no cross-version vote."""
    versions, design, outcome, theta = _point_fit(votes, style_control, l2)
    rng = np.random.default_rng(seed)
    count, n = len(versions), len(outcome)
    draws = np.empty((resamples, design.shape[1]))
    for r in range(resamples):
        # a resample with replacement, written as how often each vote was drawn
        weights = np.bincount(rng.integers(0, n, n), minlength=n).astype(float)
        sample = _solve(design, outcome, weights, l2, theta)
        draws[r, :count] = _anchored(sample[:count], versions)
        draws[r, count:] = sample[count:]
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(draws, [tail, 100 - tail], axis=0)
    intervals = [Interval(float(a), float(b)) for a, b in zip(low, high, strict=True)]
    return Ratings(
        fit=_fit_of(theta, versions, style_control),
        score_intervals=dict(zip(versions, intervals[:count], strict=True)),
        position_interval=intervals[count], length_interval=intervals[count + 1] if style_control else None,
        resamples=resamples,
    )


def wilson_interval(successes: int, trials: int, level: float = LEVEL) -> Interval | None:
    """The Wilson score interval of a proportion (scipy's), None for no trials."""
    if trials <= 0:
        return None
    from scipy.stats import binomtest

    ci = binomtest(successes, trials).proportion_ci(confidence_level=level, method="wilson")
    return Interval(float(ci.low), float(ci.high))


def score_history(votes: Iterable[Vote], points: int = HISTORY_POINTS, l2: float = L2) -> list[HistoryPoint]:
    """Scores as the cross-version votes accumulate (in the order they were
    decided): the point fit on the first k·n/points votes, for k = 1..points."""
    far_past = datetime.min.replace(tzinfo=timezone.utc)
    cross = sorted(_cross(votes), key=lambda v: _aware(v.decided_at) or far_past)
    cuts = sorted({math.ceil(len(cross) * k / points) for k in range(1, points + 1)} - {0})
    history = []
    for cut in cuts:
        prefix = cross[:cut]
        history.append(HistoryPoint(_aware(prefix[-1].decided_at), cut, fit_bradley_terry(prefix, l2=l2).scores))
    return history


def _aware(moment: datetime | None) -> datetime | None:
    """SQLite gives naive datetimes back; the store writes UTC."""
    if moment is not None and moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment


def _groups(votes: Sequence[Vote]) -> dict[str, str]:
    """Each version's connected group (by chains of cross-version votes), named by a member."""
    parent: dict[str, str] = {}

    def root(v: str) -> str:
        parent.setdefault(v, v)
        while parent[v] != v:
            parent[v] = parent[parent[v]]
            v = parent[v]
        return v

    for vote in votes:
        parent[root(vote.version_a)] = root(vote.version_b)
    return {v: root(v) for v in list(parent)}


# --- the leaderboard -------------------------------------------------------------------


def build_leaderboard(
    votes: Sequence[Vote], thumbs: Sequence[ThumbCount], served: Iterable[str], active: str,
    *, resamples: int = RESAMPLES, history_points: int = HISTORY_POINTS,
) -> Leaderboard:
    """Every version in ``served`` (and any that has votes or thumbs), ranked by
    score; a version with no cross-version vote is listed unranked with a note."""
    cross = _cross(votes)
    same = [v for v in votes if v.winner in OUTCOMES and v.version_a == v.version_b]
    names = set(served) | {BASE, active} | {t.version for t in thumbs}
    names |= {v.version_a for v in votes} | {v.version_b for v in votes}
    standings = {name: Standing(version=name, active=name == active) for name in sorted(names, key=version_order)}

    for vote in cross:
        a, b = standings[vote.version_a], standings[vote.version_b]
        if vote.winner == "a":
            a.wins, b.losses = a.wins + 1, b.losses + 1
        elif vote.winner == "b":
            b.wins, a.losses = b.wins + 1, a.losses + 1
        else:
            a.ties, b.ties = a.ties + 1, b.ties + 1
    for version, count in Counter(v.version_a for v in same).items():
        standings[version].same_version_votes = count
    for thumb in thumbs:
        row = standings[thumb.version]
        row.up, row.down = row.up + thumb.up, row.down + thumb.down
    for row in standings.values():
        if row.thumbs:
            row.up_rate = row.up / row.thumbs
            row.up_interval = wilson_interval(row.up, row.thumbs)

    ratings, history = _ratings_and_history(tuple(cross), resamples, history_points) if cross else (None, [])
    if ratings is not None:
        for version, score in ratings.fit.scores.items():
            standings[version].score = score
            standings[version].interval = ratings.score_intervals[version]
        _note_separate_groups(cross, standings, ratings.fit.anchor)
    for row in standings.values():
        if row.score is None and row.same_version_votes:
            row.note = (f"only compared with itself ({row.same_version_votes} votes): no score until an A/B vote "
                        "against another version")
        elif row.score is None:
            row.note = "no A/B votes against another version yet"

    ranked = sorted((s for s in standings.values() if s.score is not None), key=lambda s: -(s.score or 0.0))
    for row in ranked:  # equal scores (to the point shown) share a rank
        row.rank = 1 + sum(round(other.score or 0.0, 1) > round(row.score or 0.0, 1) for other in ranked)
    unranked = sorted((s for s in standings.values() if s.score is None), key=lambda s: version_order(s.version))
    return Leaderboard([*ranked, *unranked], len(cross), len(same), ratings, history)


@functools.lru_cache(maxsize=4)
def _ratings_and_history(
    cross: tuple[Vote, ...], resamples: int, history_points: int
) -> tuple[Ratings, list[HistoryPoint]]:
    """The costly part (``resamples`` + ``history_points`` refits), computed
    again only when a vote was added or changed."""
    return rate_versions(cross, resamples=resamples), score_history(cross, history_points)


def _note_separate_groups(cross: Sequence[Vote], standings: dict[str, Standing], anchor: str | None) -> None:
    groups = _groups(cross)
    if len(set(groups.values())) < 2:
        return
    if anchor is not None:
        main = groups[anchor]
    else:
        sizes: dict[str, int] = defaultdict(int)
        for vote in cross:
            sizes[groups[vote.version_a]] += 1
        main = max(sizes, key=lambda g: sizes[g])
    target = "base" if anchor else "the largest group of versions"
    for version, group in groups.items():
        if group != main:
            standings[version].note = (f"no chain of A/B votes links it to {target}: its score compares only with "
                                       "the versions it met")


# --- the query ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Rows:
    votes: list[Vote]
    thumbs: list[ThumbCount]
    served: list[str]
    active: str


def _name(version: str | None) -> str:
    return BASE if version is None else version


def read_rows(session: Session) -> Rows:
    """The decided comparisons with their answers' versions and lengths, the
    thumbs per version, every version that answered or was ever activated, and
    the one serving now."""
    a, b = aliased(Message), aliased(Message)
    decided = (
        select(a.adapter_version, b.adapter_version, Comparison.winner, func.length(a.content),
               func.length(b.content), Comparison.decided_at, Comparison.created_at)
        .join(a, col(a.id) == Comparison.message_a_id)
        .join(b, col(b.id) == Comparison.message_b_id)
        .where(col(Comparison.winner).is_not(None))
        .order_by(col(Comparison.id))
    )
    votes = [
        Vote(_name(va), _name(vb), winner, int(la or 0), int(lb or 0), _aware(decided_at or created_at))
        for va, vb, winner, la, lb, decided_at, created_at in session.exec(decided).all()
    ]
    per_version = (
        select(Message.adapter_version, Feedback.rating, func.count())
        .join(Message, col(Message.id) == Feedback.message_id)
        .group_by(Message.adapter_version, Feedback.rating)
    )
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for version, rating, count in session.exec(per_version).all():
        counts[_name(version)][rating] += count
    thumbs = [ThumbCount(v, c["up"], c["down"]) for v, c in counts.items()]
    answered = session.exec(
        select(Message.adapter_version).where(Message.role == "assistant", col(Message.caller_written).is_(False))
        .distinct()
    ).all()
    activated = session.exec(select(AdapterVersion).where(col(AdapterVersion.activated_at).is_not(None))).all()
    current = active_version(session)
    return Rows(
        votes=votes, thumbs=thumbs,
        served=sorted({_name(v) for v in answered} | {row.name for row in activated} | {BASE}, key=version_order),
        active=current.name if current else BASE,
    )


def leaderboard(session: Session) -> Leaderboard:
    rows = read_rows(session)
    return build_leaderboard(rows.votes, rows.thumbs, rows.served, rows.active)
