"""How many optimizer steps a run takes: its epochs, capped by max_steps."""

from __future__ import annotations

import pytest

from trainer.config import TrainConfig
from trainer.orpo import step_budget


@pytest.mark.parametrize(
    ("pairs", "max_steps", "expected"),
    [
        (10, 32, 5),     # 2 epochs x 10 pairs / batch 4 = 5 steps: a small night gets its passes
        (200, 32, 32),   # 100 steps' worth is capped
        (1, 32, 1),
        (200, -1, -1),   # no cap: the trainer runs the epochs
    ],
)
def test_epochs_decide_up_to_the_cap(pairs, max_steps, expected):
    assert step_budget(TrainConfig(epochs=2, batch_size=4, max_steps=max_steps), pairs) == expected


def test_gradient_accumulation_counts_pairs_per_optimizer_step():
    assert step_budget(TrainConfig(epochs=1, batch_size=2, grad_accum=4, max_steps=32), 80) == 10
