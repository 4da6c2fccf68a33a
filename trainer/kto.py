"""KTO on single thumbs: the unpaired half of a training run.

A single thumb (``store.examples``) says "this answer was good" or "this one
was bad" without a second answer to compare with, which ORPO cannot use. TRL's
``KTOTrainer`` learns from exactly that -- prompt, completion, label -- by
raising the likelihood of desirable answers and lowering that of undesirable
ones *relative to a reference model*, against a KL baseline estimated from
mismatched prompt/answer pairs in the batch (so a batch needs at least two
examples). With a PEFT model TRL takes as reference a frozen copy of the
adapter as the KTO stage starts: the thumbs move the model away from where
this run's pairs left it, no further than ``kto_beta`` allows.

Rendering is the ORPO stage's (``trainer.orpo``): chat template, answer text
plus end-of-turn token, the prompt fitted to ``max_prompt_length``.

Weights balance the two labels as TRL recommends (KTO paper, eq. 8: desirable
weight x desirables / (undesirable weight x undesirables) in [1, 4/3]): the
smaller side is weighted up to the larger, so a night of mostly thumbs-down
does not just teach "say less".
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from store.examples import Example
from store.exchange.pair_format import render_answer
from trainer.config import TrainConfig
from trainer.orpo import fitted_prompt, stage_arguments

MIN_EXAMPLES = 2
"""KTO's KL baseline pairs each answer with another example's prompt: one example alone cannot train."""


def label_weights(labels: list[bool]) -> tuple[float, float]:
    """(desirable_weight, undesirable_weight): the smaller side weighted up to
    the larger one's size (ratio 1, inside TRL's recommended [1, 4/3])."""
    desirable = sum(1 for label in labels if label)
    undesirable = len(labels) - desirable
    if desirable == 0 or undesirable == 0 or desirable == undesirable:
        return 1.0, 1.0
    if desirable > undesirable:
        return 1.0, desirable / undesirable
    return undesirable / desirable, 1.0


def build_dataset(examples: list[Example], tokenizer: Any, config: TrainConfig) -> Any:
    """A ``datasets.Dataset`` of chat-templated ``prompt``/``completion`` strings and ``label``."""
    from datasets import Dataset

    rows = []
    for example in examples:
        prompt, reason = fitted_prompt(example.prompt, tokenizer, config)
        if reason is not None:
            raise ValueError(f"example from feedback {example.feedback_id}: {reason}")
        # A cut answer keeps its end-of-turn token here only so that TRL adds none;
        # CutAnswersKTOTrainer takes it off again after tokenizing.
        rows.append({"prompt": prompt, "completion": render_answer(tokenizer, example.completion),
                     "label": example.label, "complete": example.complete})
    return Dataset.from_list(rows)


def trainer_class() -> type:
    from trl import KTOTrainer

    class CutAnswersKTOTrainer(KTOTrainer):
        """TRL appends the end-of-turn token to every completion that lacks one;
        an answer cut at its token limit must not end with it (the model did not
        stop there, and must not learn to), so it is removed after tokenizing."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            eos = self._tokenizer.eos_token_id

            def uncut(example):
                ids = example["completion_ids"]
                if not example["complete"] and len(ids) > 1 and ids[-1] == eos:
                    example["completion_ids"] = ids[:-1]
                return example

            return dataset.map(uncut)

    return CutAnswersKTOTrainer


def kto_args(config: TrainConfig, use_gpu: bool, scratch_dir: Path, max_steps: int, labels: list[bool]) -> Any:
    """TRL's ``KTOConfig`` for a stage of ``max_steps`` steps on examples with ``labels``."""
    from trl import KTOConfig

    desirable_weight, undesirable_weight = label_weights(labels)
    return KTOConfig(
        beta=config.kto_beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
        max_steps=max_steps,
        per_device_train_batch_size=max(MIN_EXAMPLES, config.batch_size),
        **stage_arguments(config, use_gpu, scratch_dir),
    )


def train(
    model: Any, tokenizer: Any, dataset: Any, config: TrainConfig, use_gpu: bool, scratch_dir: Path,
    max_steps: int, on_step: Callable[[dict], None] | None = None, step_offset: int = 0, total_steps: int = 0,
) -> dict[str, Any]:
    """Run TRL's KTO trainer on ``model`` in place for ``max_steps`` steps; what it did."""
    from transformers import PrinterCallback, TrainerCallback

    labels = [bool(label) for label in dataset["label"]]
    args = kto_args(config, use_gpu, scratch_dir, max_steps, labels)
    step_metrics: list[dict[str, Any]] = []

    class ForwardStepLogs(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            entry = {**logs, "stage": "kto", "step": step_offset + state.global_step,
                     "total_steps": total_steps or state.max_steps}
            step_metrics.append(entry)
            if on_step is not None:
                on_step(dict(entry))

    trainer = trainer_class()(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                   callbacks=[ForwardStepLogs()])
    trainer.remove_callback(PrinterCallback)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    _drop_reference_adapter(model)
    return {
        "steps": trainer.state.global_step, "seconds": round(seconds, 3), "examples": len(labels),
        "desirable": sum(labels), "undesirable": len(labels) - sum(labels),
        "desirable_weight": round(args.desirable_weight, 4), "undesirable_weight": round(args.undesirable_weight, 4),
        "step_metrics": step_metrics,
    }


def _drop_reference_adapter(model: Any) -> None:
    """TRL added a frozen copy of the adapter as the reference ("ref"); the
    saved adapter must be the trained one only."""
    peft_config = getattr(model, "peft_config", {})
    if "ref" in peft_config:
        model.set_adapter("default")
        model.delete_adapter("ref")
