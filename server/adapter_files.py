"""Checking an adapter folder before it goes near the engine.

vLLM happily loads a LoRA whose weights are NaN or infinite and then answers
with garbage, and it refuses DoRA, ``modules_to_save`` and ranks above
``max_lora_rank`` only at load time. This check (no torch needed) runs before
every swap, so a damaged folder is marked failed instead of served.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


class AdapterFilesError(ValueError):
    """The folder does not hold a servable, finite PEFT LoRA adapter."""


def validate_adapter_dir(path: str | Path, max_rank: int) -> None:
    folder = Path(path)
    config_path = folder / "adapter_config.json"
    weights_path = folder / "adapter_model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise AdapterFilesError(f"{folder} lacks adapter_config.json or adapter_model.safetensors")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterFilesError(f"{config_path} is not valid JSON: {exc}") from exc
    if config.get("peft_type") != "LORA" or config.get("use_dora") or config.get("modules_to_save"):
        raise AdapterFilesError(f"{folder} is not a plain LoRA (DoRA and modules_to_save cannot be served)")
    if int(config.get("r") or 0) > max_rank:
        raise AdapterFilesError(f"{folder} has rank {config.get('r')}, above TUNELOOP_MAX_LORA_RANK={max_rank}")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights_path), framework="numpy") as weights:
            for name in weights.keys():  # noqa: SIM118  (safe_open is not iterable)
                tensor = weights.get_tensor(name)
                if not np.isfinite(tensor).all():
                    raise AdapterFilesError(f"{weights_path}: tensor {name} has NaN or infinite values")
    except SafetensorError as exc:
        raise AdapterFilesError(f"{weights_path} is not a readable safetensors file: {exc}") from exc
