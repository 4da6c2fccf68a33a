"""Incremental ORPO training of a LoRA adapter (TRL + PEFT).

One call trains one candidate adapter: a fresh LoRA on the base model, or a
continuation of the parent adapter, on the given preference pairs, and saves
only the adapter into a new, immutable folder that vLLM can load as a
``LoRARequest``. torch, transformers, trl and peft are imported inside the
functions so that importing this module stays cheap.

Prompts and answers are rendered with the model's chat template here, the way
the serving engine renders them (answer = text + end-of-turn token), rather
than handed to TRL as messages: TRL's conversational path keeps the template's
newline after the end-of-turn token and then appends a second end-of-turn
token, training the model on text it never generates.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from store.adapter_files import check_servable
from store.examples import Example
from store.exchange.pair_format import Pair, render_answer, render_prompt
from trainer.config import TrainConfig

TRAINING_RECORD = "training.json"


@dataclass
class TrainResult:
    """What one training run did.

    ``pairs`` is the number of distinct pairs given; ``pairs_per_second`` counts
    every pass over a pair (pairs x epochs) per second of the training loop.
    ``train_tokens`` counts the non-padding tokens fed to the model: prompt +
    chosen answer and prompt + rejected answer for every pair pass (ORPO runs
    the prompt once with each answer). ``seconds`` is the training loop only,
    without model loading or saving. ``steps`` and ``seconds`` include the KTO
    stage on single thumbs, if any; ``kto`` says what that stage did.
    """

    steps: int
    seconds: float
    train_tokens: int
    pairs: int
    step_metrics: list[dict[str, Any]] = field(default_factory=list)
    pairs_per_second: float = 0.0
    tokens_per_second: float = 0.0
    examples: int = 0
    kto: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train_adapter(
    base_model: str,
    parent_adapter: str | None,
    pairs: list[Pair],
    out_dir: Path,
    config: TrainConfig,
    on_step: Callable[[dict], None] | None = None,
    examples: Sequence[Example] = (),
) -> TrainResult:
    """Train a candidate adapter with ORPO on ``pairs``, then KTO on
    ``examples`` (single thumbs, ``trainer.kto``), and save it into ``out_dir``.
    The run's step budget (``step_budget`` of pairs + examples) is shared by
    the two stages in proportion to their sizes.

    ``base_model`` is a local Hugging Face model folder (or hub id where a hub
    is reachable). With ``parent_adapter`` None a fresh LoRA is created
    (``config.lora_r``/``lora_alpha`` on ``config.target_modules``); otherwise
    the parent adapter folder is loaded trainable and training continues from
    it (keeping the parent's rank and target modules).

    ``on_step`` is called after every optimizer step with TRL's log dict
    (``loss``, ``nll_loss``, ``log_odds_ratio``, ``log_odds_chosen``,
    ``rewards/accuracies``, ``rewards/margins``, ``rewards/chosen``,
    ``rewards/rejected``, ``logps/chosen``, ``logps/rejected``,
    ``grad_norm``, ``learning_rate``, ``epoch``, ...) plus ``step`` and
    ``total_steps``. An exception raised by ``on_step`` aborts training and
    nothing is saved.

    ``out_dir`` receives the PEFT adapter (``adapter_config.json``,
    ``adapter_model.safetensors``) and ``training.json`` (config + result). It
    is written beside itself under a temporary name and renamed into place
    when complete.

    Raises ``FileExistsError`` if ``out_dir`` exists (adapter folders are
    immutable), ``ValueError`` for nothing to train on (no pairs and fewer than
    two examples), and
    ``RuntimeError`` if the saved adapter is something vLLM cannot serve.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"adapter folder {out_dir} already exists; adapter folders are immutable, pick a new one")
    from trainer import kto

    examples = list(examples) if len(examples) >= kto.MIN_EXAMPLES else []
    if not pairs and not examples:
        raise ValueError(f"nothing to train on: no preference pairs and fewer than {kto.MIN_EXAMPLES} single thumbs")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

    from transformers import AutoTokenizer

    use_gpu = _use_gpu(config)
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    dataset = build_dataset(pairs, tokenizer, config) if pairs else None
    kto_dataset = kto.build_dataset(examples, tokenizer, config) if examples else None
    model = build_model(base_model, parent_adapter, config, use_gpu)
    orpo_steps, kto_steps = stage_steps(config, len(pairs), len(examples))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        total = orpo_steps + kto_steps
        if dataset is not None:
            result = train(model, tokenizer, dataset, config, use_gpu, staging / "_trainer", on_step,
                           max_steps=orpo_steps, total_steps=total)
        else:
            result = TrainResult(steps=0, seconds=0.0, train_tokens=0, pairs=0)
        if kto_dataset is not None:
            stage = kto.train(model, tokenizer, kto_dataset, config, use_gpu, staging / "_trainer_kto",
                              max_steps=kto_steps, on_step=on_step, step_offset=result.steps, total_steps=total)
            result.steps += stage["steps"]
            result.seconds = round(result.seconds + stage["seconds"], 3)
            result.step_metrics += stage.pop("step_metrics")
            result.examples, result.kto = len(examples), stage
        shutil.rmtree(staging / "_trainer", ignore_errors=True)
        shutil.rmtree(staging / "_trainer_kto", ignore_errors=True)
        save_adapter(model, staging)
        lora = check_servable(staging, config.max_lora_rank)  # refuse what vLLM would refuse
        record = {
            "base_model": base_model,
            "parent_adapter": parent_adapter,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": "cuda" if use_gpu else "cpu",
            "lora": lora,
            "config": config.to_dict(),
            "result": result.to_dict(),
            "versions": _versions(),
        }
        (staging / TRAINING_RECORD).write_text(json.dumps(record, indent=2, default=str))
        _publish(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return result


def unusable_reason(pair: Pair, tokenizer: Any, config: TrainConfig) -> str | None:
    """Why the trainer cannot use ``pair``, or None. Today one reason exists: a
    prompt that stays above ``config.max_prompt_length`` tokens even after old
    turns are dropped and the last message is cut (only a system message that
    long can do it) -- TRL would train on an empty answer and the loss would
    turn NaN. The cycle sets such pairs aside before training."""
    return fitted_prompt(pair.prompt, tokenizer, config)[1]


def fitted_prompt(messages: list[dict[str, str]], tokenizer: Any, config: TrainConfig) -> tuple[str, str | None]:
    """The training prompt of the chat ``messages``, and why it is unusable (or None)."""
    prompt = render_prompt(tokenizer, messages, config.max_prompt_length)
    prompt_tokens = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if prompt_tokens > config.max_prompt_length:
        return prompt, (
            f"its prompt is {prompt_tokens} tokens even after dropping old turns, above "
            f"max_prompt_length={config.max_prompt_length} (a system message that long)"
        )
    return prompt, None


def build_dataset(pairs: list[Pair], tokenizer: Any, config: TrainConfig) -> Any:
    """A ``datasets.Dataset`` of chat-templated ``prompt``/``chosen``/``rejected`` strings.

    Raises ``ValueError`` for a pair the trainer cannot use (``unusable_reason``);
    the cycle sets those aside first.
    """
    from datasets import Dataset

    rows = []
    for pair in pairs:
        prompt, reason = fitted_prompt(pair.prompt, tokenizer, config)
        if reason is not None:
            raise ValueError(f"pair {pair.pair_id}: {reason}")
        rows.append(
            {
                "prompt": prompt,
                "chosen": render_answer(tokenizer, pair.chosen, pair.chosen_complete),
                "rejected": render_answer(tokenizer, pair.rejected, pair.rejected_complete),
            }
        )
    return Dataset.from_list(rows)


def build_model(base_model: str, parent_adapter: str | None, config: TrainConfig, use_gpu: bool) -> Any:
    """The trainable PEFT model: a fresh LoRA, or the parent adapter loaded trainable."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, set_seed

    set_seed(config.seed)
    if config.qlora:
        from bitsandbytes.functional import has_avx512bf16
        from transformers import BitsAndBytesConfig

        # The dtype the frozen 4-bit weights are unpacked to for their matmul (LoRA
        # weights and gradients stay float32). On a CPU with native bf16 (AVX512-BF16,
        # AMX) bfloat16 made a QLoRA step 1.25-1.5x faster than float32 and its
        # rounding is small next to nf4's own; without it bf16 is emulated, far slower.
        compute_dtype = torch.bfloat16 if use_gpu or has_avx512bf16() else torch.float32
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
        base = AutoModelForCausalLM.from_pretrained(
            base_model,
            quantization_config=quantization,
            dtype=torch.bfloat16 if use_gpu else torch.float32,  # what is not quantised ends float32 below
            device_map={"": torch.cuda.current_device() if use_gpu else "cpu"},
        )
        # Recomputing activations saves GPU memory; on the CPU it only costs time.
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=use_gpu)
    else:
        base = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.bfloat16 if use_gpu else torch.float32)

    if parent_adapter is None:
        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=config.lora_target_modules(),
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(base, lora)
    else:
        check_servable(parent_adapter, config.max_lora_rank)
        model = PeftModel.from_pretrained(base, parent_adapter, is_trainable=True)

    if not any(p.requires_grad for p in model.parameters()):
        raise RuntimeError("the adapter has no trainable parameters; training would change nothing")
    return model


def stage_steps(config: TrainConfig, pairs: int, examples: int) -> tuple[int, int]:
    """Steps of the ORPO stage and of the KTO stage: the budget of pairs +
    examples, shared in proportion, at least one step for a stage with data
    (-1 budget: each stage its epochs)."""
    budget = step_budget(config, pairs + examples)
    if budget < 0:
        return (step_budget(config, pairs) if pairs else 0), (step_budget(config, examples) if examples else 0)
    if not examples:
        return budget, 0
    if not pairs:
        return 0, budget
    orpo = min(budget - 1, max(1, round(budget * pairs / (pairs + examples))))
    return max(1, orpo), max(1, budget - orpo)


def step_budget(config: TrainConfig, pairs: int) -> int:
    """Optimizer steps for ``pairs`` training pairs: ``epochs`` passes, but at
    most ``max_steps`` (a few pairs get their passes, a big night is capped so a
    run cannot drift far from the adapter it starts from). -1: epochs only."""
    if config.max_steps <= 0:
        return -1
    return max(1, min(config.max_steps, math.ceil(config.epochs * pairs / config.pairs_per_step)))


def train(
    model: Any,
    tokenizer: Any,
    dataset: Any,
    config: TrainConfig,
    use_gpu: bool,
    scratch_dir: Path,
    on_step: Callable[[dict], None] | None = None,
    max_steps: int | None = None,
    total_steps: int = 0,
) -> TrainResult:
    """Run TRL's ORPO trainer on ``model`` in place (``max_steps``: default
    ``step_budget``; ``total_steps``: the run's, for progress) and report what it did."""
    from transformers import PrinterCallback, TrainerCallback
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    args = ORPOConfig(
        beta=config.beta,
        max_steps=step_budget(config, len(dataset)) if max_steps is None else max_steps,
        per_device_train_batch_size=config.batch_size,
        **stage_arguments(config, use_gpu, scratch_dir),
    )

    step_metrics: list[dict[str, Any]] = []

    class ForwardStepLogs(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return  # the end-of-training summary, not a step
            entry = {**logs, "stage": "orpo", "step": state.global_step,
                     "total_steps": total_steps or state.max_steps}
            step_metrics.append(entry)
            if on_step is not None:
                on_step(dict(entry))

    class CountingORPOTrainer(ORPOTrainer):
        seen_pairs = 0
        seen_tokens = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self.seen_pairs += int(inputs["chosen_input_ids"].shape[0])
            self.seen_tokens += int(inputs["chosen_attention_mask"].sum() + inputs["rejected_attention_mask"].sum())
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    trainer = CountingORPOTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[ForwardStepLogs()],
    )
    trainer.remove_callback(PrinterCallback)  # step logs go to on_step, not stdout
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    return TrainResult(
        steps=trainer.state.global_step,
        seconds=round(seconds, 3),
        train_tokens=trainer.seen_tokens,
        pairs=len(dataset),
        step_metrics=step_metrics,
        pairs_per_second=round(trainer.seen_pairs / seconds, 4) if seconds > 0 else 0.0,
        tokens_per_second=round(trainer.seen_tokens / seconds, 2) if seconds > 0 else 0.0,
    )


def save_adapter(model: Any, directory: Path) -> None:
    """Save only the LoRA weights and config (safetensors); no base weights, no tokenizer."""
    model.save_pretrained(str(directory), safe_serialization=True, save_embedding_layers=False)
    (directory / "README.md").unlink(missing_ok=True)  # PEFT's generated model card says nothing useful here


def _publish(staging: Path, out_dir: Path) -> None:
    if out_dir.exists():
        raise FileExistsError(f"adapter folder {out_dir} appeared while training; adapter folders are immutable")
    os.rename(staging, out_dir)


def stage_arguments(config: TrainConfig, use_gpu: bool, scratch_dir: Path) -> dict[str, Any]:
    """The training arguments the ORPO and KTO stages share (everything but
    their beta, step count and batch size)."""
    return {
        "output_dir": str(scratch_dir),
        "learning_rate": config.learning_rate,
        "num_train_epochs": config.epochs,
        "gradient_accumulation_steps": config.grad_accum,
        "max_length": config.max_length,
        "seed": config.seed,
        "lr_scheduler_type": "linear",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        # TRL's disable_dropout would also zero the LoRA dropout the config asks for.
        "disable_dropout": config.lora_dropout == 0.0,
        "optim": optimizer_name(config, use_gpu),
        "bf16": use_gpu,
        "fp16": False,
        "use_cpu": not use_gpu,
        "gradient_checkpointing": use_gpu,
        "logging_strategy": "steps",
        "logging_steps": 1,
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "remove_unused_columns": False,
        "dataloader_pin_memory": use_gpu,
    }


def optimizer_name(config: TrainConfig, use_gpu: bool) -> str:
    """The ``optim`` of a training stage: 8-bit AdamW for QLoRA (paged on a GPU:
    paging moves optimizer state between GPU and host memory; on the CPU
    bitsandbytes falls back to plain 8-bit AdamW with a warning, so ask for
    that), torch's AdamW otherwise."""
    if config.qlora:
        return "paged_adamw_8bit" if use_gpu else "adamw_bnb_8bit"
    return "adamw_torch"


def _use_gpu(config: TrainConfig) -> bool:
    """Train on the GPU where there is one. QLoRA runs on either: bitsandbytes
    has CPU kernels for nf4 and its 8-bit optimizers; without bitsandbytes a
    QLoRA run fails here, before any model is loaded."""
    import torch

    if config.qlora:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise ValueError(
                "qlora=True needs bitsandbytes, which is not installed: run scripts/setup.sh (it installs it) "
                "or set TUNELOOP_TRAIN_QLORA=false"
            ) from exc
    return torch.cuda.is_available()


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "trl", "peft", "bitsandbytes"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found
