"""QLoRA on the CPU: a 4-bit nf4 base (double quantisation), 8-bit AdamW, a few
ORPO steps on the small model, and an adapter the server can serve.

That the adapter changes the engine's answers is checked where the session's
engine lives: ``tests/server/test_vllm_engine.py``.
"""

from __future__ import annotations

import json
import math

import pytest

from store.adapter_files import check_servable
from tests.trainer.test_trainer_core import MODEL, load_tensors, make_pairs
from trainer.config import TrainConfig
from trainer.orpo import train_adapter

bitsandbytes = pytest.importorskip(
    "bitsandbytes", reason="QLoRA needs bitsandbytes (scripts/setup.sh installs it with the train extra)"
)

QLORA = TrainConfig(qlora=True, max_length=128, max_prompt_length=96, batch_size=2, max_steps=4, learning_rate=5e-4)


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("qlora") / "v1"
    result = train_adapter(MODEL, None, make_pairs(), out, QLORA)
    return out, result


def test_qlora_trains_on_the_cpu_and_saves_a_servable_float_lora(qlora_run):
    out, result = qlora_run
    lora = check_servable(out, QLORA.max_lora_rank)
    assert lora["r"] == QLORA.lora_r

    tensors = load_tensors(out)
    assert tensors and all("lora_" in key for key in tensors)
    assert {str(t.dtype) for t in tensors.values()} == {"torch.float32"}  # not 4-bit: it merges into the float base

    assert result.steps == 4
    assert [math.isfinite(step["loss"]) for step in result.step_metrics] == [True] * 4


def test_qlora_learned_something(qlora_run):
    out, _ = qlora_run
    # A fresh LoRA starts with every B at zero (a no-op); training moves them.
    b_weights = {key: t for key, t in load_tensors(out).items() if ".lora_B." in key}
    moved = [key for key, t in b_weights.items() if t.abs().max() > 0]
    assert len(moved) == len(b_weights) > 0


def test_the_training_record_says_qlora(qlora_run):
    out, result = qlora_run
    record = json.loads((out / "training.json").read_text())
    assert record["config"]["qlora"] is True
    assert record["versions"]["bitsandbytes"] == bitsandbytes.__version__
    assert math.isfinite(record["result"]["step_metrics"][-1]["loss"])


def test_qlora_adapter_fits_the_float_checkpoint_the_server_merges_into(qlora_run):
    from server.engine.merged_weights import check_mergeable

    out, _ = qlora_run
    check_mergeable(MODEL, out)


def test_qlora_continues_a_parent_adapter(qlora_run):
    parent, _ = qlora_run
    child = parent.parent / "v2"
    config = TrainConfig(
        qlora=True, max_length=128, max_prompt_length=96, batch_size=2, max_steps=2, learning_rate=5e-4
    )
    result = train_adapter(MODEL, str(parent), make_pairs()[:4], child, config)
    assert result.steps == 2
    check_servable(child, config.max_lora_rank)
    before, after = load_tensors(parent), load_tensors(child)
    assert before.keys() == after.keys()
    assert sum(not before[key].equal(after[key]) for key in before) > len(before) // 2
