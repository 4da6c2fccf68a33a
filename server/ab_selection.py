"""Which chat turns become A/B turns (``TUNELOOP_AB_SELECTION``).

An A/B turn teaches something only when its two answers differ in what the
user judges; near-identical pairs make no pair at all (``store.pairs``). With
``uncertainty`` the A/B budget goes preferably to prompts the model is unsure
how to answer, where two samples are likelier to differ:

- a short greedy probe of the answer (``ChatEngine.uncertainty``: the mean
  next-token entropy over its first tokens) measures the prompt, u;
- the turn is compared with probability ``p = min(1, c * u)``, where ``c`` is
  chosen so that the mean of ``p`` over the last :data:`WINDOW` probed turns
  is exactly ``TUNELOOP_AB_RATE`` (without clipping, ``c = rate / mean u``):
  the long-run share of A/B turns stays the rate, and a prompt twice as
  uncertain as usual is twice as likely to be compared. (A window rather than
  an exponential mean: it lets ``c`` be solved exactly when very uncertain
  prompts clip at 1, so clipping never shrinks the budget.)
- a probe that fails (engine unavailable, invalid request) or takes longer
  than :data:`PROBE_TIMEOUT_S` decides as ``random`` does, and is not
  remembered: the chat never fails or waits long because of it.

``random`` compares each turn with probability ``TUNELOOP_AB_RATE`` and
probes nothing; so do rates 0 and 1 in either mode.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from server.engine.base import PROBE_TOKENS, AdapterRef, ChatEngine

log = logging.getLogger("tuneloop.ab_selection")

MODES = ("random", "uncertainty")
PROBE_TIMEOUT_S = 1.0  # the longest a turn waits for the probe before deciding at random
WINDOW = 256  # probed turns the rate is kept over (and uncertainty is measured against)


@dataclass(frozen=True)
class AbDecision:
    """Whether a turn is compared, with what probability and on what basis:
    ``uncertainty`` (probed: ``uncertainty`` is the probe's value), ``random``
    (the mode, or a rate of 0 or 1), ``fallback`` (the probe failed or was too
    slow; decided as ``random``), or ``canary`` / ``watch`` (the active version
    against ``challenger``: ``AnswerService.decide_ab``)."""

    compare: bool
    probability: float
    basis: str
    uncertainty: float | None = None
    # the version pitted against the active one (basis "canary" or "watch",
    # store.canary): one side of the A/B turn, or the single answer (canary traffic)
    challenger: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


def scale_for_rate(rate: float, uncertainties: Iterable[float]) -> float | None:
    """The ``c`` for which the mean of ``min(1, c * u)`` over ``uncertainties``
    is ``rate``; ``math.inf`` when even ``p = 1`` for every positive ``u``
    falls short of it, None when no ``u`` is positive (nothing to rank by).

    >>> scale_for_rate(0.25, [1.0, 1.0, 2.0])  # mean of c*u is 0.25
    0.1875
    >>> scale_for_rate(0.5, [10.0, 1.0, 1.0, 0.0])  # 10 clips at 1: (1 + 2c) / 4 = 0.5
    0.5
    """
    values = list(uncertainties)
    ordered = sorted((u for u in values if u > 0), reverse=True)
    if not ordered:
        return None
    n = len(values)
    rest = sum(ordered)
    for clipped, top in enumerate(ordered):  # the ``clipped`` largest are at p = 1
        scale = (rate * n - clipped) / rest
        if scale * top <= 1.0:
            return scale
        rest -= top
    return math.inf


class AbSelector:
    """Decides, turn by turn, whether a chat turn is an A/B turn (see the module
    doc). One per server; used from the event loop."""

    def __init__(
        self, engine: ChatEngine, rate: float, mode: str = "random", *,
        timeout_s: float = PROBE_TIMEOUT_S, probe_tokens: int = PROBE_TOKENS, rng: random.Random | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"A/B selection must be one of {', '.join(MODES)}, not {mode!r}")
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"the A/B rate must be between 0 and 1, not {rate}")
        self.engine = engine
        self.rate = rate
        self.mode = mode
        self.timeout_s = timeout_s
        self.probe_tokens = probe_tokens
        self.rng = rng or random.Random()
        self.recent: deque[float] = deque(maxlen=WINDOW)

    async def decide(self, messages: list[dict[str, str]], adapter: AdapterRef | None = None) -> AbDecision:
        """Whether the answer to ``messages`` (the context, ending with the user's
        message) is an A/B turn. Never raises for the engine's sake: a failed or
        slow probe decides at random (``basis="fallback"``)."""
        if self.mode == "random" or self.rate in (0.0, 1.0):
            return self._at_random("random")
        try:
            u = await asyncio.wait_for(
                self.engine.uncertainty(messages, adapter, self.probe_tokens), timeout=self.timeout_s
            )
        except Exception as exc:  # EngineUnavailable, TimeoutError, ValueError, AdapterLoadError, ...
            log.info("A/B selection: uncertainty probe failed (%s: %s); deciding at random", type(exc).__name__, exc)
            return self._at_random("fallback")
        return self.decide_for(u)

    def decide_for(self, uncertainty: float) -> AbDecision:
        """The decision for a turn whose probe measured ``uncertainty``; it joins
        the window the rate is kept over. (``decide`` without the engine: used
        by ``bench/learning.py --selection-only`` to replay measured prompts.)"""
        if not math.isfinite(uncertainty) or uncertainty < 0:
            return self._at_random("fallback")
        self.recent.append(uncertainty)
        scale = scale_for_rate(self.rate, self.recent)
        if scale is None:  # no prompt in the window is uncertain at all: nothing to prefer
            p = self.rate
        elif uncertainty > 0:
            p = min(1.0, scale * uncertainty)
        else:
            p = 0.0
        return AbDecision(self.rng.random() < p, round(p, 6), "uncertainty", uncertainty)

    def _at_random(self, basis: str) -> AbDecision:
        return AbDecision(self.rng.random() < self.rate, self.rate, basis)
