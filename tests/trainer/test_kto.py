"""Single thumbs train (trainer.kto): KTO on the real small model, alone and
after ORPO in one run, and the pure parts (label weights, step shares)."""

from __future__ import annotations

import json

import pytest

from store.examples import Example
from tests.trainer.test_trainer_core import MODEL, QUESTIONS, load_tensors, make_pairs
from trainer.config import TrainConfig
from trainer.evaluate import evaluate_model, load_sanity_set
from trainer.kto import label_weights
from trainer.orpo import stage_steps, train_adapter

RAMBLE = ("Well, that is a question people have asked for a long time, and there are many ways to look at it, "
          "so before answering let me wander around the topic for a while: {answer}, probably.")


def make_examples() -> list[Example]:
    """Per question, a thumbs-up on the short answer and a thumbs-down on a ramble: a
    taste for brevity, said only with single thumbs (each answer rated alone)."""
    examples = []
    for number, (question, answer) in enumerate(QUESTIONS):
        for offset, (completion, label) in enumerate(((f"{answer}. Want another one?", True),
                                                      (RAMBLE.format(answer=answer), False))):
            examples.append(Example(
                feedback_id=2 * number + offset + 1, user_id=1, message_id=2 * number + offset + 1,
                prompt=[{"role": "user", "content": question}], completion=completion, label=label,
                split="train", content_hash=f"{number}-{offset}",
            ))
    return examples


KTO = TrainConfig(max_length=128, max_prompt_length=96, batch_size=4, max_steps=4, learning_rate=5e-4)


@pytest.fixture(scope="module")
def thumbs_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("adapters") / "v1"
    steps: list[dict] = []
    result = train_adapter(MODEL, None, [], out, KTO, on_step=steps.append, examples=make_examples())
    return out, result, steps


def test_single_thumbs_alone_train_a_servable_adapter(thumbs_run):
    out, result, steps = thumbs_run
    assert result.pairs == 0 and result.examples == 16
    assert result.kto["steps"] == result.steps == 4
    assert (result.kto["desirable"], result.kto["undesirable"]) == (8, 8)
    assert [s["stage"] for s in steps] == ["kto"] * 4 and steps[-1]["step"] == 4
    tensors = load_tensors(out)
    assert tensors and all(".ref." not in key for key in tensors), "TRL's reference copy was saved with the adapter"
    assert not any(path.is_dir() for path in out.iterdir()), "only the trained adapter belongs in the folder"
    assert json.loads((out / "training.json").read_text())["result"]["kto"]["steps"] == 4


def test_single_thumbs_move_answers_the_way_users_rated_them(thumbs_run):
    """Scored as the gate scores them: thumbs-up answers more likely than under
    the base model, thumbs-down ones less likely."""
    out, _, _ = thumbs_run
    examples, sanity = make_examples(), load_sanity_set()[:4]
    base = evaluate_model(MODEL, None, [], sanity, eval_examples=examples)
    trained = evaluate_model(MODEL, str(out), [], sanity, eval_examples=examples)
    trained.relative_to_base(base.example_logps, [e.label for e in examples])
    assert trained.example_margin > 0
    assert trained.example_accuracy > 0.5


def test_pairs_then_thumbs_in_one_run(tmp_path):
    steps: list[dict] = []
    result = train_adapter(MODEL, None, make_pairs()[:4], tmp_path / "v1", KTO, on_step=steps.append,
                           examples=make_examples()[:4])
    assert result.pairs == 4 and result.examples == 4
    assert [s["stage"] for s in steps] == ["orpo"] * 2 + ["kto"] * 2
    assert [s["step"] for s in steps] == [1, 2, 3, 4] and {s["total_steps"] for s in steps} == {4}


def test_a_cut_answer_is_trained_without_an_end_of_turn_token(tmp_path):
    from transformers import AutoTokenizer

    from trainer import kto
    from trainer.orpo import build_model

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    finished, cut = make_examples()[:2]
    cut = Example(**{**cut.__dict__, "complete": False})
    dataset = kto.build_dataset([finished, cut], tokenizer, KTO)
    trainer = kto.trainer_class()(
        model=build_model(MODEL, None, KTO, False), train_dataset=dataset, processing_class=tokenizer,
        args=kto.kto_args(KTO, False, tmp_path, max_steps=1, labels=[True, False]),
    )
    rows = trainer.train_dataset
    assert rows[0]["completion_ids"][-1] == tokenizer.eos_token_id
    assert rows[1]["completion_ids"][-1] != tokenizer.eos_token_id
    assert tokenizer.decode(rows[1]["completion_ids"]).rstrip().endswith("probably.")


def test_one_single_thumb_alone_cannot_train(tmp_path):
    with pytest.raises(ValueError, match="nothing to train on"):
        train_adapter(MODEL, None, [], tmp_path / "v1", KTO, examples=make_examples()[:1])


def test_the_smaller_label_is_weighted_up_to_the_larger():
    assert label_weights([True] * 6 + [False] * 2) == (1.0, 3.0)
    assert label_weights([True] + [False] * 4) == (4.0, 1.0)
    assert label_weights([True, True]) == (1.0, 1.0)


def test_pairs_and_thumbs_share_the_step_budget():
    config = TrainConfig(batch_size=4, max_steps=10, epochs=3)
    assert stage_steps(config, 8, 0) == (6, 0)
    assert stage_steps(config, 0, 8) == (0, 6)
    assert stage_steps(config, 20, 20) == (5, 5)
    assert stage_steps(config, 36, 4) == (9, 1)  # the smaller stage still gets a step
    assert stage_steps(TrainConfig(max_steps=-1, batch_size=4, epochs=1), 8, 4) == (-1, -1)
