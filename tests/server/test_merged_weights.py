"""Merging a LoRA into the base checkpoint (server/engine/merged_weights.py),
on a tiny synthetic checkpoint: the merged weights are W + (alpha/r) B A for
exactly the targeted weights, everything else passes through untouched, and
adapters that do not fit the model are refused before any weight changes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from server.engine.merged_weights import MergeError, check_mergeable, lora_deltas, merged_checkpoint

RANK, ALPHA = 4, 8


def write_model(folder: Path) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    weights = {
        "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 12),
        "model.layers.0.mlp.down_proj.weight": torch.randn(12, 20),
        "model.norm.weight": torch.randn(12),
    }
    folder.mkdir()
    save_file(weights, str(folder / "model.safetensors"))
    return weights


def write_adapter(folder: Path, shapes: dict[str, tuple[int, int]], rslora: bool = False) -> dict[str, tuple]:
    torch.manual_seed(1)
    folder.mkdir()
    tensors, pairs = {}, {}
    for module, (out_dim, in_dim) in shapes.items():
        a, b = torch.randn(RANK, in_dim), torch.randn(out_dim, RANK)
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
        pairs[f"{module}.weight"] = (a, b)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"r": RANK, "lora_alpha": ALPHA, "use_rslora": rslora, "peft_type": "LORA"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return pairs


def test_merged_weights_are_base_plus_scaled_lora_and_the_rest_untouched(tmp_path):
    base = write_model(tmp_path / "model")
    pairs = write_adapter(tmp_path / "v1", {"model.layers.0.self_attn.q_proj": (16, 12)})
    check_mergeable(tmp_path / "model", tmp_path / "v1")
    merged = dict(merged_checkpoint(tmp_path / "model", tmp_path / "v1"))
    assert set(merged) == set(base)
    a, b = pairs["model.layers.0.self_attn.q_proj.weight"]
    expected = base["model.layers.0.self_attn.q_proj.weight"] + (ALPHA / RANK) * (b @ a)
    assert torch.allclose(merged["model.layers.0.self_attn.q_proj.weight"], expected, atol=1e-6)
    assert torch.equal(merged["model.layers.0.mlp.down_proj.weight"], base["model.layers.0.mlp.down_proj.weight"])
    assert torch.equal(merged["model.norm.weight"], base["model.norm.weight"])
    # no adapter: the base checkpoint, bit for bit (what a rollback to the base model loads)
    plain = dict(merged_checkpoint(tmp_path / "model", None))
    assert all(torch.equal(plain[name], tensor) for name, tensor in base.items())


def test_rslora_scales_by_the_square_root_of_the_rank(tmp_path):
    write_model(tmp_path / "model")
    write_adapter(tmp_path / "v1", {"model.layers.0.mlp.down_proj": (12, 20)}, rslora=True)
    (_, _, scale), = lora_deltas(tmp_path / "v1").values()
    assert scale == pytest.approx(ALPHA / RANK**0.5)


@pytest.mark.parametrize("shapes, message", [
    ({"model.layers.0.self_attn.k_proj": (16, 12)}, "does not have"),
    ({"model.layers.0.self_attn.q_proj": (16, 13)}, "does not fit"),
])
def test_an_adapter_that_does_not_fit_the_model_is_refused(tmp_path, shapes, message):
    write_model(tmp_path / "model")
    write_adapter(tmp_path / "bad", shapes)
    with pytest.raises(MergeError, match=message):
        check_mergeable(tmp_path / "model", tmp_path / "bad")


def test_unreadable_lora_weights_are_refused(tmp_path):
    write_model(tmp_path / "model")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text(json.dumps({"r": RANK}))
    (tmp_path / "bad" / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(MergeError, match="unreadable"):
        check_mergeable(tmp_path / "model", tmp_path / "bad")
