"""How much the gate knows: a paired comparison of candidate and active adapter
on the same held-out items, with an interval instead of two point estimates.

Each held-out pair (or single thumb) gives one number per model: its margin
(chosen over rejected) or its signed reward. The candidate is compared with
the active adapter item by item: ``d_i = candidate_i - active_i``. A mean
difference of +0.1 on three pairs is no evidence; on forty pairs that almost
all moved the right way it is. So the gate asks for

- a minimum number of held-out items (``TUNELOOP_GATE_MIN_HELD_OUT_PAIRS``,
  ``TUNELOOP_GATE_MIN_HELD_OUT_THUMBS``), and
- a confidence statement: the lower end of the paired-bootstrap interval of
  the mean difference (``TUNELOOP_GATE_CONFIDENCE``, 95 % by default,
  percentile interval over resampled items, fixed seed so a decision can be
  replayed) above the required gain.

The exact one-sided sign test (how often the candidate moved an item the
right way, ties left out) is reported beside it, as a check that does not
lean on the sizes of a few items. numpy does the resampling; the binomial
tail is exact (``math.comb``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

RESAMPLES = 4000
SEED = 20261202


@dataclass(frozen=True)
class PairedEvidence:
    """Candidate minus active over ``items`` held-out items."""

    items: int
    mean_gain: float
    low: float
    high: float
    confidence: float
    better: int
    """Items the candidate scored higher on."""
    worse: int
    sign_test_p: float
    """One-sided exact sign test: P(at least ``better`` of ``better + worse`` by chance)."""

    def to_numbers(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}_{name}": value for name, value in asdict(self).items()}

    def describe(self) -> str:
        return (f"gain {self.mean_gain:+.4f} [{self.confidence:.0%} interval {self.low:+.4f}, {self.high:+.4f}], "
                f"better on {self.better} of {self.items} (sign test p {self.sign_test_p:.3g})")


def paired_evidence(candidate: Sequence[float], active: Sequence[float], confidence: float = 0.95,
                    resamples: int = RESAMPLES, seed: int = SEED) -> PairedEvidence:
    """The paired bootstrap interval of ``mean(candidate - active)`` and the sign test."""
    if len(candidate) != len(active):
        raise ValueError(f"{len(candidate)} candidate scores against {len(active)} active ones: score both on "
                         "the same held-out items")
    if not candidate:
        raise ValueError("no held-out items to compare")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, not {confidence}")
    gains = np.asarray(candidate, dtype=float) - np.asarray(active, dtype=float)
    rng = np.random.default_rng(seed)
    means = gains[rng.integers(0, len(gains), size=(resamples, len(gains)))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    better, worse = int((gains > 0).sum()), int((gains < 0).sum())
    return PairedEvidence(
        items=len(gains), mean_gain=float(gains.mean()), low=float(low), high=float(high), confidence=confidence,
        better=better, worse=worse, sign_test_p=sign_test(better, worse),
    )


def sign_test(better: int, worse: int) -> float:
    """P(X >= better) for X ~ Binomial(better + worse, 1/2); 1.0 with no untied item."""
    n = better + worse
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(better, n + 1)) / 2**n
