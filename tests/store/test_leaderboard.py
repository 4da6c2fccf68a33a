"""The leaderboard's statistics (store/leaderboard.py) on synthetic votes from
voters whose preferences are known: the fit ranks, intervals, the position and
length terms, ties, versions without cross-version votes, Wilson intervals."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from store.leaderboard import (
    ANCHOR_SCORE,
    ThumbCount,
    Vote,
    build_leaderboard,
    fit_bradley_terry,
    rate_versions,
    score_history,
    wilson_interval,
)

START = datetime(2026, 11, 1, tzinfo=timezone.utc)


def simulate(
    strength: dict[str, float], n: int, seed: int, *, position: float = 0.0, length_pref: float = 0.0,
    lengths: dict[str, tuple[int, int]] | None = None,
) -> list[Vote]:
    """``n`` votes between random pairs of versions, sides at random, from a
    voter whose log-odds of picking A are (strength A − strength B) + position
    + length_pref · (len A − len B) / (len A + len B). Lengths are uniform in
    each version's range."""
    rng = np.random.default_rng(seed)
    names = sorted(strength)
    ranges = lengths or {v: (100, 400) for v in names}
    votes = []
    for i in range(n):
        first, second = rng.choice(len(names), 2, replace=False)
        a, b = names[first], names[second]
        la, lb = int(rng.integers(*ranges[a])), int(rng.integers(*ranges[b]))
        z = strength[a] - strength[b] + position + length_pref * (la - lb) / (la + lb)
        winner = "a" if rng.random() < 1 / (1 + math.exp(-z)) else "b"
        votes.append(Vote(a, b, winner, la, lb, START + timedelta(minutes=i)))
    return votes


def test_a_clearly_stronger_version_ranks_first_and_its_interval_excludes_the_others():
    ratings = rate_versions(simulate({"base": 0.0, "v1": 0.3, "v2": 1.5}, 300, seed=1))
    scores = ratings.fit.scores
    assert scores["base"] == ANCHOR_SCORE
    assert max(scores, key=lambda v: scores[v]) == "v2"
    v2 = ratings.score_intervals["v2"]
    assert v2.low <= scores["v2"] <= v2.high
    assert v2.low > scores["v1"] and v2.low > scores["base"]
    # 1.5 log-odds is 261 points on the Elo scale
    assert 1180 < scores["v2"] < 1340


def test_the_position_term_recovers_a_voter_who_favours_the_left_answer():
    ratings = rate_versions(simulate({"base": 0.0, "v1": 0.0}, 600, seed=2, position=0.8))
    assert ratings.fit.position == pytest.approx(0.8, abs=0.2)
    assert ratings.position_interval.low > 0.3  # clearly not zero
    assert ratings.position_interval.low <= 0.8 <= ratings.position_interval.high
    v1 = ratings.score_intervals["v1"]
    assert v1.low <= ANCHOR_SCORE <= v1.high  # equal versions stay together


def test_style_control_does_not_separate_equal_versions_of_different_lengths():
    """The voter only likes long answers; base writes them. Without the length
    covariate base looks far better; with it the two are not separated and the
    voter's taste lands in the length term."""
    votes = simulate({"base": 0.0, "v1": 0.0}, 800, seed=3, length_pref=3.0,
                     lengths={"base": (200, 600), "v1": (50, 250)})
    controlled = rate_versions(votes)
    v1 = controlled.score_intervals["v1"]
    assert v1.low <= ANCHOR_SCORE <= v1.high
    assert controlled.length_interval is not None and controlled.length_interval.low > 1.0
    assert controlled.fit.length == pytest.approx(3.0, abs=1.0)

    plain = rate_versions(votes, style_control=False)
    assert plain.fit.length is None and plain.length_interval is None
    assert plain.score_intervals["v1"].high < ANCHOR_SCORE - 100


def test_a_tie_and_both_bad_are_half_a_win_each():
    votes = simulate({"base": 0.0, "v1": 0.7}, 120, seed=4)
    as_ties = [Vote(v.version_a, v.version_b, "tie" if i % 3 == 0 else v.winner, v.length_a, v.length_b)
               for i, v in enumerate(votes)]
    as_both_bad = [Vote(v.version_a, v.version_b, "both_bad" if v.winner == "tie" else v.winner,
                        v.length_a, v.length_b) for v in as_ties]
    assert fit_bradley_terry(as_ties).scores == pytest.approx(fit_bradley_terry(as_both_bad).scores)
    only_ties = [Vote("base", "v1", "tie", 100, 100), Vote("v1", "base", "tie", 100, 100)]
    assert fit_bradley_terry(only_ties).scores["v1"] == pytest.approx(ANCHOR_SCORE)


def test_one_sided_votes_stay_finite_and_the_fit_is_reproducible():
    votes = [Vote("v1", "base", "a", 100, 100), Vote("base", "v1", "b", 100, 100)] * 3
    first, again = rate_versions(votes), rate_versions(votes)
    assert ANCHOR_SCORE < first.fit.scores["v1"] < ANCHOR_SCORE + 1500
    assert first == again  # a fixed seed: the same intervals on every page load


def test_versions_without_cross_version_votes_are_listed_without_a_score():
    votes = [*simulate({"base": 0.0, "v1": 0.5}, 40, seed=5),
             Vote("v2", "v2", "a", 10, 20), Vote("v2", "v2", "tie", 10, 20), Vote("v1", "v2", None, 5, 5)]
    board = build_leaderboard(votes, [], served=["base", "v1", "v2", "v3"], active="v2", resamples=20)
    rows = {row.version: row for row in board.standings}
    assert [row.version for row in board.standings[:2]] == sorted(["base", "v1"], key=lambda v: -rows[v].score)
    assert board.votes == 40 and board.same_version_votes == 2
    assert rows["v2"].score is None and rows["v2"].rank is None and rows["v2"].active
    assert "only compared with itself (2 votes)" in rows["v2"].note
    assert rows["v3"].score is None and "no A/B votes" in rows["v3"].note
    assert [row.version for row in board.standings[2:]] == ["v2", "v3"]
    assert rows["base"].note is None and rows["v1"].note is None


def test_an_empty_store_gives_a_leaderboard_without_scores():
    board = build_leaderboard([], [], served=["base"], active="base")
    assert board.ratings is None and board.history == [] and board.votes == 0
    assert [(row.version, row.score, row.active) for row in board.standings] == [("base", None, True)]
    assert board.to_json()["position"] is None


def test_versions_no_vote_chain_links_to_base_say_so():
    votes = [Vote("base", "v1", "a", 1, 1), Vote("v1", "base", "a", 1, 1),
             Vote("v2", "v3", "a", 1, 1), Vote("v3", "v2", "b", 1, 1)]
    board = build_leaderboard(votes, [], served=["base", "v1", "v2", "v3"], active="v3", resamples=20)
    notes = {row.version: row.note for row in board.standings}
    assert notes["base"] is None and notes["v1"] is None
    assert "no chain of A/B votes links it to base" in notes["v2"] and "links it to base" in notes["v3"]


def test_without_base_the_scored_versions_average_the_anchor():
    fit = fit_bradley_terry(simulate({"v1": 0.0, "v2": 1.0}, 60, seed=6))
    assert fit.anchor is None
    assert sum(fit.scores.values()) / 2 == pytest.approx(ANCHOR_SCORE)


def test_history_refits_as_the_votes_accumulate():
    votes = simulate({"base": 0.0, "v1": 1.0}, 50, seed=7)
    history = score_history(list(reversed(votes)), points=5)
    assert [p.votes for p in history] == [10, 20, 30, 40, 50]
    assert history[0].at == votes[9].decided_at  # in the order they were decided
    assert history[-1].scores == pytest.approx(fit_bradley_terry(votes).scores)
    assert len(score_history(votes[:3], points=12)) == 3


def test_thumbs_rate_has_scipys_wilson_interval():
    z = 1.959963984540054
    for up, n in [(7, 10), (1, 3), (40, 41)]:
        p = up / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        interval = wilson_interval(up, n)
        assert (interval.low, interval.high) == pytest.approx((centre - half, centre + half))
    assert wilson_interval(0, 5).low == pytest.approx(0.0) and wilson_interval(5, 5).high == pytest.approx(1.0)
    assert wilson_interval(0, 0) is None

    board = build_leaderboard([], [ThumbCount("v1", 7, 3)], served=["base", "v1"], active="v1")
    v1 = next(row for row in board.standings if row.version == "v1")
    assert (v1.up, v1.down, v1.thumbs, v1.up_rate) == (7, 3, 10, 0.7)
    assert v1.up_interval == wilson_interval(7, 10)
