"""Always-valid sequential tests for an online canary and for the watch after a
promotion: the admin may look after every vote and act on what they see, and
the error rates below still hold.

**What is measured.** In a canary, a candidate version answers blind A/B turns
against the active version. Each decided vote is a score ``x``: ``1.0`` the
user preferred the candidate, ``0.0`` the active version, ``0.5`` a tie *or*
both bad (neither answer was better, which is all a pairwise vote says; the
leaderboard counts both kinds the same way). The candidate's *win score* ``mu``
is the mean of ``x``: ``0.5`` means as good as the active version.

**The interval.** After every vote there is a (1 - alpha) interval for ``mu``
that is valid *uniformly over time*: the chance that it ever, at any vote,
fails to contain ``mu`` is at most alpha, however often it is looked at and
whenever one stops (a confidence sequence). Intervals only shrink: the one
reported is the intersection of all so far (the running intersection).

**The canary rule** (:func:`canary_verdict`), checked after every vote from
``min_votes`` (default 20) on; the first rule to fire ends the test and later
votes do not change its verdict:

- ``reject`` when the interval lies below 0.5 (its upper end at or below
  0.5: every score of 0.5 or more is ruled out): the candidate is shown worse
  than the active version, by any amount;
- ``promote`` when it lies above ``0.5 - margin`` (its lower end at or above
  it: every score at or below it is ruled out): the candidate is shown to be
  at most ``margin`` worse (non-inferiority); with ``require_better``, above
  0.5 instead (shown better).

Both can hold at once only when the interval sits inside
``(0.5 - margin, 0.5)``; then reject wins (safety first), also when both
first hold at the same vote. When ``max_votes`` votes pass with neither, the
verdict is ``default`` (``"reject"``: keep the active version) and says that
the limit decided. A wrong verdict (promoting a candidate whose ``mu`` is at
or below ``0.5 - margin``, or rejecting one whose ``mu`` is at least 0.5)
needs the interval to miss ``mu`` on one given side, so it has probability at
most alpha/2: the two sides share alpha equally.

Defaults: ``alpha`` 0.05 (95% intervals), ``margin`` 0.05, ``min_votes`` 20,
no ``max_votes`` (the canary runs until a rule fires), ``default`` ``"reject"``,
``require_better`` off.

**The rollback watch** (:func:`rate_drop_verdict`): after a promotion, the new
version's thumbs (1 up, 0 down) are watched the same way; ``reject`` (roll
back) when its up-rate's interval lies below ``baseline - margin``,
the previous version's rate minus the margin. A version at least as good as
``baseline - margin`` is rolled back with probability at most alpha/2.

**The method** is betting (Waudby-Smith & Ramdas, "Estimating means of
bounded random variables by betting", JRSS-B 2023, arXiv:2010.09686: the
hedged capital process with predictable plug-in bets). For a candidate
mean ``m`` two gamblers start with capital 1; one bets the scores will come out
above ``m``, the other below, each multiplying their capital by
``1 + lambda_t * (x_t - m)`` (or ``1 - ...``) per vote. Were ``m`` the true mean,
neither could expect to gain, so by Ville's inequality either one's capital
ever reaching ``2 / alpha`` has probability at most alpha/2; the means at
which a gambler has done so are ruled out. Both capitals are monotone in
``m``, so the means ruled out form two end pieces of [0, 1] and the rest is an
interval: its ends are found by a vectorised bisection (rounded outward, by
under 1e-6) and a rule's threshold is tested exactly. Neither scipy nor numpy
provides this; the PyPI package ``confseq`` (by the paper's group) does, but
it is not a dependency and a verdict needs only these few lines. Each call
recomputes from the first vote: about 10 ms for 1,500 votes.

Batch forms (:func:`canary_decisions`, :func:`rate_drop_decisions`,
:func:`first_exclusions`) apply the same rules to many runs at once, for
simulations that measure error rates and votes needed
(``tests/store/test_sequential.py``). Bad arguments raise ``ValueError``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike

CANARY_SCORES = (0.0, 0.5, 1.0)  # active preferred, tie or both bad, candidate preferred
THUMB_SCORES = (0.0, 1.0)
NEUTRAL = 0.5  # the win score of a candidate exactly as good as the active version

# Paper's truncation c: a bet never stakes more than half the capital, so one
# vote can at most halve it (c = 1/2 is the value the paper recommends).
TRUNCATION = 0.5
# Prior of the plug-in mean and variance, one pseudo-observation's worth (paper's PrPl choice).
PRIOR_MEAN = 0.5
PRIOR_VARIANCE = 0.25
# Bisection for the interval's ends: a first pass over this many points, then
# rounds of REFINE_POINTS inside each end's bracket (1/64 / 33**3 ~ 4e-7).
FIRST_POINTS = 63
REFINE_POINTS = 32
REFINE_ROUNDS = 3
# Runs are judged in chunks of about this many (vote, mean) cells, to bound memory.
CHUNK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class CanaryVerdict:
    """Where a canary stands. Counts, estimate and interval are as of the vote
    that decided it (``votes``), or of all votes while it continues."""

    outcome: str  # "promote" | "reject" | "continue"
    votes: int  # decided votes counted: wins + losses + ties
    wins: int
    losses: int
    ties: int  # tie and both bad
    estimate: float | None  # mean score of the counted votes; None with none
    low: float  # the always-valid (1 - alpha) interval for mu; 0..1 with no votes
    high: float
    reason: str  # one sentence: why this outcome, with the numbers
    limit_reached: bool = False  # the outcome is the default at max_votes, not evidence

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RateDropVerdict:
    """Where the watch of a promoted version stands: ``reject`` (roll back) or ``continue``."""

    outcome: str  # "reject" | "continue"
    votes: int  # thumbs counted: ups + downs
    ups: int
    downs: int
    estimate: float | None  # up-rate of the counted thumbs; None with none
    low: float
    high: float
    baseline: float  # the previous version's up-rate
    reason: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Decisions(NamedTuple):
    """A rule applied to many runs: per run, the outcome, the vote it was
    reached at (all votes while ``continue``) and whether the limit decided."""

    outcome: np.ndarray  # str
    votes: np.ndarray  # int
    limit_reached: np.ndarray  # bool


def confidence_sequence(outcomes: Sequence[float], alpha: float = 0.05) -> tuple[float, float]:
    """The always-valid (1 - alpha) interval for the mean of ``outcomes``
    (numbers in [0, 1], in time order) after all of them: the intersection of
    the intervals after each one. ``(0.0, 1.0)`` with none.

    >>> confidence_sequence([1.0] * 30)[0] > 0.5
    True
    """
    _check_alpha(alpha)
    return _interval(_scores(outcomes, None, "outcome"), alpha, ())


def first_exclusions(runs: ArrayLike, mean: float, *, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """For each run (a row of ``runs``, scores in [0, 1] in time order): the
    first vote after which the interval lies entirely above ``mean``, and the
    first after which it lies entirely below it, counting votes from 1; 0 when
    it never has. ``mean`` is covered at every vote exactly when both are 0."""
    _check_alpha(alpha)
    if not 0 <= mean <= 1:
        raise ValueError(f"mean must be in [0, 1], got {mean!r}")
    above, below = _first_exclusions(_runs(runs, None, "outcome"), np.array([float(mean)]), alpha)
    return above[:, 0], below[:, 0]


def canary_decisions(
    runs: ArrayLike, *, margin: float = 0.05, alpha: float = 0.05, min_votes: int = 20,
    max_votes: int | None = None, require_better: bool = False, default: str = "reject",
) -> Decisions:
    """:func:`canary_verdict`'s rule for each row of ``runs`` (votes of 0, 0.5
    or 1, all rows as long), vectorised; raises ``ValueError`` as it does."""
    _check_canary_args(margin, alpha, min_votes, max_votes, default)
    x = _runs(runs, CANARY_SCORES, "vote")
    n = x.shape[1]
    bar = NEUTRAL if require_better else NEUTRAL - margin
    above, below = _first_exclusions(x, np.array([bar, NEUTRAL]), alpha)
    promote_at = _not_before(above[:, 0], min_votes, n)
    reject_at = _not_before(below[:, 1], min_votes, n)
    votes = np.minimum(promote_at, reject_at)
    outcome = np.where(reject_at <= promote_at, "reject", "promote").astype("<U8")
    horizon = n if max_votes is None else min(n, max_votes)
    undecided = votes > horizon
    limit_reached = undecided & (max_votes is not None and n >= max_votes)
    outcome[undecided] = "continue"
    votes[undecided] = n
    outcome[limit_reached] = default
    votes[limit_reached] = max_votes if max_votes is not None else n
    return Decisions(outcome, votes, limit_reached)


def canary_verdict(
    outcomes: Sequence[float], *, margin: float = 0.05, alpha: float = 0.05, min_votes: int = 20,
    max_votes: int | None = None, require_better: bool = False, default: str = "reject",
) -> CanaryVerdict:
    """Judge a canary from its decided votes, in time order: each ``1.0``
    (candidate preferred), ``0.0`` (active preferred) or ``0.5`` (tie or both bad).

    After each vote from ``min_votes`` on, with the always-valid (1 - alpha)
    interval ``[low, high]`` for the win score: ``reject`` when ``high <= 0.5``
    (every score of 0.5 and above ruled out: shown worse than the active
    version, by any amount); else ``promote`` when ``low >= 0.5 - margin``
    (every score at or below it ruled out: at most ``margin`` worse), or, with
    ``require_better``, ``low >= 0.5``. Reject is checked first, so when both
    hold it wins. The first vote at which one holds ends the test: the verdict,
    counts and interval are as of that vote, whatever came after. With no
    decision after ``max_votes`` votes the outcome is ``default``
    (``"reject"`` keeps the active version, ``"promote"``) and
    ``limit_reached`` is set; before that, ``continue``.

    Raises ``ValueError`` for a vote that is not 0, 0.5 or 1, ``margin``
    outside [0, 0.5), ``alpha`` outside (0, 1), a negative ``min_votes``,
    ``max_votes`` below 1 or ``min_votes``, or another ``default``.

    >>> canary_verdict([1.0] * 25 + [0.5] * 5).outcome
    'promote'
    """
    _check_canary_args(margin, alpha, min_votes, max_votes, default)
    x = _scores(outcomes, CANARY_SCORES, "vote")
    bar = NEUTRAL if require_better else NEUTRAL - margin
    if x.size == 0:
        return CanaryVerdict("continue", 0, 0, 0, 0, None, 0.0, 1.0, "Continue: no decided votes yet.")
    decided = canary_decisions(x[None, :], margin=margin, alpha=alpha, min_votes=min_votes, max_votes=max_votes,
                               require_better=require_better, default=default)
    outcome, votes, limit_reached = str(decided.outcome[0]), int(decided.votes[0]), bool(decided.limit_reached[0])
    x = x[:votes]
    low, high = _interval(x, alpha, (bar, NEUTRAL))
    wins, losses = int(np.count_nonzero(x == 1.0)), int(np.count_nonzero(x == 0.0))
    estimate = float(x.mean())
    counts = f"after {votes} votes ({wins} wins, {losses} losses, {votes - wins - losses} ties)"
    state = f"the candidate's win score is {estimate:.3f} with {_level(alpha)} interval [{low:.3f}, {high:.3f}]"
    claim = "better than the active version" if require_better else f"at most {margin:g} worse than the active version"
    if limit_reached:
        keeps = "keeps the active version" if default == "reject" else "promotes the candidate"
        reason = (f"{default.capitalize()} by the limit: {counts} {state}, which shows neither that the candidate "
                  f"is worse nor that it is {claim}; the limit of {max_votes} votes is reached "
                  f"and the default {keeps}.")
    elif outcome == "reject":
        reason = (f"Reject: {counts} {state}, entirely at or below {NEUTRAL:g}, "
                  "so the candidate is shown worse than the active version.")
    elif outcome == "promote":
        reason = f"Promote: {counts} {state}, entirely at or above {bar:g}, so the candidate is shown {claim}."
    elif votes < min_votes:
        reason = f"Continue: {votes} of the {min_votes} votes needed before deciding; {state}."
    else:
        reason = (f"Continue: {counts} {state}, which still reaches both below {bar:g} and above {NEUTRAL:g}, "
                  "so neither better nor worse is shown yet.")
    return CanaryVerdict(outcome, votes, wins, losses, votes - wins - losses, estimate, low, high, reason,
                         limit_reached)


def rate_drop_decisions(
    runs: ArrayLike, baseline: float, *, margin: float = 0.05, alpha: float = 0.05, min_votes: int = 20,
) -> Decisions:
    """:func:`rate_drop_verdict`'s rule for each row of ``runs`` (thumbs of 0
    or 1, all rows as long), vectorised; raises ``ValueError`` as it does."""
    _check_rate_args(baseline, margin, alpha, min_votes)
    x = _runs(runs, THUMB_SCORES, "thumb")
    n = x.shape[1]
    bar = baseline - margin
    if bar > 0:
        _, below = _first_exclusions(x, np.array([bar]), alpha)
        drop_at = _not_before(below[:, 0], min_votes, n)
    else:  # no up-rate lies below 0: a drop this large can never be shown
        drop_at = np.full(x.shape[0], n + 1)
    dropped = drop_at <= n
    outcome = np.where(dropped, "reject", "continue").astype("<U8")
    return Decisions(outcome, np.where(dropped, drop_at, n), np.zeros(x.shape[0], dtype=bool))


def rate_drop_verdict(
    outcomes: Sequence[float], baseline: float, *, margin: float = 0.05, alpha: float = 0.05, min_votes: int = 20,
) -> RateDropVerdict:
    """Watch a promoted version's thumbs, in time order (``1`` up, ``0``
    down), against ``baseline``, the up-rate of the version it replaced.

    After each thumb from ``min_votes`` on: ``reject`` (roll back) when the
    always-valid (1 - alpha) interval for its up-rate lies entirely at or below
    ``baseline - margin`` (shown to have dropped by more than ``margin``); the
    first such thumb ends the watch, as in :func:`canary_verdict`. Otherwise
    ``continue``; never ``promote``.

    Raises ``ValueError`` for a thumb that is not 0 or 1, ``baseline`` outside
    [0, 1], ``margin`` outside [0, 1), ``alpha`` outside (0, 1) or a negative
    ``min_votes``.
    """
    _check_rate_args(baseline, margin, alpha, min_votes)
    x = _scores(outcomes, THUMB_SCORES, "thumb")
    bar = baseline - margin
    if x.size == 0:
        return RateDropVerdict("continue", 0, 0, 0, None, 0.0, 1.0, baseline, "Continue: no thumbs yet.")
    decided = rate_drop_decisions(x[None, :], baseline, margin=margin, alpha=alpha, min_votes=min_votes)
    outcome, votes = str(decided.outcome[0]), int(decided.votes[0])
    x = x[:votes]
    low, high = _interval(x, alpha, (bar,))
    ups = int(np.count_nonzero(x == 1.0))
    estimate = float(x.mean())
    counts = f"after {votes} thumbs ({ups} up, {votes - ups} down)"
    state = f"the up-rate is {estimate:.3f} with {_level(alpha)} interval [{low:.3f}, {high:.3f}]"
    limit = f"{bar:g} (the previous version's {baseline:g} less the {margin:g} margin)"
    if outcome == "reject":
        reason = f"Roll back: {counts} {state}, entirely at or below {limit}."
    elif votes < min_votes:
        reason = f"Continue: {votes} of the {min_votes} thumbs needed before judging; {state}."
    else:
        reason = f"Continue: {counts} {state}; a drop below {limit} is not shown."
    return RateDropVerdict(outcome, votes, ups, votes - ups, estimate, low, high, baseline, reason)


# --- the betting construction -------------------------------------------------


def _bets(x: np.ndarray, alpha: float) -> np.ndarray:
    """The predictable plug-in bet before each vote (last axis), from the
    votes before it only (the paper's PrPl bet, with 2/alpha for two sides):
    ``sqrt(2 log(2/alpha) / (var_{t-1} t log(1 + t)))``, where ``var`` is the
    regularised running variance around the regularised running mean. The
    ``t log(1 + t)`` spreads the test's strength over all times rather than one
    sample size."""
    t = np.arange(1, x.shape[-1] + 1)
    mean = (PRIOR_MEAN + np.cumsum(x, axis=-1)) / (t + 1)
    variance = (PRIOR_VARIANCE + np.cumsum((x - mean) ** 2, axis=-1)) / (t + 1)
    before = np.concatenate([np.full(x.shape[:-1] + (1,), PRIOR_VARIANCE), variance[..., :-1]], axis=-1)
    return np.sqrt(2 * math.log(2 / alpha) / (before * t * np.log1p(t)))


def _log_capital(x: np.ndarray, bets: np.ndarray, means: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Log capital after each vote of the gambler betting the mean is above
    each of ``means`` and of the one betting below: shape ``x.shape + (len(means),)``.
    A bet is capped at ``TRUNCATION / m`` (``/ (1 - m)`` below) so that no vote
    can take more than that share of the capital."""
    excess = x[..., None] - means
    with np.errstate(divide="ignore"):
        up = np.minimum(bets[..., None], TRUNCATION / means)
        down = np.minimum(bets[..., None], TRUNCATION / (1 - means))
    return np.cumsum(np.log1p(up * excess), axis=-2), np.cumsum(np.log1p(-down * excess), axis=-2)


def _rule_out_level(alpha: float) -> float:
    """A gambler's log capital at which their mean is ruled out: each gambler
    holds half the stake (hedging weight 1/2), so 1/alpha overall is 2/alpha each."""
    return math.log(2 / alpha)


def _first_exclusions(x: np.ndarray, means: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Per run and mean, the first vote (from 1; 0 for never) after which the
    mean is ruled out from above (``x`` is above it) and from below."""
    above = np.zeros((x.shape[0], means.size), dtype=int)
    below = above.copy()
    if x.shape[1] == 0:
        return above, below
    level = _rule_out_level(alpha)
    rows = max(1, CHUNK_ELEMENTS // (x.shape[1] * means.size))
    for start in range(0, x.shape[0], rows):
        chunk = x[start:start + rows]
        up, down = _log_capital(chunk, _bets(chunk, alpha), means)
        above[start:start + rows], below[start:start + rows] = _first_true(up >= level), _first_true(down >= level)
    return above, below


def _first_true(hits: np.ndarray) -> np.ndarray:
    """Along axis 1: the 1-based index of the first True, 0 when none."""
    return np.where(hits.any(axis=1), hits.argmax(axis=1) + 1, 0)


def _not_before(first: np.ndarray, min_votes: int, n: int) -> np.ndarray:
    """A rule that first held at vote ``first`` (0: never) fires at vote
    ``max(first, min_votes)``; ``n + 1`` stands for never."""
    return np.where(first > 0, np.maximum(first, max(min_votes, 1)), n + 1)


def _interval(x: np.ndarray, alpha: float, anchors: Sequence[float]) -> tuple[float, float]:
    """The running-intersection interval after all of ``x``, its ends rounded
    outward. Peak capital over time is monotone in the mean, so each end is
    bracketed by the points known ruled out and those known not; ``anchors``
    (the rules' thresholds) are among the first points, so the ends agree
    exactly with the decisions taken at them."""
    if x.size == 0:
        return 0.0, 1.0
    bets, level = _bets(x, alpha), _rule_out_level(alpha)
    low_out, low_in = 0.0, 1.0  # low lies in [low_out, low_in): ruled out from above at low_out
    high_in, high_out = 0.0, 1.0  # high lies in (high_in, high_out]
    points = np.union1d(np.linspace(0, 1, FIRST_POINTS + 2)[1:-1], [a for a in anchors if 0 < a < 1])
    for _ in range(REFINE_ROUNDS + 1):
        up, down = _log_capital(x, bets, points)
        above, below = up.max(axis=0) >= level, down.max(axis=0) >= level
        low_out = max(low_out, points[above].max(initial=0.0))
        low_in = min(low_in, points[~above].min(initial=1.0))
        high_in = max(high_in, points[~below].max(initial=0.0))
        high_out = min(high_out, points[below].min(initial=1.0))
        points = np.concatenate([np.linspace(low_out, low_in, REFINE_POINTS + 2)[1:-1],
                                 np.linspace(high_in, high_out, REFINE_POINTS + 2)[1:-1]])
    if low_out > high_out:  # the votes fit no single mean (it drifted); show where the two ends met
        low_out = high_out = (low_out + high_out) / 2
    return float(low_out), float(high_out)


# --- arguments ----------------------------------------------------------------


def _scores(outcomes: Sequence[float], allowed: tuple[float, ...] | None, what: str) -> np.ndarray:
    return _runs([outcomes], allowed, what)[0] if len(outcomes) else np.zeros(0)


def _runs(runs: ArrayLike, allowed: tuple[float, ...] | None, what: str) -> np.ndarray:
    try:
        x = np.asarray(runs, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"each {what} must be a number: {exc}") from None
    if x.ndim != 2:
        raise ValueError(f"runs must be a 2-D array, one run of {what}s per row; got {x.ndim} dimensions")
    bad = ~np.isin(x, allowed) if allowed is not None else ~((x >= 0) & (x <= 1))
    if bad.any():
        row, column = (int(i) for i in np.argwhere(bad)[0])
        place = f"{what} {column + 1}" + (f" of run {row + 1}" if x.shape[0] > 1 else "")
        expected = {
            CANARY_SCORES: "1.0 (candidate preferred), 0.0 (active preferred) or 0.5 (tie or both bad)",
            THUMB_SCORES: "1 (thumbs up) or 0 (thumbs down)",
        }.get(allowed, "a number from 0 to 1")
        raise ValueError(f"{place} is {float(x[row, column])!r}; each {what} must be {expected}")
    return x


def _level(alpha: float) -> str:
    return f"{100 * (1 - alpha):g}%"


def _check_alpha(alpha: float) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be between 0 and 1 (e.g. 0.05 for 95% intervals), got {alpha!r}")


def _check_min_votes(min_votes: int) -> None:
    if min_votes < 0:
        raise ValueError(f"min_votes must be 0 or more, got {min_votes!r}")


def _check_canary_args(margin: float, alpha: float, min_votes: int, max_votes: int | None, default: str) -> None:
    if not 0 <= margin < NEUTRAL:
        raise ValueError(f"margin must be at least 0 and below 0.5 (a win score of 0.5 - margin must mean "
                         f"'acceptably worse'), got {margin!r}")
    _check_alpha(alpha)
    _check_min_votes(min_votes)
    if max_votes is not None and max_votes < max(min_votes, 1):
        raise ValueError(f"max_votes must be at least 1 and at least min_votes ({min_votes}), got {max_votes!r}")
    if default not in ("reject", "promote"):
        raise ValueError(f"default must be 'reject' (keep the active version) or 'promote', got {default!r}")


def _check_rate_args(baseline: float, margin: float, alpha: float, min_votes: int) -> None:
    if not 0 <= baseline <= 1:
        raise ValueError(f"baseline must be the previous version's up-rate, from 0 to 1, got {baseline!r}")
    if not 0 <= margin < 1:
        raise ValueError(f"margin must be at least 0 and below 1, got {margin!r}")
    _check_alpha(alpha)
    _check_min_votes(min_votes)
