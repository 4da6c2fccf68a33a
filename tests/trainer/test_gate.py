"""The evaluation gate and the training configuration: pure code, no model."""

from __future__ import annotations

import random

import pytest

from trainer.confidence import paired_evidence, sign_test
from trainer.config import TrainConfig
from trainer.evaluate import EvalMetrics, gate


def metrics(accuracy, margin, sanity, pairs=10, **more) -> EvalMetrics:
    """Scores whose per-pair margins spread around ``margin`` in the same way
    for every model: the gain over another model is the same on every pair."""
    spread = [0.2 * ((i % 3) - 1) for i in range(pairs)]
    return EvalMetrics(preference_accuracy=accuracy, mean_margin=margin, chosen_nll=1.0, sanity_nll=sanity, pairs=pairs,
                       pair_margins=[margin + d for d in spread], **more)


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
    pairs_better = metrics(0.8, 0.5, 1.0, examples=2, example_logps=[-2.5, -2.0])
    pairs_active = metrics(0.6, 0.1, 1.0, examples=2, example_logps=list(base))
    for scores in (pairs_better, pairs_active):
        scores.relative_to_base(base, labels)
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


# --- how much the gate knows (trainer.confidence) ------------------------------


def test_too_few_held_out_pairs_make_the_run_wait():
    decision = gate(metrics(0.9, 0.9, 1.0, pairs=5), metrics(0.5, 0.1, 1.0, pairs=5), TrainConfig())
    assert not decision.promote
    assert any("only 5 held-out pairs; the gate needs 8" in r and "waits" in r for r in decision.reasons)
    assert gate(metrics(0.9, 0.9, 1.0, pairs=5), metrics(0.5, 0.1, 1.0, pairs=5),
                TrainConfig(gate_min_held_out_pairs=5)).promote


def test_a_mean_gain_a_few_pairs_could_give_by_chance_does_not_promote():
    """Same accuracy and the same mean margin gain (+0.05) twice: on ten pairs
    that swing +-0.9 the interval holds 0; on ten that all gained it does not."""
    active = metrics(0.6, 0.1, 1.0)
    swings = [0.95, -0.85] * 5
    noisy = EvalMetrics(preference_accuracy=0.6, mean_margin=0.15, chosen_nll=1.0, sanity_nll=1.0, pairs=10,
                        pair_margins=[a + d for a, d in zip(active.pair_margins, swings, strict=True)])
    refused = gate(noisy, active, TrainConfig())
    assert not refused.promote
    assert any("not shown to grow" in r and "better on 5 of 10" in r for r in refused.reasons), refused.reasons
    assert refused.numbers["pairs_low"] < 0 < refused.numbers["pairs_high"]
    steady = gate(metrics(0.6, 0.15, 1.0), active, TrainConfig())
    assert steady.promote, steady.reasons
    assert steady.numbers["pairs_mean_gain"] == pytest.approx(0.05)
    assert steady.numbers["pairs_low"] == pytest.approx(0.05) and steady.numbers["pairs_better"] == 10
    assert "interval" in steady.reasons[0]


def test_paired_evidence_interval_and_sign_test():
    rng = random.Random(7)
    few = [rng.gauss(0.1, 1.0) for _ in range(10)]
    many = [rng.gauss(0.1, 1.0) for _ in range(400)]
    zeros = [0.0] * 400
    small, large = paired_evidence(few, zeros[:10]), paired_evidence(many, zeros)
    assert small.low < small.mean_gain < small.high and large.low < large.mean_gain < large.high
    assert large.high - large.low < (small.high - small.low) / 3  # ~1/sqrt(n)
    assert large.low > 0.0  # 400 items at +0.1 +- 1: shown (mean/se = 2)
    assert paired_evidence(few, zeros[:10]) == small  # fixed seed: a decision can be replayed
    assert sign_test(9, 1) == pytest.approx(11 / 1024) and sign_test(0, 0) == 1.0 and sign_test(0, 3) == 1.0
    with pytest.raises(ValueError):
        paired_evidence([1.0], [1.0, 2.0])


def test_too_few_held_out_items_alone_mark_the_refusal_as_thin_evidence():
    """Only the minimum refused: the decision says so (the cycle then lets users
    decide on a canary, TUNELOOP_GATE_THIN_EVIDENCE=canary). Anything else failing too: not thin."""
    thin = gate(metrics(0.9, 0.9, 1.0, pairs=5), metrics(0.5, 0.1, 1.0, pairs=5), TrainConfig(), base_sanity_nll=1.0)
    assert not thin.promote and thin.thin_evidence
    assert thin.to_dict()["thin_evidence"] is True
    drifted = gate(metrics(0.9, 0.9, 2.0, pairs=5), metrics(0.5, 0.1, 1.0, pairs=5), TrainConfig(),
                   base_sanity_nll=1.0)
    assert not drifted.promote and not drifted.thin_evidence
    assert any("general answers got worse" in r for r in drifted.reasons)
    enough = gate(metrics(0.9, 0.9, 1.0, pairs=8), metrics(0.5, 0.1, 1.0, pairs=8), TrainConfig())
    assert not enough.thin_evidence
