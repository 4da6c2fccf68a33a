"""The always-valid canary test (``store/sequential.py``): its error rates and
votes needed, measured on simulated canaries checked after every vote, then
its edges and its arguments. Simulations use fixed seeds; run with ``-s`` to
see the measured rates (they are quoted in the README)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from store.sequential import (
    canary_decisions,
    canary_verdict,
    confidence_sequence,
    first_exclusions,
    rate_drop_decisions,
    rate_drop_verdict,
)

ALPHA = 0.05
MARGIN = 0.05
RUNS = 2000
MAX_VOTES = 1500
TIES = 0.2  # share of votes that are a tie or both bad
PROMOTE_WITHIN = 200  # a candidate at mu = 0.60 is promoted within this many votes in >= 80% of canaries
REJECT_WITHIN = 500  # a candidate at mu = 0.40 is rejected within this many votes in >= 80% of canaries


def canaries(mu: float, seed: int, runs: int = RUNS, votes: int = MAX_VOTES, ties: float = TIES) -> np.ndarray:
    """Votes of ``runs`` canaries whose candidate has win score ``mu``: a share
    ``ties`` of 0.5, the rest wins with the probability that makes the mean ``mu``."""
    rng = np.random.default_rng(seed)
    p_win = (mu - ties * 0.5) / (1 - ties)
    tied = rng.random((runs, votes)) < ties
    won = rng.random((runs, votes)) < p_win
    return np.where(tied, 0.5, won.astype(float))


def thumbs(rate: float, seed: int, runs: int = RUNS, votes: int = 1000) -> np.ndarray:
    return (np.random.default_rng(seed).random((runs, votes)) < rate).astype(float)


def share(mask: np.ndarray) -> float:
    return float(np.mean(mask))


def quantiles(votes: np.ndarray, unit: str = "votes") -> str:
    return f"median {np.median(votes):.0f}, 80th percentile {np.percentile(votes, 80):.0f} {unit}"


# --- error rates and votes needed, checked after every vote ----------------------


def test_a_candidate_worse_by_the_margin_is_promoted_at_most_alpha():
    decided = canary_decisions(canaries(0.5 - MARGIN, seed=1), margin=MARGIN, alpha=ALPHA, max_votes=MAX_VOTES)
    promoted = share(decided.outcome == "promote")
    print(f"\nmu = {0.5 - MARGIN}: promoted in {promoted:.2%} of {RUNS} canaries (alpha {ALPHA})")
    assert promoted <= ALPHA


def test_an_equal_candidate_is_shown_worse_at_most_alpha():
    decided = canary_decisions(canaries(0.5, seed=2), margin=MARGIN, alpha=ALPHA, max_votes=MAX_VOTES)
    shown_worse = share((decided.outcome == "reject") & ~decided.limit_reached)
    print(f"\nmu = 0.5: shown worse (rejected on evidence) in {shown_worse:.2%}; "
          f"promoted in {share(decided.outcome == 'promote'):.2%} within {MAX_VOTES} votes")
    assert shown_worse <= ALPHA


def test_a_better_candidate_is_promoted_within_the_stated_votes():
    decided = canary_decisions(canaries(0.6, seed=3), margin=MARGIN, alpha=ALPHA, max_votes=MAX_VOTES)
    promoted = decided.outcome == "promote"
    within = share(promoted & (decided.votes <= PROMOTE_WITHIN))
    print(f"\nmu = 0.6: promoted in {share(promoted):.2%}, within {PROMOTE_WITHIN} votes in {within:.2%}; "
          f"votes to promotion: {quantiles(decided.votes[promoted])}")
    assert within >= 0.8


def test_a_worse_candidate_is_rejected_within_the_stated_votes():
    decided = canary_decisions(canaries(0.4, seed=4), margin=MARGIN, alpha=ALPHA, max_votes=MAX_VOTES)
    rejected = (decided.outcome == "reject") & ~decided.limit_reached
    within = share(rejected & (decided.votes <= REJECT_WITHIN))
    print(f"\nmu = 0.4: rejected on evidence in {share(rejected):.2%}, within {REJECT_WITHIN} votes in {within:.2%}; "
          f"votes to rejection: {quantiles(decided.votes[rejected])}")
    assert within >= 0.8
    assert share(decided.outcome == "promote") <= ALPHA


def test_require_better_promotes_an_equal_candidate_at_most_alpha():
    decided = canary_decisions(canaries(0.5, seed=5), margin=MARGIN, alpha=ALPHA, max_votes=MAX_VOTES,
                               require_better=True)
    promoted = share(decided.outcome == "promote")
    print(f"\nmu = 0.5, require_better: promoted in {promoted:.2%}")
    assert promoted <= ALPHA


@pytest.mark.parametrize(("mu", "ties"), [(0.55, TIES), (0.3, 0.0)])
def test_the_interval_covers_the_true_mean_at_every_vote(mu, ties):
    above, below = first_exclusions(canaries(mu, seed=6, ties=ties), mu, alpha=ALPHA)
    covered = share((above == 0) & (below == 0))
    print(f"\nmu = {mu}, ties {ties:.0%}: covered at all {MAX_VOTES} votes in {covered:.2%} of {RUNS} runs")
    assert covered >= 1 - ALPHA


def test_a_rate_drop_by_twice_the_margin_plus_is_caught():
    baseline = 0.7
    decided = rate_drop_decisions(thumbs(baseline - 0.2, seed=7), baseline, margin=MARGIN, alpha=ALPHA)
    caught = decided.outcome == "reject"
    print(f"\nup-rate {baseline - 0.2:.1f} vs baseline {baseline}: rolled back in {share(caught):.2%} within 1000 "
          f"thumbs; thumbs to rollback: {quantiles(decided.votes[caught], 'thumbs')}")
    assert share(caught) >= 0.95


@pytest.mark.parametrize("rate", [0.7, 0.65])
def test_a_version_at_the_baseline_or_within_the_margin_is_rarely_rolled_back(rate):
    decided = rate_drop_decisions(thumbs(rate, seed=8), 0.7, margin=MARGIN, alpha=ALPHA)
    flagged = share(decided.outcome == "reject")
    print(f"\nup-rate {rate} vs baseline 0.7: rolled back in {flagged:.2%} within 1000 thumbs")
    assert flagged <= ALPHA


# --- the verdict agrees with the batch rule, and its interval with both ----------


def test_each_verdict_is_the_batch_decision_with_a_consistent_interval():
    runs = np.concatenate([canaries(mu, seed=9, runs=15, votes=600) for mu in (0.35, 0.45, 0.5, 0.55, 0.65)])
    decided = canary_decisions(runs, max_votes=400)
    for row, outcome, votes, limit in zip(runs, *decided, strict=True):
        verdict = canary_verdict(row, max_votes=400)
        assert (verdict.outcome, verdict.votes, verdict.limit_reached) == (outcome, votes, limit)
        assert verdict.wins + verdict.losses + verdict.ties == verdict.votes
        if verdict.outcome == "promote":
            assert verdict.low >= 0.5 - MARGIN
        elif not verdict.limit_reached:
            assert verdict.high <= 0.5
        else:
            assert verdict.low < 0.5 - MARGIN and verdict.high > 0.5


def test_the_interval_only_shrinks_and_matches_the_exclusions():
    run = canaries(0.55, seed=10, runs=1, votes=400)[0]
    previous = (0.0, 1.0)
    for votes in range(10, 401, 30):
        low, high = confidence_sequence(run[:votes])
        assert previous[0] <= low <= high <= previous[1]
        previous = (low, high)
        for mean in (0.3, 0.45, 0.5, 0.6, 0.7):
            above, below = (int(a[0]) for a in first_exclusions(run[None, :votes], mean))
            assert (above > 0) == (mean <= low + 1e-5)
            assert (below > 0) == (mean >= high - 1e-5)


def test_more_votes_after_a_decision_do_not_change_it():
    votes = [1.0] * 30
    decided = canary_verdict(votes)
    assert canary_verdict(votes + [0.0] * 200) == decided


# --- edges -----------------------------------------------------------------------


def test_no_votes():
    verdict = canary_verdict([])
    assert (verdict.outcome, verdict.votes, verdict.estimate, verdict.low, verdict.high) == ("continue", 0, None, 0, 1)
    assert confidence_sequence([]) == (0.0, 1.0)
    assert rate_drop_verdict([], 0.7).outcome == "continue"


def test_all_ties_show_non_inferiority_but_never_betterness():
    verdict = canary_verdict([0.5] * 300)
    assert verdict.outcome == "promote" and verdict.ties == verdict.votes and verdict.estimate == 0.5
    print(f"\nall ties: promoted as non-inferior after {verdict.votes} votes")
    strict = canary_verdict([0.5] * 300, require_better=True)
    assert strict.outcome == "continue" and strict.votes == 300 and strict.low < 0.5 < strict.high


def test_no_verdict_before_min_votes():
    above, _ = first_exclusions([[1.0] * 20], 0.5 - MARGIN)
    assert 0 < above[0] < 20  # the evidence is there early...
    early = canary_verdict([1.0] * 19, min_votes=20)
    assert early.outcome == "continue" and "19 of the 20 votes" in early.reason
    assert canary_verdict([1.0] * 20, min_votes=20).votes == 20  # ...the verdict waits for min_votes
    assert canary_verdict([0.0] * 19, min_votes=20).outcome == "continue"
    assert canary_verdict([1.0] * 20, min_votes=0).votes == above[0]


def test_max_votes_applies_the_default():
    ties = [0.5] * 60
    kept = canary_verdict(ties, require_better=True, max_votes=50)
    assert (kept.outcome, kept.votes, kept.limit_reached) == ("reject", 50, True)
    assert "limit of 50 votes" in kept.reason and "keeps the active version" in kept.reason
    promoted = canary_verdict(ties, require_better=True, max_votes=50, default="promote")
    assert (promoted.outcome, promoted.limit_reached) == ("promote", True)
    assert canary_verdict(ties[:49], require_better=True, max_votes=50).outcome == "continue"


def test_reject_wins_when_both_rules_first_hold_at_once():
    # A candidate slightly worse (0.475) with few losses: non-inferior and worse both show long before vote 6000.
    votes = ([0.5] * 19 + [0.0]) * 300
    non_inferior, _ = first_exclusions([votes], 0.5 - MARGIN)
    _, worse = first_exclusions([votes], 0.5)
    assert 0 < non_inferior[0] < 6000 and 0 < worse[0] < 6000
    verdict = canary_verdict(votes, min_votes=6000)
    assert verdict.votes == 6000 and verdict.low >= 0.5 - MARGIN and verdict.high <= 0.5
    assert verdict.outcome == "reject"


def test_the_verdict_serialises_with_its_reason():
    verdict = canary_verdict([1.0] * 25 + [0.5] * 5)
    data = verdict.to_json()
    assert data["outcome"] == "promote" and data["wins"] == 20 and data["ties"] == 0 and data["votes"] == 20
    assert "entirely at or above 0.45" in data["reason"]
    drop = rate_drop_verdict([0.0] * 30, 0.7).to_json()
    assert drop["outcome"] == "reject" and drop["downs"] == 20 and "Roll back" in drop["reason"]


@pytest.mark.parametrize("votes", [[1.0, 0.7], [2.0], [-1.0], [math.nan], ["a"]])
def test_a_vote_that_is_not_a_score_is_refused(votes):
    with pytest.raises(ValueError, match="vote|number"):
        canary_verdict(votes)


def test_thumbs_must_be_up_or_down_and_intervals_take_any_score():
    with pytest.raises(ValueError, match=r"thumb 2 is 0\.5; each thumb must be 1 \(thumbs up\) or 0"):
        rate_drop_verdict([1.0, 0.5], 0.7)
    assert confidence_sequence([0.25, 0.75] * 10)[0] < 0.5
    with pytest.raises(ValueError, match="number from 0 to 1"):
        confidence_sequence([0.2, 1.5])


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"margin": -0.01}, "margin"),
        ({"margin": 0.5}, "margin"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 1.0}, "alpha"),
        ({"min_votes": -1}, "min_votes"),
        ({"max_votes": 10}, "max_votes"),
        ({"max_votes": 0, "min_votes": 0}, "max_votes"),
        ({"default": "continue"}, "default"),
    ],
)
def test_bad_arguments_are_refused(arguments, message):
    with pytest.raises(ValueError, match=message):
        canary_verdict([1.0], **arguments)


@pytest.mark.parametrize(
    ("baseline", "arguments", "message"),
    [(1.2, {}, "baseline"), (0.7, {"margin": 1.0}, "margin"), (0.7, {"alpha": 2}, "alpha")],
)
def test_bad_rate_drop_arguments_are_refused(baseline, arguments, message):
    with pytest.raises(ValueError, match=message):
        rate_drop_verdict([1.0], baseline, **arguments)
