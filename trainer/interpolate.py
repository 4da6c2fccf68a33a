"""Interpolating a candidate toward the base model, so learning never stalls on
the sanity budget (WiSE-FT for a LoRA adapter).

A LoRA adapter adds ``dW = (alpha / r) * B @ A`` to each weight it targets, so
multiplying every ``lora_B`` by ``s`` gives exactly ``W + s * dW``: the point
at ``s`` on the straight line from the base model (``s = 0``) to the trained
candidate (``s = 1``). Weight-space interpolation of this kind (WiSE-FT,
Wortsman et al. 2022; model averaging in RLHF, Lin et al. 2024) keeps most of
what fine-tuning learned while giving back most of what it forgot.

The cycle uses it after training and before the candidate is registered
(``choose_scale``): the largest scale in ``scales`` (1 first) whose sanity-set
NLL stays within the gate's budget is written into the candidate's weights
(``scale_adapter``), so a run that learned a lot *and* drifted too far ships
the part of its update that fits, instead of being rejected and teaching
nothing. The gate then judges that adapter as usual. A candidate that fits at
``s = 1`` is left as it is, and one that fits at no scale keeps ``s = 1`` (the
gate refuses it with its sanity reason).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def scale_lora_b(tensors: Mapping[str, Any], scale: float) -> int:
    """Multiply, in place, every LoRA ``B`` matrix of ``tensors`` (parameter or
    state-dict names) by ``scale``; how many there were."""
    if not 0.0 < scale <= 1.0:
        raise ValueError(f"an interpolation scale is in (0, 1], got {scale}")
    scaled = 0
    for name, tensor in tensors.items():
        if "lora_B" in name:
            data = getattr(tensor, "data", tensor)
            data.mul_(scale)
            scaled += 1
    if not scaled:
        raise ValueError("no LoRA B matrices found: this is not a LoRA adapter")
    return scaled


def scale_adapter(folder: Path, scale: float) -> None:
    """Rewrite the adapter in ``folder`` as ``base + scale * update`` (replacing
    its weights file atomically). Only for a candidate nobody serves yet:
    adapter folders are immutable once registered."""
    from safetensors.torch import load_file, save_file

    path = Path(folder) / ADAPTER_WEIGHTS
    tensors = load_file(str(path))
    scale_lora_b(tensors, scale)
    staging = path.with_name(f".{path.name}.scaled")
    save_file(tensors, str(staging), metadata={"format": "pt"})
    os.replace(staging, path)


def choose_scale(
    sanity_nll_at: Callable[[float], float], max_sanity_nll: float, scales: Sequence[float]
) -> tuple[float, list[dict[str, float]]]:
    """The largest of ``scales`` whose sanity NLL (``sanity_nll_at(scale)``) is
    at most ``max_sanity_nll``, trying them from the largest down; 1.0 when none
    fits. Also every trial, for the run's record."""
    trials: list[dict[str, float]] = []
    for scale in sorted(set(scales), reverse=True):
        nll = sanity_nll_at(scale)
        trials.append({"scale": scale, "sanity_nll": nll})
        if nll <= max_sanity_nll:
            return scale, trials
    return 1.0, trials


def parse_scales(text: str) -> tuple[float, ...]:
    """``"1, 0.75, 0.5"`` -> (1.0, 0.75, 0.5); every value in (0, 1]; 1 is always tried."""
    values = set()
    for part in text.split(","):
        if not part.strip():
            continue
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"interpolation scales are numbers in (0, 1], got {part.strip()!r}") from None
        if not 0.0 < value <= 1.0:
            raise ValueError(f"interpolation scales are numbers in (0, 1], got {value}")
        values.add(value)
    values.add(1.0)
    return tuple(sorted(values, reverse=True))
