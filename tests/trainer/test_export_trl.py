"""Exports load in the tools they are for: every format comes back through
``datasets.load_dataset`` with its columns, and TRL's ORPO trainer takes one
real optimizer step on the TRL export with the small model."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from sqlmodel import Session

from store.conversations import add_message, start_conversation
from store.db import make_engine, session_scope, upgrade
from store.exchange.export import export_dataset
from store.pairs import build_pairs
from store.tables import Comparison, Feedback, User
from tests.conftest import REPO

MODEL = str(REPO / "models/smollm2-135m-instruct")
QUESTIONS = [
    ("What is 12 + 30?", "42.", "Numbers are hard; maybe 1230?"),
    ("What is the capital of Norway?", "Oslo.", "Norway has no capital as far as I know."),
    ("How many sides does a hexagon have?", "Six.", "A hexagon is round, so none."),
    ("What is 9 times 9?", "81.", "99."),
]
COLUMNS = {
    "trl": {"prompt", "chosen", "rejected"},
    "axolotl": {"messages", "chosen", "rejected"},
    "llamafactory": {"conversations", "system", "chosen", "rejected"},
}
METADATA = {"pair_id", "source", "split", "chosen_adapter_version", "rejected_adapter_version", "created_at"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store with four pairs: A/B choices and thumbs, one multi-turn with a system message."""
    url = f"sqlite:///{tmp_path_factory.mktemp('store') / 'store.db'}"
    upgrade(url)
    engine = make_engine(url)
    with session_scope(engine) as s:
        user = User(kind="browser")
        s.add(user)
        s.flush()
        for number, (question, good, bad) in enumerate(QUESTIONS):
            chat = start_conversation(s, user, "web", question)
            parent = None
            if number == 0:
                parent = add_message(s, chat, None, "system", "You are a terse assistant.").id
                parent = add_message(s, chat, parent, "user", "Hello").id
                parent = add_message(s, chat, parent, "assistant", "Hi.", adapter_version="v1").id
            q = add_message(s, chat, parent, "user", question)
            a = add_message(s, chat, q.id, "assistant", good, adapter_version="v1")
            b = add_message(s, chat, q.id, "assistant", bad)
            if number % 2:
                s.add(Comparison(user_id=user.id, conversation_id=chat.id, message_a_id=a.id, message_b_id=b.id,
                                 winner="a"))
            else:
                s.add(Feedback(message_id=a.id, user_id=user.id, rating="up"))
                s.add(Feedback(message_id=b.id, user_id=user.id, rating="down"))
        s.flush()
        assert build_pairs(s, eval_share=0.0).added == 4
    yield engine
    engine.dispose()


@pytest.mark.parametrize("file_format", ["jsonl", "parquet"])
@pytest.mark.parametrize("fmt", ["trl", "axolotl", "llamafactory"])
def test_each_format_loads_with_datasets(store, tmp_path, fmt, file_format):
    from datasets import load_dataset

    path = tmp_path / f"pairs.{file_format}"
    with Session(store) as s:
        report = export_dataset(s, fmt, path, file_format)
    assert report.rows == 4 and report.skipped == 0
    loader = "json" if file_format == "jsonl" else "parquet"
    data = load_dataset(loader, data_files=str(path), split="train", cache_dir=str(tmp_path / "hf"))
    assert set(data.column_names) == COLUMNS[fmt] | METADATA and len(data) == 4
    chosen = [row["chosen"] for row in data]
    texts = [c[-1]["content"] if isinstance(c, list) else c.get("content") or c.get("value") for c in chosen]
    assert sorted(texts) == sorted(good for _, good, _ in QUESTIONS)
    first = data[texts.index("42.")]  # the multi-turn one
    if fmt == "trl":
        assert [m["role"] for m in first["prompt"]] == ["system", "user", "assistant", "user"]
        assert first["chosen"] == [{"role": "assistant", "content": "42."}]
    elif fmt == "axolotl":
        assert first["messages"][-1] == {"role": "user", "content": "What is 12 + 30?"}
        assert first["chosen"] == {"role": "assistant", "content": "42."}
    else:
        assert first["system"] == "You are a terse assistant."
        assert [t["from"] for t in first["conversations"]] == ["human", "gpt", "human"]
        assert first["rejected"] == {"from": "gpt", "value": "Numbers are hard; maybe 1230?"}
        info = json.loads((tmp_path / "dataset_info.json").read_text())
        assert info["pairs"]["file_name"] == path.name and info["pairs"]["ranking"] is True
    assert first["chosen_adapter_version"] == "v1" and first["rejected_adapter_version"] is None


def test_one_orpo_step_on_the_trl_export(store, tmp_path):
    if not Path(MODEL, "config.json").is_file():
        pytest.fail(f"the model folder {MODEL} is missing: run `make test` (it converts the packaged model)")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    path = tmp_path / "pairs.jsonl"
    with Session(store) as s:
        export_dataset(s, "trl", path)
    data = load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf"))
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    args = ORPOConfig(
        output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2, max_length=128,
        learning_rate=1e-3, bf16=False, use_cpu=True, report_to="none", save_strategy="no",
        logging_steps=1, disable_tqdm=True, seed=0,
    )
    trainer = ORPOTrainer(
        model=model, args=args, train_dataset=data, processing_class=tokenizer,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    lora_b = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    assert lora_b and all(not t.any() for t in lora_b.values())  # a fresh LoRA starts at B = 0
    trainer.train()
    assert trainer.state.global_step == 1
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and math.isfinite(logged[0]["loss"]) and math.isfinite(logged[0]["log_odds_ratio"])
    after = dict(trainer.model.named_parameters())
    assert any(after[name].detach().any() for name in lora_b), "one ORPO step changed no LoRA weight"


@pytest.fixture(scope="module")
def single_thumbs_store(tmp_path_factory):
    """Four answers, each rated alone (two up, two down): no pair, four single thumbs."""
    url = f"sqlite:///{tmp_path_factory.mktemp('store') / 'store.db'}"
    upgrade(url)
    engine = make_engine(url)
    with session_scope(engine) as s:
        user = User(kind="api", name="caller")
        s.add(user)
        s.flush()
        for number, (question, good, bad) in enumerate(QUESTIONS):
            chat = start_conversation(s, user, "web", question)
            q = add_message(s, chat, None, "user", question)
            answer = add_message(s, chat, q.id, "assistant", good if number % 2 else bad, adapter_version="v2")
            s.add(Feedback(message_id=answer.id, user_id=user.id, rating="up" if number % 2 else "down"))
        s.flush()
        assert build_pairs(s, eval_share=0.0).added == 0
    yield engine
    engine.dispose()


@pytest.mark.parametrize("file_format", ["jsonl", "parquet"])
def test_single_thumbs_export_in_trl_unpaired_format(single_thumbs_store, tmp_path, file_format):
    from datasets import load_dataset

    path = tmp_path / f"thumbs.{file_format}"
    with Session(single_thumbs_store) as s:
        report = export_dataset(s, "trl-unpaired", path, file_format, eval_share=0.0)
    assert report.rows == 4
    data = load_dataset("json" if file_format == "jsonl" else "parquet", data_files=str(path), split="train",
                        cache_dir=str(tmp_path / "hf"))
    assert set(data.column_names) == {"prompt", "completion", "label", "feedback_id", "split", "adapter_version",
                                      "created_at"}
    assert sorted(data["label"]) == [False, False, True, True]
    first = data[0]
    assert first["prompt"] == [{"role": "user", "content": "What is 12 + 30?"}]
    assert first["completion"] == [{"role": "assistant", "content": "Numbers are hard; maybe 1230?"}]
    assert first["label"] is False and first["adapter_version"] == "v2" and first["split"] == "train"


def test_one_kto_step_on_the_unpaired_export(single_thumbs_store, tmp_path):
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    path = tmp_path / "thumbs.jsonl"
    with Session(single_thumbs_store) as s:
        export_dataset(s, "trl-unpaired", path, eval_share=0.0)
    data = load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf"))
    args = KTOConfig(
        output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4, max_length=128,
        learning_rate=1e-3, bf16=False, use_cpu=True, report_to="none", save_strategy="no",
        logging_steps=1, disable_tqdm=True, seed=0,
    )
    trainer = KTOTrainer(
        model=AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32), args=args, train_dataset=data,
        processing_class=AutoTokenizer.from_pretrained(MODEL),
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    trainer.train()
    assert trainer.state.global_step == 1
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and math.isfinite(logged[0]["loss"])
