"""The one check of what a servable adapter folder is.

vLLM happily loads a LoRA whose weights are NaN or infinite and then answers
with garbage, and it refuses DoRA, ``modules_to_save`` and ranks above
``max_lora_rank`` only at load time. The trainer runs this check on what it
saved, and the server before every swap (no torch needed), so a damaged folder
is refused or marked failed instead of served.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from store.errors import VersionNotServable

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


class AdapterFilesError(VersionNotServable):
    """The folder does not hold a servable, finite PEFT LoRA adapter."""


def check_servable(path: str | Path, max_rank: int) -> dict[str, Any]:
    """Raise AdapterFilesError unless ``path`` holds a plain PEFT LoRA (no DoRA,
    no ``modules_to_save``, only LoRA tensors, all finite) of rank at most
    ``max_rank`` (TUNELOOP_MAX_LORA_RANK). Returns its LoRA settings
    (``r``, ``lora_alpha``, ``target_modules``)."""
    folder = Path(path)
    config_path = folder / CONFIG_FILE
    weights_path = folder / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise AdapterFilesError(f"{folder} lacks {CONFIG_FILE} or {WEIGHTS_FILE}")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterFilesError(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict) or config.get("peft_type") != "LORA" or config.get("use_dora") \
            or config.get("modules_to_save"):
        raise AdapterFilesError(f"{folder} is not a plain LoRA (DoRA and modules_to_save cannot be served)")
    try:
        rank = int(config.get("r") or 0)
    except (TypeError, ValueError) as exc:
        raise AdapterFilesError(f"{config_path}: rank {config.get('r')!r} is not a number") from exc
    if rank > max_rank:
        raise AdapterFilesError(f"{folder} has rank {rank}, above TUNELOOP_MAX_LORA_RANK={max_rank}")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights_path), framework="numpy") as weights:
            for name in weights.keys():  # noqa: SIM118  (safe_open is not iterable)
                if "lora_" not in name:
                    raise AdapterFilesError(f"{weights_path} stores a non-LoRA tensor {name}")
                if not np.isfinite(weights.get_tensor(name)).all():
                    raise AdapterFilesError(f"{weights_path}: tensor {name} has NaN or infinite values")
    except SafetensorError as exc:
        raise AdapterFilesError(f"{weights_path} is not a readable safetensors file: {exc}") from exc
    return {key: config.get(key) for key in ("r", "lora_alpha", "target_modules")}
