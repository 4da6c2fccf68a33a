"""Training configuration of one cycle: one dataclass, help text per field.

It holds every knob a cycle reads -- pair selection, ORPO, the gate -- and is
built from the server's ``Settings`` in one place, :meth:`TrainConfig.from_settings`.

Defaults that differ from TRL's ``ORPOConfig`` on purpose:

- ``learning_rate`` 3e-4 instead of 1e-6: TRL's default is for full
  fine-tuning; a LoRA adapter continued on a handful of nightly pairs (a few
  optimizer steps) barely moves at 1e-6, and bench/learning.py found 1e-4 too
  slow as well. The gate catches a run that drifts.
- ``beta`` (ORPO's lambda) 0.5 instead of 0.1: on few pairs 0.1 left the
  preference term too weak next to the NLL.
- ``max_length`` 512 instead of 1024: chat turns collected here are short, and
  on CPU every padded token costs time.
- ``gradient_checkpointing`` is decided by the trainer (on for GPU, off for
  CPU, where memory is plentiful and recomputation only costs time).
- ``bf16`` is off on CPU (emulated there, many times slower); on GPU it is on.

Example::

    >>> config = TrainConfig(epochs=1)
    >>> TrainConfig.from_json(config.to_json()) == config
    True
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from store.settings import Settings
from trainer.interpolate import parse_scales


@dataclass
class TrainConfig:
    lora_r: int = field(
        default=8,
        metadata={
            "help": "LoRA rank for a new adapter (continued adapters keep their parent's rank). At most "
            "max_lora_rank."
        },
    )
    max_lora_rank: int = field(
        default=16,
        metadata={"help": "Largest rank the serving engine loads (TUNELOOP_MAX_LORA_RANK); a saved adapter above "
                  "it is refused."},
    )
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (the update is scaled by alpha/r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input during training."})
    target_modules: str = field(
        default="all-linear",
        metadata={
            "help": "PEFT target modules for a new adapter: 'all-linear' (every linear projection, never lm_head) "
            "or a comma-separated list of module names such as 'q_proj,v_proj'."
        },
    )
    learning_rate: float = field(
        default=3e-4,
        metadata={
            "help": "Peak AdamW learning rate (linear decay). 3e-4 moved SmolLM2's LoRA on ~40 nightly pairs "
            "(bench/learning.py; 1e-4 barely did); TRL's 1e-6 default is meant for full fine-tuning."
        },
    )
    beta: float = field(
        default=0.5,  # TRL's 0.1 left the preference term too weak next to the NLL on few pairs
        metadata={"help": "ORPO lambda: weight of the odds-ratio term against the NLL of the chosen answer."},
    )
    kto_beta: float = field(
        default=0.5,  # TRL's 0.1 let later thumbs-only runs move held-out thumbs the wrong way (bench/learning.py)
        metadata={"help": "KTO beta for single thumbs (trainer.kto): higher keeps the adapter closer to where "
                  "the KTO stage started."},
    )
    epochs: float = field(default=3, metadata={"help": "Passes over the training pairs (at most max_steps steps)."})
    batch_size: int = field(default=4, metadata={"help": "Pairs per device per optimizer micro-step."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-steps accumulated into one optimizer step."})
    max_length: int = field(
        default=512,
        metadata={"help": "Maximum tokens of prompt + answer; longer answers are cut at the end."},
    )
    max_prompt_length: int = field(
        default=384,
        metadata={
            "help": "Maximum tokens of the chat-templated prompt; older turns are dropped first, then the start "
            "of the last user message is cut. Must be below max_length."
        },
    )
    max_steps: int = field(
        default=32,  # a bounded update per run: 66+ steps on ~90 pairs blew the gate's sanity budget
        metadata={"help": "Most optimizer steps of one run (fewer when `epochs` passes take fewer); -1: no cap."},
    )
    seed: int = field(default=0, metadata={"help": "Seed for LoRA initialisation and data order."})
    qlora: bool = field(
        default=False,
        metadata={
            "help": "QLoRA (bitsandbytes): load the base model in 4-bit nf4 with double quantisation and train the "
            "LoRA with 8-bit AdamW (paged_adamw_8bit on a GPU, adamw_bnb_8bit on the CPU). Works on GPU and CPU; "
            "the saved adapter is an ordinary float LoRA for the unquantised model."
        },
    )
    eval_share: float = field(
        default=0.1, metadata={"help": "Share of pairs held out for the gate (decided once per pair, by its hash)."}
    )
    max_pairs_per_user: int = field(
        default=50, metadata={"help": "Most new pairs one user contributes to a run (and most held-out ones)."}
    )
    train_on_anonymous: bool = field(
        default=False, metadata={"help": "Learn from anonymous visitors' feedback too (TUNELOOP_TRAIN_ON_ANONYMOUS)."}
    )
    replay_fraction: float = field(
        default=0.5,
        metadata={
            "help": "Share of the training set made of older, already-trained pairs replayed next to the new "
            "ones, against forgetting (0 = new pairs only)."
        },
    )
    gate_max_eval_pairs: int = field(
        default=256,
        metadata={"help": "Most held-out pairs the gate scores (the newest half plus a sample of older ones)."},
    )
    gate_min_accuracy_gain: float = field(
        default=0.0,
        metadata={
            "help": "The candidate's held-out preference accuracy must be at least the active adapter's plus this."
        },
    )
    gate_min_margin_gain: float = field(
        default=0.0,
        metadata={
            "help": "The candidate's mean held-out margin must exceed the active adapter's by more than this "
            "(0 = strictly higher)."
        },
    )
    gate_min_held_out_thumbs: int = field(
        default=4,
        metadata={"help": "Held-out single thumbs the gate needs before they count as evidence."},
    )
    gate_min_held_out_pairs: int = field(
        default=8,
        metadata={"help": "Held-out pairs the gate needs before they count as evidence (fewer: the run waits)."},
    )
    gate_confidence: float = field(
        default=0.95,
        metadata={"help": "Confidence of the paired-bootstrap interval whose lower end must clear the margin gain."},
    )
    gate_sanity_nll_tolerance: float = field(
        default=0.05,
        metadata={
            "help": "Relative worsening of the sanity-set NLL the gate tolerates (0.05 = candidate may be up to 5% "
            "worse than the base model: a fixed budget, so drift cannot compound over promotions)."
        },
    )
    interpolation_scales: str = field(
        default="1,0.75,0.5,0.25",
        metadata={"help": "Scales tried, largest first, to pull a candidate that blows the sanity budget back "
                  "toward the base model (trainer.interpolate); '1' turns it off."},
    )
    eval_batch_size: int = field(default=8, metadata={"help": "Sequences per forward pass during evaluation."})

    @property
    def pairs_per_step(self) -> int:
        return self.batch_size * self.grad_accum

    @property
    def max_pairs_per_run(self) -> int | None:
        """Most training pairs a run can reach within ``max_steps`` (None: no cap)."""
        return self.max_steps * self.pairs_per_step if self.max_steps > 0 else None

    def __post_init__(self) -> None:
        problems = []
        if not 1 <= self.lora_r <= self.max_lora_rank:
            problems.append(f"lora_r must be between 1 and max_lora_rank ({self.max_lora_rank}), got {self.lora_r}")
        if self.lora_alpha <= 0:
            problems.append(f"lora_alpha must be positive, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            problems.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.target_modules.strip():
            problems.append("target_modules must not be empty (use 'all-linear')")
        if self.learning_rate <= 0:
            problems.append(f"learning_rate must be positive, got {self.learning_rate}")
        if self.kto_beta <= 0:
            problems.append(f"kto_beta must be positive, got {self.kto_beta}")
        if self.beta < 0:
            problems.append(f"beta must not be negative, got {self.beta}")
        for name in ("epochs", "batch_size", "grad_accum", "eval_batch_size", "max_length", "max_prompt_length"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_prompt_length >= self.max_length:
            problems.append(
                f"max_prompt_length ({self.max_prompt_length}) must be below max_length ({self.max_length}) "
                "to leave room for the answer"
            )
        if self.max_steps == 0 or self.max_steps < -1:
            problems.append(f"max_steps must be -1 (use epochs) or positive, got {self.max_steps}")
        if not 0.0 <= self.eval_share < 1.0:
            problems.append(f"eval_share must be in [0, 1), got {self.eval_share}")
        for name in ("max_pairs_per_user", "gate_max_eval_pairs"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.replay_fraction < 1.0:
            problems.append(f"replay_fraction must be in [0, 1), got {self.replay_fraction}")
        try:
            parse_scales(self.interpolation_scales)
        except ValueError as exc:
            problems.append(str(exc))
        if not 0 < self.gate_confidence < 1:
            problems.append(f"gate_confidence must be between 0 and 1, got {self.gate_confidence}")
        if self.gate_sanity_nll_tolerance < 0:
            problems.append(f"gate_sanity_nll_tolerance must not be negative, got {self.gate_sanity_nll_tolerance}")
        if problems:
            raise ValueError("invalid training configuration: " + "; ".join(problems))

    @classmethod
    def from_settings(cls, settings: Settings) -> TrainConfig:
        """The one place the server's settings become a cycle's configuration."""
        return cls(
            epochs=settings.train_epochs,
            max_steps=settings.train_max_steps,
            learning_rate=settings.train_learning_rate,
            batch_size=settings.train_batch_size,
            beta=settings.train_beta,
            kto_beta=settings.train_kto_beta,
            qlora=settings.train_qlora,
            max_lora_rank=settings.max_lora_rank,
            eval_share=settings.eval_share,
            max_pairs_per_user=settings.max_pairs_per_user,
            train_on_anonymous=settings.train_on_anonymous,
            replay_fraction=settings.replay_fraction,
            gate_max_eval_pairs=settings.gate_max_eval_pairs,
            gate_min_accuracy_gain=settings.gate_min_accuracy_gain,
            gate_min_margin_gain=settings.gate_min_margin_gain,
            gate_min_held_out_thumbs=settings.gate_min_held_out_thumbs,
            gate_min_held_out_pairs=settings.gate_min_held_out_pairs,
            gate_confidence=settings.gate_confidence,
            gate_sanity_nll_tolerance=settings.gate_sanity_tolerance,
            interpolation_scales=settings.train_interpolation_scales,
        )

    def lora_target_modules(self) -> str | list[str]:
        """``target_modules`` in the form ``peft.LoraConfig`` takes."""
        value = self.target_modules.strip()
        if value == "all-linear":
            return value
        return [name.strip() for name in value.split(",") if name.strip()]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a dict; missing fields take their defaults, unknown ones raise ``ValueError``."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training setting(s) {unknown}; known settings are {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        values = json.loads(text)
        if not isinstance(values, dict):
            raise ValueError("a training configuration must be a JSON object")
        return cls.from_dict(values)
