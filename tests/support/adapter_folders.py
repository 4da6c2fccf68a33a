"""Adapter folders for tests on the fake engine: they pass the servable-folder
check (``store.adapter_files``) without being a real LoRA for any model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file


def servable_folder(folder: Path) -> Path:
    """Write a minimal servable LoRA folder at ``folder``; returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16}))
    save_file({"a.lora_A.weight": np.zeros((8, 16), dtype=np.float32)}, str(folder / "adapter_model.safetensors"))
    return folder
