"""Interpolating a candidate toward the base model (trainer.interpolate): the
pure choice of a scale, and on the real small model that a scaled folder is
exactly the scaled update."""

from __future__ import annotations

import pytest

from tests.trainer.test_trainer_core import MODEL, load_tensors, make_pairs
from trainer.config import TrainConfig
from trainer.evaluate import evaluate_model, load_sanity_set
from trainer.interpolate import choose_scale, parse_scales, scale_adapter, scale_lora_b
from trainer.orpo import train_adapter


def test_the_largest_scale_within_the_budget_wins():
    nll = {1.0: 1.30, 0.75: 1.12, 0.5: 1.04, 0.25: 1.01}
    scale, trials = choose_scale(nll.__getitem__, 1.05, (0.25, 1.0, 0.5, 0.75))
    assert scale == 0.5 and [t["scale"] for t in trials] == [1.0, 0.75, 0.5]
    assert choose_scale(nll.__getitem__, 2.0, (1.0, 0.5)) == (1.0, [{"scale": 1.0, "sanity_nll": 1.30}])
    nothing_fits = choose_scale(nll.__getitem__, 0.9, (1.0, 0.5))
    assert nothing_fits[0] == 1.0 and len(nothing_fits[1]) == 2  # the gate refuses it on its sanity


def test_scales_are_checked_where_they_are_set():
    assert parse_scales("0.5, 0.75") == (1.0, 0.75, 0.5)
    assert parse_scales("1") == (1.0,)
    for bad in ("0", "1.5", "half"):
        with pytest.raises(ValueError, match=r"in \(0, 1\]"):
            parse_scales(bad)
    with pytest.raises(ValueError, match="invalid training configuration"):
        TrainConfig(interpolation_scales="0.5,2")


def test_only_lora_b_matrices_scale():
    import torch

    tensors = {"x.lora_A.weight": torch.ones(2, 2), "x.lora_B.weight": torch.ones(2, 2)}
    assert scale_lora_b(tensors, 0.5) == 1
    assert tensors["x.lora_A.weight"].sum() == 4 and tensors["x.lora_B.weight"].sum() == 2
    with pytest.raises(ValueError, match="not a LoRA adapter"):
        scale_lora_b({"w": torch.ones(1)}, 0.5)


def test_a_scaled_folder_is_the_base_plus_the_scaled_update(tmp_path):
    config = TrainConfig(max_length=128, max_prompt_length=96, batch_size=2, max_steps=2, learning_rate=1e-3)
    out = tmp_path / "v1"
    train_adapter(MODEL, None, make_pairs()[:4], out, config)
    sanity = load_sanity_set()[:6]
    base = evaluate_model(MODEL, None, [], sanity).sanity_nll
    full = evaluate_model(MODEL, str(out), [], sanity).sanity_nll
    half_in_memory = evaluate_model(MODEL, str(out), [], sanity, scale=0.5).sanity_nll
    before = load_tensors(out)
    scale_adapter(out, 0.5)
    after = load_tensors(out)
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        expected = tensor * 0.5 if "lora_B" in name else tensor
        assert after[name].allclose(expected), name
    half_on_disk = evaluate_model(MODEL, str(out), [], sanity).sanity_nll
    assert half_on_disk == pytest.approx(half_in_memory, abs=1e-5)
    # training moved the model, and half its update is another model (NLL need not be monotone in the scale)
    assert full != pytest.approx(base, abs=1e-4) and half_on_disk != pytest.approx(full, abs=1e-4)
