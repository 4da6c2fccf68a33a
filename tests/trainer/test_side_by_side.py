"""Side-by-side answers at temperature 0 (trainer/side_by_side.py), on the real
small model with real PEFT LoRA folders made here in a second: one whose B
matrices are zero (it adds nothing: the base model) and one with random B."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest

from store.examples import Example
from store.exchange.pair_format import Pair
from tests.conftest import REPO
from trainer import side_by_side as sbs
from trainer.side_by_side import choose_prompts, held_out_prompts, side_by_side, side_by_side_metrics

MODEL = str(REPO / "models/smollm2-135m-instruct")
TOKENS = 24  # enough for the answers to part ways, and quick on two cores

PROMPTS = [
    [{"role": "user", "content": "What is 12 + 30?"}],
    [{"role": "user", "content": "Name a primary colour."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Write a haiku about rain."}],
]


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def pair(text: str, pair_id: int) -> Pair:
    return Pair(prompt=user(text), chosen="Yes.", rejected="No.", pair_id=pair_id)


def thumb(text: str, feedback_id: int) -> Example:
    return Example(feedback_id=feedback_id, user_id=1, message_id=feedback_id, prompt=user(text), completion="Ok.",
                   label=True, split="eval", content_hash=str(feedback_id))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> tuple[str, str]:
    """(a LoRA with zero B: adds nothing, a LoRA with random non-zero B), saved as PEFT folders."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    if not Path(MODEL, "config.json").is_file():
        pytest.fail(f"the model folder {MODEL} is missing: run `make test` (it converts the packaged model)")
    root = tmp_path_factory.mktemp("side_by_side")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                        init_lora_weights=False)  # False: B random too, so the adapter changes the model
    changed = root / "changed"
    get_peft_model(base, config).save_pretrained(changed)
    noop = root / "noop"
    noop.mkdir()
    (noop / "adapter_config.json").write_text((changed / "adapter_config.json").read_text())
    tensors = load_file(changed / "adapter_model.safetensors")
    save_file({k: v.zero_() if "lora_B" in k else v for k, v in tensors.items()},
              str(noop / "adapter_model.safetensors"))
    return str(noop), str(changed)


@pytest.fixture(scope="module")
def base_rows() -> list[dict]:
    return side_by_side(MODEL, None, None, PROMPTS, max_new_tokens=TOKENS)


def test_the_base_model_against_itself_is_identical(base_rows):
    assert [row["prompt"] for row in base_rows] == PROMPTS
    assert [row["same"] for row in base_rows] == [True, True, True]
    assert all(row["candidate"] == row["active"] and row["active"].strip() for row in base_rows)
    assert not any("<|im_end|>" in row["active"] or "<|im_start|>" in row["active"] for row in base_rows)
    json.dumps(base_rows)


def test_a_lora_with_zero_b_answers_exactly_like_the_base_model(adapters, base_rows):
    noop, _ = adapters
    rows = side_by_side(MODEL, None, noop, PROMPTS, max_new_tokens=TOKENS)
    assert [row["candidate"] for row in rows] == [row["active"] for row in base_rows]
    assert [row["same"] for row in rows] == [True, True, True]


def test_a_lora_with_non_zero_b_changes_an_answer(adapters, base_rows):
    noop, changed = adapters
    rows = side_by_side(MODEL, noop, changed, PROMPTS, max_new_tokens=TOKENS)  # two adapters, switched in turn
    assert [row["active"] for row in rows] == [row["active"] for row in base_rows]
    assert any(not row["same"] for row in rows)
    assert all(row["same"] == (row["candidate"].strip() == row["active"].strip()) for row in rows)


def test_prompts_are_distinct_capped_and_chosen_by_the_seed_alone():
    prompts = held_out_prompts([pair("a", 1), pair("b", 2), pair("a", 3), pair("c", 4)],
                               [thumb("b", 5), thumb("d", 6), thumb("e", 7)])
    assert len(prompts) == 7
    chosen = choose_prompts(prompts, 3, seed=11)
    assert len(chosen) == 3 and len({json.dumps(p) for p in chosen}) == 3
    shuffled = list(prompts)
    random.Random(5).shuffle(shuffled)
    assert choose_prompts(shuffled, 3, seed=11) == chosen
    assert {json.dumps(p) for p in choose_prompts(prompts, 10, seed=11)} == {
        json.dumps(user(text)) for text in "abcde"}
    assert len({json.dumps(choose_prompts(prompts, 3, seed=s)) for s in range(20)}) > 1
    assert choose_prompts(prompts, 0, seed=11) == []
    with pytest.raises(ValueError, match="0 or more"):
        choose_prompts(prompts, -1, seed=11)


def test_zero_prompts_turns_it_off_without_loading_anything():
    assert side_by_side_metrics("/nowhere/model", None, "/nowhere/adapter", [pair("a", 1)], limit=0, seed=1) == {}


def test_no_held_out_prompts_is_an_empty_list_without_loading_anything():
    shown = side_by_side_metrics("/nowhere/model", None, "/nowhere/adapter", [], [], limit=4, seed=1)
    assert shown["side_by_side"] == [] and shown["side_by_side_seconds"] >= 0


def test_errors_are_recorded_and_logged_never_raised(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.ERROR, logger="tuneloop.trainer")
    missing = side_by_side_metrics(MODEL, None, str(tmp_path / "v9"), [pair("a", 1)], limit=4, seed=1)
    assert missing["side_by_side"] == {"error": f"FileNotFoundError: adapter {tmp_path / 'v9'} has no "
                                                "adapter_config.json"}
    assert isinstance(missing["side_by_side_seconds"], float)

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory " * 100)

    monkeypatch.setattr(sbs, "side_by_side", broken)
    shown = side_by_side_metrics(MODEL, None, None, [pair("a", 1)], limit=4, seed=1)
    assert shown["side_by_side"]["error"].startswith("RuntimeError: out of memory")
    assert len(shown["side_by_side"]["error"]) <= sbs.ERROR_CHARS
    assert sum("side-by-side answers failed" in r.message for r in caplog.records) == 2
