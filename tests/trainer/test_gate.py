"""The evaluation gate and the training configuration: pure code, no model."""

from __future__ import annotations

import pytest

from trainer.config import TrainConfig
from trainer.evaluate import EvalMetrics, gate


def metrics(accuracy, margin, sanity, pairs=10) -> EvalMetrics:
    return EvalMetrics(preference_accuracy=accuracy, mean_margin=margin, chosen_nll=1.0, sanity_nll=sanity, pairs=pairs)


def test_gate_promotes_a_better_candidate():
    decision = gate(metrics(0.8, 0.5, 1.02), metrics(0.6, 0.1, 1.0), TrainConfig())
    assert decision.promote
    assert decision.numbers["candidate_accuracy"] == 0.8


def test_gate_refuses_lost_accuracy():
    decision = gate(metrics(0.5, 0.5, 1.0), metrics(0.6, 0.1, 1.0), TrainConfig())
    assert not decision.promote
    assert any("preference accuracy" in reason for reason in decision.reasons)


def test_gate_refuses_a_margin_that_did_not_grow():
    decision = gate(metrics(0.6, 0.1, 1.0), metrics(0.6, 0.1, 1.0), TrainConfig())
    assert not decision.promote
    assert any("margin" in reason for reason in decision.reasons)


def test_gate_refuses_a_sanity_regression():
    decision = gate(metrics(0.9, 0.9, 1.06), metrics(0.6, 0.1, 1.0), TrainConfig(gate_sanity_nll_tolerance=0.05))
    assert not decision.promote
    assert decision.reasons == [next(r for r in decision.reasons if "general answers got worse" in r)]


def test_gate_measures_the_sanity_budget_from_the_base_model():
    """Drift must not compound: an active adapter already 4 % worse than the base
    leaves a candidate only 1 % more, not another 5 %."""
    config = TrainConfig(gate_sanity_nll_tolerance=0.05)
    candidate, active = metrics(0.9, 0.9, 1.08), metrics(0.6, 0.1, 1.04)
    assert gate(candidate, active, config).promote  # relative to the active one: 1.08 <= 1.092
    decision = gate(candidate, active, config, base_sanity_nll=1.0)
    assert not decision.promote
    assert "base model 1.0000 + 5%" in decision.reasons[0]
    assert decision.numbers["max_sanity_nll"] == 1.05
    assert gate(metrics(0.9, 0.9, 1.045), active, config, base_sanity_nll=1.0).promote


def test_gate_requires_the_configured_accuracy_gain():
    config = TrainConfig(gate_min_accuracy_gain=0.1)
    assert not gate(metrics(0.65, 0.5, 1.0), metrics(0.6, 0.1, 1.0), config).promote
    assert gate(metrics(0.7, 0.5, 1.0), metrics(0.6, 0.1, 1.0), config).promote


def test_gate_refuses_without_held_out_pairs():
    empty = EvalMetrics(preference_accuracy=None, mean_margin=None, chosen_nll=None, sanity_nll=1.0, pairs=0)
    decision = gate(empty, empty, TrainConfig())
    assert not decision.promote
    assert any("no held-out pairs or single thumbs" in reason for reason in decision.reasons)


def test_gate_rejects_metrics_from_different_pair_sets():
    with pytest.raises(ValueError):
        gate(metrics(0.8, 0.5, 1.0, pairs=10), metrics(0.6, 0.1, 1.0, pairs=12), TrainConfig())


def test_config_round_trips_and_refuses_bad_values():
    config = TrainConfig(learning_rate=3e-4, epochs=1)
    assert TrainConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="unknown"):
        TrainConfig.from_json('{"lora_rank": 8}')
    with pytest.raises(ValueError, match="lora_r"):
        TrainConfig(lora_r=32)
    with pytest.raises(ValueError, match="max_prompt_length"):
        TrainConfig(max_length=128, max_prompt_length=128)


def test_gate_rejects_a_candidate_with_nan_scores():
    nan = float("nan")
    candidate = EvalMetrics(preference_accuracy=1.0, mean_margin=nan, chosen_nll=nan, sanity_nll=nan, pairs=4)
    active = EvalMetrics(preference_accuracy=0.5, mean_margin=0.1, chosen_nll=1.0, sanity_nll=1.0, pairs=4)
    decision = gate(candidate, active, TrainConfig(gate_min_margin_gain=-1e9, gate_sanity_nll_tolerance=100))
    assert not decision.promote and any("not finite" in r for r in decision.reasons)


# --- single thumbs (store.examples): scored against the base model ----------


def thumbs_metrics(logps, sanity=1.0, pairs=0) -> EvalMetrics:
    return EvalMetrics(preference_accuracy=None, mean_margin=None, chosen_nll=None, sanity_nll=sanity, pairs=pairs,
                       examples=len(logps), example_logps=list(logps))


def test_single_thumbs_are_scored_as_moves_from_the_base_model():
    base, labels = [-2.0, -2.0, -3.0, -3.0], [True, True, False, False]
    model = thumbs_metrics([-1.5, -2.5, -3.5, -3.0])  # up: +0.5 (right), -0.5 (wrong); down: -0.5 (right), 0 (tie)
    model.relative_to_base(base, labels)
    assert model.example_accuracy == pytest.approx(0.5)
    assert model.example_margin == pytest.approx((0.5 - 0.5 + 0.5 + 0.0) / 4)
    itself = thumbs_metrics(base)
    itself.relative_to_base(base, labels)
    assert (itself.example_accuracy, itself.example_margin) == (0.0, 0.0)
    assert "example_logps" not in model.to_dict()
    with pytest.raises(ValueError):
        model.relative_to_base(base[:3], labels[:3])


ONE_THUMB_IS_EVIDENCE = TrainConfig(gate_min_held_out_thumbs=1)


def scored(logps, base, labels, sanity=1.0):
    metrics = thumbs_metrics(logps, sanity)
    metrics.relative_to_base(base, labels)
    return metrics


def test_gate_promotes_on_single_thumbs_a_run_trained_on():
    base, labels = [-2.0, -2.0, -3.0], [True, True, False]
    candidate, active = scored([-1.0, -1.5, -3.5], base, labels), scored(base, base, labels)
    decision = gate(candidate, active, ONE_THUMB_IS_EVIDENCE, base_sanity_nll=1.0, trained=("examples",))
    assert decision.promote, decision.reasons
    assert decision.numbers["candidate_example_accuracy"] == 1.0 and "single thumbs" in decision.reasons[0]
    worse = scored([-2.5, -2.5, -2.0], base, labels)
    refused = gate(worse, active, ONE_THUMB_IS_EVIDENCE, base_sanity_nll=1.0, trained=("examples",))
    assert not refused.promote and any("single thumbs" in r for r in refused.reasons)


def test_gate_judges_only_what_the_run_trained_on():
    """Held-out thumbs of a run that trained on pairs only are reported, not
    gated; a run that trained on thumbs with none held out has no evidence."""
    base, labels = [-2.0, -3.0], [True, False]
    pairs_better = EvalMetrics(0.8, 0.5, 1.0, 1.0, 10, examples=2, example_logps=[-2.5, -2.0])
    pairs_active = EvalMetrics(0.6, 0.1, 1.0, 1.0, 10, examples=2, example_logps=list(base))
    for metrics in (pairs_better, pairs_active):
        metrics.relative_to_base(base, labels)
    assert gate(pairs_better, pairs_active, ONE_THUMB_IS_EVIDENCE, trained=("pairs",)).promote
    assert not gate(pairs_better, pairs_active, ONE_THUMB_IS_EVIDENCE, trained=("pairs", "examples")).promote
    no_thumbs_held_out = gate(thumbs_metrics([]), thumbs_metrics([]), ONE_THUMB_IS_EVIDENCE, trained=("examples",))
    assert not no_thumbs_held_out.promote
    assert any("no held-out pairs or single thumbs" in r for r in no_thumbs_held_out.reasons)


def test_too_few_held_out_thumbs_are_no_evidence():
    base, labels = [-2.0, -3.0], [True, False]
    candidate, active = scored([-1.0, -4.0], base, labels), scored(base, base, labels)
    decision = gate(candidate, active, TrainConfig(gate_min_held_out_thumbs=3), base_sanity_nll=1.0,
                    trained=("examples",))
    assert not decision.promote
    assert any("only 2 held-out single thumbs" in r for r in decision.reasons)
    assert gate(candidate, active, TrainConfig(gate_min_held_out_thumbs=2), base_sanity_nll=1.0,
                trained=("examples",)).promote
