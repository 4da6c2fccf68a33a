"""Evaluation of an adapter, and the gate that decides whether a candidate replaces the active one.

Every score is the model's log-probability of an assistant answer given the
chat-templated conversation before it, rendered exactly as for serving: the
answer's tokens are its text followed by the end-of-turn token. Scores are
length-normalised (mean per token), like ORPO's own log-probabilities, so a
long answer is not penalised for being long.

- ``preference_accuracy``: share of held-out pairs whose chosen answer has the
  higher mean log-probability (ties count as wrong);
- ``mean_margin``: mean of ``logp(chosen) - logp(rejected)`` (per-token means);
- ``chosen_nll``: per-token NLL over all chosen answers' tokens;
- ``sanity_nll``: per-token NLL over the answers of ``trainer/sanity.jsonl``,
  short general questions (arithmetic, capitals, definitions) whose answers
  must not get less likely as the adapter learns users' preferences.

Held-out single thumbs (``store.examples``) are scored against the base model,
as KTO's implied reward: ``reward = logp_model(answer) - logp_base(answer)``
(per-token means), which takes out how likely an answer is anyway.

- ``example_accuracy``: share of held-out single thumbs the model moved the
  way the user asked: a thumbs-up answer more likely than under the base
  model (reward > 0), a thumbs-down one less likely (reward < 0); the base
  model itself scores 0;
- ``example_margin``: mean of the reward signed by the label (+ for up, - for down).

With no held-out evidence of what a run trained on (pairs, single thumbs) the
gate refuses to promote: the sanity set can only show that nothing broke,
never that the candidate is better, and an adapter that is not shown to be
better is not worth a swap.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from store.examples import Example
from store.exchange.pair_format import Pair, render_answer, render_prompt
from trainer.confidence import paired_evidence
from trainer.config import TrainConfig
from trainer.interpolate import scale_lora_b

SANITY_SET = Path(__file__).with_name("sanity.jsonl")
FLOAT_SLACK = 1e-9


@dataclass
class EvalMetrics:
    """Scores of one model (base or base + adapter); see the module docstring."""

    preference_accuracy: float | None
    mean_margin: float | None
    chosen_nll: float | None
    sanity_nll: float
    pairs: int
    examples: int = 0
    example_accuracy: float | None = None
    example_margin: float | None = None
    # per-token mean log-prob of each held-out single thumb's answer: scored
    # against the base model's by ``relative_to_base``, not kept in the record
    example_logps: list[float] = field(default_factory=list, repr=False)
    # each held-out pair's margin, and each single thumb's signed reward: the
    # gate compares them item by item with the active adapter's (trainer.confidence)
    pair_margins: list[float] = field(default_factory=list, repr=False)
    example_rewards: list[float] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        for per_item in ("example_logps", "pair_margins", "example_rewards"):
            values.pop(per_item)
        return values

    def relative_to_base(self, base_logps: list[float], labels: list[bool]) -> None:
        """Fill ``example_accuracy``/``example_margin`` from the base model's scores
        of the same held-out single thumbs (see the module doc)."""
        if not labels:
            return
        if not (len(base_logps) == len(labels) == len(self.example_logps)):
            raise ValueError("score the model and the base model on the same held-out single thumbs")
        signed = [(mine - base) * (1 if label else -1)
                  for mine, base, label in zip(self.example_logps, base_logps, labels, strict=True)]
        self.example_accuracy = sum(value > 0 for value in signed) / len(signed)
        self.example_margin = sum(signed) / len(signed)
        self.example_rewards = signed


@dataclass
class GateDecision:
    """Whether to promote the candidate; ``reasons`` in plain words, ``numbers`` for the record."""

    promote: bool
    reasons: list[str] = field(default_factory=list)
    numbers: dict[str, float | None] = field(default_factory=dict)
    # refused only because too few held-out items count as evidence (every other
    # check passed): with TUNELOOP_GATE_THIN_EVIDENCE=canary, users decide instead
    thin_evidence: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_sanity_set(path: Path = SANITY_SET) -> list[dict]:
    """The sanity conversations: one ``{"messages": [..., {"role": "assistant", ...}]}`` per line."""
    examples = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        example = json.loads(line)
        messages = example.get("messages") if isinstance(example, dict) else None
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError(f"{path}:{number}: expected messages ending with an assistant answer")
        examples.append(example)
    return examples


def evaluate_model(
    base_model: str,
    adapter: str | None,
    eval_pairs: list[Pair],
    sanity: list[dict],
    *,
    batch_size: int = 8,
    max_length: int = 1024,
    eval_examples: Sequence[Example] = (),
    scale: float = 1.0,
) -> EvalMetrics:
    """Score ``base_model`` (plus ``adapter``, a PEFT adapter folder, if given).

    ``eval_pairs`` are held-out preference pairs (may be empty: the pair
    metrics are then ``None``); ``sanity`` are conversations as returned by
    ``load_sanity_set`` (must not be empty); ``eval_examples`` held-out single
    thumbs, whose answers' scores land in ``example_logps`` (turned into
    accuracy and margin by ``EvalMetrics.relative_to_base``). Sequences longer than
    ``max_length`` tokens lose old prompt turns, then the answer's end.
    Runs under ``torch.no_grad``, float32 on CPU.
    """
    if not sanity:
        raise ValueError("the sanity set is empty; the gate needs it to catch regressions")
    model, tokenizer = load_model(base_model, adapter, scale)

    items = []
    for pair in eval_pairs:
        items.append((pair.prompt, pair.chosen, pair.chosen_complete))
        items.append((pair.prompt, pair.rejected, pair.rejected_complete))
    for example in sanity:
        items.append((example["messages"][:-1], example["messages"][-1]["content"]))
    for thumb in eval_examples:
        items.append((thumb.prompt, thumb.completion, thumb.complete))
    scores = score_answers(model, tokenizer, items, batch_size=batch_size, max_length=max_length)

    pair_scores = scores[: 2 * len(eval_pairs)]
    chosen, rejected = pair_scores[0::2], pair_scores[1::2]
    sanity_scores = scores[2 * len(eval_pairs) : 2 * len(eval_pairs) + len(sanity)]
    example_scores = scores[2 * len(eval_pairs) + len(sanity) :]

    if eval_pairs:
        margins = [c[0] / c[1] - r[0] / r[1] for c, r in zip(chosen, rejected, strict=True)]
        accuracy = sum(m > 0 for m in margins) / len(margins)
        mean_margin = sum(margins) / len(margins)
        chosen_nll = -sum(c[0] for c in chosen) / sum(c[1] for c in chosen)
    else:
        accuracy = mean_margin = chosen_nll = None
    sanity_nll = -sum(s[0] for s in sanity_scores) / sum(s[1] for s in sanity_scores)
    return EvalMetrics(
        preference_accuracy=accuracy,
        mean_margin=mean_margin,
        chosen_nll=chosen_nll,
        sanity_nll=sanity_nll,
        pairs=len(eval_pairs),
        examples=len(eval_examples),
        example_logps=[total / max(count, 1) for total, count in example_scores],
        pair_margins=margins if eval_pairs else [],
    )


def load_model(base_model: str, adapter: str | None, scale: float = 1.0) -> tuple[Any, Any]:
    """The model in eval mode (adapter merged in, if any, its update scaled by
    ``scale``: see ``trainer.interpolate``) and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    use_gpu = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.bfloat16 if use_gpu else torch.float32)
    if adapter is not None:
        from peft import PeftModel

        if not Path(adapter, "adapter_config.json").is_file():
            raise FileNotFoundError(f"adapter {adapter} has no adapter_config.json")
        model = PeftModel.from_pretrained(model, adapter)
        if scale != 1.0:
            scale_lora_b(dict(model.named_parameters()), scale)
        model = model.merge_and_unload()
    if use_gpu:
        model = model.to("cuda")
    model.eval()
    return model, tokenizer


def score_answers(
    model: Any,
    tokenizer: Any,
    items: list[tuple[list[dict[str, str]], str] | tuple[list[dict[str, str]], str, bool]],
    *,
    batch_size: int = 8,
    max_length: int = 1024,
) -> list[tuple[float, int]]:
    """For each ``(prompt messages, answer text[, complete])``: (sum of answer-token
    log-probs, answer token count). An incomplete answer (cut at its token limit)
    is scored without the end-of-turn token."""
    import torch

    encoded = [_encode(tokenizer, item[0], item[1], max_length, *item[2:]) for item in items]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]), reverse=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    results: list[tuple[float, int]] = [(0.0, 0)] * len(encoded)

    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            width = max(len(encoded[i][0]) for i in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            for row, i in enumerate(batch):
                ids, answer_start = encoded[i]
                input_ids[row, : len(ids)] = torch.tensor(ids)
                attention[row, : len(ids)] = 1
                labels[row, answer_start : len(ids)] = torch.tensor(ids[answer_start:])
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits.float()
            logits, targets = logits[:, :-1, :], labels[:, 1:].to(device)
            mask = targets != -100
            picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            token_logps = (picked - torch.logsumexp(logits, dim=-1)) * mask
            sums, counts = token_logps.sum(-1).tolist(), mask.sum(-1).tolist()
            for row, i in enumerate(batch):
                results[i] = (float(sums[row]), int(counts[row]))
    return results


def _encode(
    tokenizer: Any, prompt: list[dict[str, str]], answer: str, max_length: int, complete: bool = True
) -> tuple[list[int], int]:
    prompt_text = render_prompt(tokenizer, prompt, max_tokens=max(1, max_length * 3 // 4))
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    answer_text = render_answer(tokenizer, answer, complete)
    full_ids = tokenizer(prompt_text + answer_text, add_special_tokens=False)["input_ids"]
    answer_start = 0
    for a, b in zip(prompt_ids, full_ids, strict=False):
        if a != b:
            break
        answer_start += 1
    full_ids = full_ids[:max_length]
    if answer_start >= len(full_ids):
        raise ValueError(f"the prompt fills max_length ({max_length}) and leaves no answer to score")
    return full_ids, answer_start


def gate(
    candidate: EvalMetrics, active: EvalMetrics, config: TrainConfig, base_sanity_nll: float | None = None,
    trained: Collection[str] = ("pairs",),
) -> GateDecision:
    """Decide whether ``candidate`` replaces ``active`` (the adapter in service, or the bare base model).

    ``trained`` says what the run learned from: ``"pairs"`` and/or
    ``"examples"`` (single thumbs). Each of those with held-out items needs
    at least ``gate_min_held_out_pairs`` / ``gate_min_held_out_thumbs`` of
    them (fewer: not promoted, the next run is judged on more) and must show
    the candidate better: its accuracy at least the active one's plus
    ``gate_min_accuracy_gain``, and its margin gain shown, not just seen:
    compared item by item with the active one's (pairs: chosen over rejected;
    single thumbs: the reward against the base model, see the module doc), the
    lower end of the ``gate_confidence`` paired-bootstrap interval of the mean
    gain must be above ``gate_min_margin_gain`` (``trainer.confidence``; the
    interval, the items moved each way and a sign test land in ``numbers``
    and on the run page). Held-out items of a
    kind the run did not train on are reported, not gated. And the sanity NLL
    must be at most the base model's (``base_sanity_nll``; the active one's if
    not given) times ``1 + gate_sanity_nll_tolerance``: anchoring to the base
    model keeps the drift from compounding (five promotions that each lose 4 %
    would otherwise add up to 22 %). With no held-out items of what the run
    trained on, never promote. Raises ``ValueError`` if the two were scored on
    different held-out items (then they cannot be compared).
    """
    if candidate.pairs != active.pairs or candidate.examples != active.examples:
        raise ValueError(
            f"candidate was scored on {candidate.pairs} held-out pairs and {candidate.examples} single thumbs, "
            f"the active adapter on {active.pairs} and {active.examples}; score both on the same items"
        )
    reference, reference_name = (
        (active.sanity_nll, "active") if base_sanity_nll is None else (base_sanity_nll, "base model")
    )
    max_sanity = reference * (1 + config.gate_sanity_nll_tolerance)
    numbers: dict[str, float | None] = {
        "pairs": candidate.pairs,
        "candidate_accuracy": candidate.preference_accuracy,
        "active_accuracy": active.preference_accuracy,
        "required_accuracy": None,
        "candidate_margin": candidate.mean_margin,
        "active_margin": active.mean_margin,
        "candidate_chosen_nll": candidate.chosen_nll,
        "active_chosen_nll": active.chosen_nll,
        "examples": candidate.examples,
        "candidate_example_accuracy": candidate.example_accuracy,
        "active_example_accuracy": active.example_accuracy,
        "required_example_accuracy": None,
        "candidate_example_margin": candidate.example_margin,
        "active_example_margin": active.example_margin,
        "candidate_sanity_nll": candidate.sanity_nll,
        "active_sanity_nll": active.sanity_nll,
        "base_sanity_nll": base_sanity_nll,
        "max_sanity_nll": max_sanity,
    }
    failures = []
    scores = [candidate.sanity_nll, candidate.preference_accuracy, candidate.mean_margin, candidate.chosen_nll,
              candidate.example_margin]
    if any(value is not None and not math.isfinite(value) for value in scores):
        failures.append("the candidate's scores are not finite numbers (NaN or infinite weights?); it is broken")
    kinds = [
        ("pairs", "held-out pairs", "preference accuracy", "chosen-vs-rejected margin", candidate.pairs,
         candidate.preference_accuracy, active.preference_accuracy, candidate.mean_margin, active.mean_margin,
         "required_accuracy"),
        ("examples", "held-out single thumbs", "accuracy", "reward margin over the base model", candidate.examples,
         candidate.example_accuracy, active.example_accuracy, candidate.example_margin, active.example_margin,
         "required_example_accuracy"),
    ]
    evidence = []
    thin: list[str] = []  # kinds with too few held-out items to count
    minimum = {"pairs": (config.gate_min_held_out_pairs, "TUNELOOP_GATE_MIN_HELD_OUT_PAIRS"),
               "examples": (config.gate_min_held_out_thumbs, "TUNELOOP_GATE_MIN_HELD_OUT_THUMBS")}
    per_item = {"pairs": (candidate.pair_margins, active.pair_margins),
                "examples": (candidate.example_rewards, active.example_rewards)}
    for kind, where, accuracy_name, margin_name, count, cand_acc, act_acc, cand_margin, act_margin, key in kinds:
        if kind not in trained or count == 0 or cand_acc is None or act_acc is None:
            continue
        needed, setting = minimum[kind]
        if count < needed:
            thin.append(f"only {count} {where}; the gate needs {needed} before they count as evidence "
                        f"({setting}): the run waits for more")
            continue
        mine, theirs = per_item[kind]
        if len(mine) != count or len(theirs) != count:
            raise ValueError(f"the per-item scores of the {where} are missing: score both models with evaluate_model")
        paired = paired_evidence(mine, theirs, config.gate_confidence)
        numbers.update(paired.to_numbers(kind))
        evidence.append(f"{where}: {accuracy_name} {cand_acc:.3f} vs {act_acc:.3f}, "
                        f"margin {_fmt(cand_margin)} vs {_fmt(act_margin)}, {paired.describe()}")
        required = act_acc + config.gate_min_accuracy_gain
        numbers[key] = required
        if cand_acc < required - FLOAT_SLACK:
            failures.append(
                f"{accuracy_name} on {where} is {cand_acc:.3f}, below the required {required:.3f} "
                f"(active {act_acc:.3f} + minimum gain {config.gate_min_accuracy_gain:.3f})"
            )
        if not paired.low > config.gate_min_margin_gain:
            failures.append(
                f"mean {margin_name} on {where} is not shown to grow by more than {config.gate_min_margin_gain:g}: "
                f"{paired.describe()} ({_fmt(cand_margin)} vs active {_fmt(act_margin)})"
            )
    if not evidence and not thin:
        failures.append(
            "no held-out pairs or single thumbs of what this run trained on yet: without them there is no "
            "evidence the candidate answers better, so it is not promoted"
        )
    if candidate.sanity_nll > max_sanity + FLOAT_SLACK:
        failures.append(
            f"general answers got worse: sanity-set NLL is {candidate.sanity_nll:.4f}, above the allowed "
            f"{max_sanity:.4f} ({reference_name} {reference:.4f} + {config.gate_sanity_nll_tolerance:.0%})"
        )
    if failures or thin:
        return GateDecision(promote=False, reasons=thin + failures, numbers=numbers,
                            thin_evidence=bool(thin) and not failures)
    return GateDecision(
        promote=True,
        reasons=[
            f"candidate is better on {'; '.join(evidence)}; and general answers held up "
            f"(sanity NLL {candidate.sanity_nll:.4f} vs {active.sanity_nll:.4f})"
        ],
        numbers=numbers,
    )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
