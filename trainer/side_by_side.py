"""The candidate's and the active version's temperature-0 answers to a few
held-out prompts, side by side, for the run's page: reading what changed is how
a product team judges a preference-tuning run, next to the gate's numbers.

The prompts are those the gate held out (pairs' prompts and single thumbs'),
distinct, at most ``limit`` of them, sampled with the run's id as the seed so a
run always shows the same ones. Each version answers greedily (temperature 0)
from the prompt rendered exactly as serving renders it
(``store.exchange.pair_format.encode_prompt``); the base model is loaded once
and the adapters are switched on it (PEFT), so the only difference between two
answers is the adapter. Greedy answers from transformers are not token for
token what the serving engine (vLLM) says, but both versions are read the
same way here, so ``same`` says whether the adapter changed the answer.

It is a display: :func:`side_by_side_metrics` never raises (an error is
recorded in place of the answers), so no run fails because of it.

The record, one entry per prompt::

    [{"prompt": [{"role": "user", "content": "What is 2 + 2?"}],
      "candidate": "4.", "active": "2 + 2 = 4.", "same": false}]
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from store.examples import Example
from store.exchange.pair_format import Pair, encode_prompt

log = logging.getLogger("tuneloop.trainer")

MAX_NEW_TOKENS = 96
MAX_PROMPT_TOKENS = 1024
ERROR_CHARS = 500
# On CPU the answers are generated on one thread: the trainer shares the
# machine with the serving engine, and with two threads on two busy cores
# PyTorch's threads wait on each other (measured: 1.5 s a step instead of 0.1).
CPU_THREADS = 1

Messages = list[dict[str, str]]


def held_out_prompts(eval_pairs: Sequence[Pair], eval_examples: Sequence[Example] = ()) -> list[Messages]:
    """The prompts of the run's held-out pairs, then of its held-out single thumbs."""
    return [list(p.prompt) for p in eval_pairs] + [list(e.prompt) for e in eval_examples]


def choose_prompts(prompts: Sequence[Messages], limit: int, seed: int) -> list[Messages]:
    """At most ``limit`` distinct prompts (same roles and texts = same prompt),
    drawn with ``seed``: the same set of prompts and seed give the same choice,
    whatever order the prompts came in. Raises ``ValueError`` for a negative limit."""
    if limit < 0:
        raise ValueError(f"the number of side-by-side prompts must be 0 or more, not {limit}")
    distinct: dict[str, Messages] = {}
    for prompt in prompts:
        messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
        distinct.setdefault(json.dumps(messages, sort_keys=True), messages)
    ordered = [distinct[key] for key in sorted(distinct)]
    return random.Random(seed).sample(ordered, min(limit, len(ordered)))


def side_by_side(
    base_model: str,
    active: str | None,
    candidate: str | None,
    prompts: Sequence[Messages],
    *,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> list[dict[str, Any]]:
    """Each prompt with the greedy answers of ``candidate`` and ``active`` (PEFT
    adapter folders; None is the base model), in the order given; see the
    module doc for the record. Raises ``FileNotFoundError`` for a folder that
    is not an adapter, and whatever loading or generating raises."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not prompts:
        return []
    for folder in (active, candidate):
        if folder is not None and not Path(folder, "adapter_config.json").is_file():
            raise FileNotFoundError(f"adapter {folder} has no adapter_config.json")
    use_gpu = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.bfloat16 if use_gpu else torch.float32)
    if use_gpu:
        model = model.to("cuda")
    model.eval()
    names: dict[str | None, str | None] = {None: None}
    for folder in dict.fromkeys(f for f in (active, candidate) if f is not None):
        name = f"adapter{len(names)}"
        if len(names) == 1:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, folder, adapter_name=name)
        else:
            model.load_adapter(folder, adapter_name=name)
        names[folder] = name
    model.eval()
    has_adapters = len(names) > 1
    threads = torch.get_num_threads()
    if not use_gpu:
        torch.set_num_threads(CPU_THREADS)
    try:
        answers = {
            role: _answers(model, tokenizer, names[folder], has_adapters, prompts, max_new_tokens)
            for role, folder in (("active", active), ("candidate", candidate))
        }
    finally:
        torch.set_num_threads(threads)
    return [
        {"prompt": list(prompt), "candidate": cand, "active": act, "same": cand.strip() == act.strip()}
        for prompt, cand, act in zip(prompts, answers["candidate"], answers["active"], strict=True)
    ]


def _answers(model: Any, tokenizer: Any, adapter: str | None, has_adapters: bool, prompts: Sequence[Messages],
             max_new_tokens: int) -> list[str]:
    """Greedy answers of ``model`` with ``adapter`` switched on (None: all off),
    generated as one left-padded batch."""
    import contextlib

    import torch

    encoded = [encode_prompt(tokenizer, list(p), max_tokens=MAX_PROMPT_TOKENS) for p in prompts]
    width = max(len(ids) for ids in encoded)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention[row, width - len(ids):] = 1
    device = next(model.parameters()).device
    if adapter is None:
        switch = model.disable_adapter() if has_adapters else contextlib.nullcontext()
    else:
        model.set_adapter(adapter, inference_mode=True)
        switch = contextlib.nullcontext()
    with switch, torch.no_grad():
        output = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention.to(device), do_sample=False,
            max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id,
        )
    answers = []
    for row in output[:, width:].tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        answers.append(tokenizer.decode(row, skip_special_tokens=True))
    return answers


def side_by_side_metrics(
    base_model: str,
    active: str | None,
    candidate: str | None,
    eval_pairs: Sequence[Pair],
    eval_examples: Sequence[Example] = (),
    *,
    limit: int,
    seed: int,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> dict[str, Any]:
    """What the cycle adds to the run's metrics: ``side_by_side`` (the list of
    :func:`side_by_side`, for at most ``limit`` held-out prompts chosen with
    ``seed``) and ``side_by_side_seconds``; nothing when ``limit`` is 0. Never
    raises: on an error ``side_by_side`` is ``{"error": "..."}`` and the error
    is logged (it is a display; the run goes on)."""
    if limit == 0:
        return {}
    started = time.monotonic()
    try:
        prompts = choose_prompts(held_out_prompts(eval_pairs, eval_examples), limit, seed)
        shown: Any = side_by_side(base_model, active, candidate, prompts, max_new_tokens=max_new_tokens)
    except Exception as exc:
        log.exception("side-by-side answers failed; the run goes on without them")
        shown = {"error": f"{type(exc).__name__}: {exc}"[:ERROR_CHARS]}
    return {"side_by_side": shown, "side_by_side_seconds": round(time.monotonic() - started, 2)}
