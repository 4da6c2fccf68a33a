"""The training core on the real small model: ORPO on a LoRA adapter, continuation, evaluation.

Training is shared per module (a few optimizer steps on CPU); the gate's pure
cases are in test_gate.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from store.exchange.pair_format import Pair, render_answer, render_prompt, to_trl_row
from tests.conftest import REPO
from trainer.config import TrainConfig
from trainer.evaluate import evaluate_model, load_sanity_set
from trainer.orpo import train_adapter

MODEL = str(REPO / "models/smollm2-135m-instruct")

QUESTIONS = [
    ("What is 12 + 30?", "42"),
    ("What is the capital of Norway?", "Oslo"),
    ("How many sides does a hexagon have?", "Six"),
    ("What is 9 times 9?", "81"),
    ("Which gas do plants take in?", "Carbon dioxide"),
    ("What is the freezing point of water in Celsius?", "0 degrees"),
    ("What is the largest planet?", "Jupiter"),
    ("What is 100 minus 35?", "65"),
]


def make_pairs() -> list[Pair]:
    return [
        Pair(
            prompt=[{"role": "user", "content": question}],
            chosen=f"{answer}. Want another one?",
            rejected=(
                "Well, that is a question people have asked for a long time, and there are many ways to look "
                f"at it, so before answering let me wander around the topic for a while: {answer}, probably."
            ),
            pair_id=number,
        )
        for number, (question, answer) in enumerate(QUESTIONS)
    ]


# A higher learning rate than the default so that four steps move the margins measurably.
TINY = TrainConfig(max_length=128, max_prompt_length=96, batch_size=2, max_steps=4, learning_rate=5e-4)


@pytest.fixture(scope="module")
def model_ready() -> str:
    if not Path(MODEL, "config.json").is_file():
        pytest.fail(f"the model folder {MODEL} is missing: run `make test` (it converts the packaged model)")
    return MODEL


@pytest.fixture(scope="module")
def first_run(model_ready, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapters") / "v1"
    steps: list[dict] = []
    result = train_adapter(model_ready, None, make_pairs(), out, TINY, on_step=steps.append)
    return out, result, steps


@pytest.fixture(scope="module")
def child_run(model_ready, first_run):
    parent, _, _ = first_run
    out = parent.parent / "v2"
    config = TrainConfig(max_length=128, max_prompt_length=96, batch_size=2, max_steps=2, learning_rate=5e-4)
    result = train_adapter(model_ready, str(parent), make_pairs()[:4], out, config)
    return out, result


def load_tensors(adapter: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(adapter / "adapter_model.safetensors"))


def test_first_adapter_is_saved_as_plain_lora(first_run):
    out, result, _ = first_run
    assert (out / "adapter_config.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()
    assert not list(out.parent.glob(".v1.partial-*")), "the staging folder was left behind"

    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA"
    assert adapter["r"] == 8 and adapter["lora_alpha"] == 16
    assert not adapter.get("modules_to_save")
    assert not adapter.get("use_dora")
    assert set(adapter["target_modules"]) >= {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert "lm_head" not in adapter["target_modules"]
    assert all("lora_" in key for key in load_tensors(out))

    assert result.steps == 4
    assert result.pairs == 8
    assert result.train_tokens > 8 * 2 * 20  # 4 steps x 2 pairs: every pair once, prompt + answer twice
    assert result.seconds > 0 and result.pairs_per_second > 0 and result.tokens_per_second > 0


def test_on_step_gets_trl_metrics_for_every_step(first_run):
    _, result, steps = first_run
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    for entry in steps:
        assert entry["total_steps"] == 4
        for key in ("loss", "nll_loss", "log_odds_ratio", "rewards/accuracies", "rewards/margins"):
            assert math.isfinite(entry[key]), key
    assert result.step_metrics == steps


def test_training_record_is_written(first_run):
    out, result, _ = first_run
    record = json.loads((out / "training.json").read_text())
    assert TrainConfig.from_dict(record["config"]) == TINY
    assert record["parent_adapter"] is None
    assert record["result"]["steps"] == result.steps
    assert record["lora"]["r"] == 8


def test_adapter_folder_is_never_overwritten(first_run):
    out, _, _ = first_run
    before = (out / "adapter_model.safetensors").read_bytes()
    with pytest.raises(FileExistsError):
        train_adapter(MODEL, None, make_pairs(), out, TINY)
    assert (out / "adapter_model.safetensors").read_bytes() == before


def test_continuing_an_adapter_changes_its_weights(first_run, child_run):
    parent, _, _ = first_run
    child, result = child_run
    assert result.steps == 2
    parent_tensors, child_tensors = load_tensors(parent), load_tensors(child)
    assert parent_tensors.keys() == child_tensors.keys()
    changed = [key for key in parent_tensors if not parent_tensors[key].equal(child_tensors[key])]
    assert len(changed) > len(parent_tensors) // 2, "continuing left most LoRA weights untouched"
    assert json.loads((child / "training.json").read_text())["parent_adapter"] == str(parent)


def test_trained_adapter_prefers_chosen_more_than_base(first_run):
    out, _, _ = first_run
    sanity = load_sanity_set()[:8]
    base = evaluate_model(MODEL, None, make_pairs(), sanity)
    candidate = evaluate_model(MODEL, str(out), make_pairs(), sanity)
    for metrics in (base, candidate):
        assert metrics.pairs == 8
        assert 0.0 <= metrics.preference_accuracy <= 1.0
        assert math.isfinite(metrics.mean_margin)
        assert 0.0 < metrics.chosen_nll < 20.0
        assert 0.0 < metrics.sanity_nll < 20.0
    assert candidate.mean_margin > base.mean_margin
    assert candidate.chosen_nll < base.chosen_nll


def test_sanity_set_is_general_chat():
    sanity = load_sanity_set()
    assert len(sanity) >= 20
    assert all([m["role"] for m in example["messages"]] == ["user", "assistant"] for example in sanity)


def test_evaluation_without_pairs_scores_sanity_only(model_ready):
    sanity = load_sanity_set()[:4]
    metrics = evaluate_model(MODEL, None, [], sanity)
    assert metrics.pairs == 0
    assert metrics.preference_accuracy is None and metrics.mean_margin is None
    assert metrics.sanity_nll > 0


def test_rendering_matches_trl_conversational_format(model_ready):
    from transformers import AutoTokenizer
    from trl.data_utils import maybe_apply_chat_template

    tokenizer = AutoTokenizer.from_pretrained(model_ready)
    pair = make_pairs()[0]
    row = to_trl_row(pair)
    assert row["chosen"] == [{"role": "assistant", "content": pair.chosen}]
    rendered = maybe_apply_chat_template(row, tokenizer)
    assert rendered["prompt"] == render_prompt(tokenizer, pair.prompt)
    assert rendered["chosen"].startswith(render_answer(tokenizer, pair.chosen))


def test_long_prompts_are_cut_to_max_prompt_length(model_ready):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_ready)
    history = []
    for turn in range(6):
        history += [
            {"role": "user", "content": f"Question {turn}: " + "tell me more " * 20},
            {"role": "assistant", "content": "Sure. " * 20},
        ]
    history.append({"role": "user", "content": "And finally? " + "please " * 200})
    text = render_prompt(tokenizer, history, max_tokens=96)
    assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= 96
    assert text.endswith("<|im_start|>assistant\n")


def test_answers_cut_at_the_token_limit_get_no_end_of_turn(model_ready):
    """A truncated answer must not teach the model to stop in mid-sentence: no
    end-of-turn token in training or scoring (the model pays for one otherwise)."""
    from transformers import AutoTokenizer

    from trainer.evaluate import load_model, score_answers

    tokenizer = AutoTokenizer.from_pretrained(model_ready)
    text = "Oslo is the capital of Norway and"
    assert render_answer(tokenizer, text) == text + tokenizer.eos_token
    assert render_answer(tokenizer, text, complete=False) == text
    model, tokenizer = load_model(model_ready, None)
    prompt = [{"role": "user", "content": "What is the capital of Norway?"}]
    (full, full_n), (cut, cut_n) = score_answers(model, tokenizer, [(prompt, text), (prompt, text, False)])
    assert cut_n == full_n - 1  # one token fewer: the end of turn
    assert cut > full  # ending there was unlikely, and it is no longer charged
