"""The preference pair the trainer consumes, and its TRL row form.

Example::

    >>> pair = Pair(prompt=[{"role": "user", "content": "Hi"}], chosen="Hello!", rejected="Go away.")
    >>> to_trl_row(pair)["chosen"]
    [{'role': 'assistant', 'content': 'Hello!'}]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from store.control_tokens import neutralise, neutralise_messages, tokenizer_control_tokens

ROLES = ("system", "user", "assistant")


@dataclass
class Pair:
    """One preference: two assistant answers to the same conversation.

    ``prompt`` is the conversation so far as chat messages
    (``{"role": ..., "content": ...}``), ending with a user message;
    ``chosen`` is the preferred answer's text, ``rejected`` the other one.
    ``chosen_complete``/``rejected_complete`` are False for an answer that was
    cut at its token limit: it is trained and scored without the end-of-turn
    token, so the model is not taught to stop in mid-sentence.
    """

    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    pair_id: int | None = None
    chosen_complete: bool = True
    rejected_complete: bool = True

    def __post_init__(self) -> None:
        if not self.prompt:
            raise ValueError(f"pair {self.pair_id}: the prompt has no messages")
        for message in self.prompt:
            if (
                not isinstance(message, dict)
                or message.get("role") not in ROLES
                or not isinstance(message.get("content"), str)
            ):
                raise ValueError(
                    f"pair {self.pair_id}: every prompt message needs a role in {ROLES} and a string content, "
                    f"got {message!r}"
                )
        if self.prompt[-1]["role"] != "user":
            raise ValueError(f"pair {self.pair_id}: the prompt must end with a user message")
        if not isinstance(self.chosen, str) or not isinstance(self.rejected, str):
            raise ValueError(f"pair {self.pair_id}: chosen and rejected must be strings")
        if not self.chosen.strip() or not self.rejected.strip():
            raise ValueError(f"pair {self.pair_id}: chosen and rejected answers must not be empty")


def to_trl_row(pair: Pair) -> dict[str, Any]:
    """The conversational preference row TRL's ORPO/DPO trainers read.

    Result: ``{"prompt": [messages...], "chosen": [{"role": "assistant", "content": ...}],
    "rejected": [{"role": "assistant", "content": ...}]}`` (explicit-prompt
    preference format of ``trl.data_utils.apply_chat_template``).
    """
    return {
        "prompt": [{"role": m["role"], "content": m["content"]} for m in pair.prompt],
        "chosen": [{"role": "assistant", "content": pair.chosen}],
        "rejected": [{"role": "assistant", "content": pair.rejected}],
    }


def render_prompt(tokenizer: Any, messages: list[dict[str, str]], max_tokens: int | None = None) -> str:
    """The chat-templated prompt text, ready for the assistant's answer.

    This is exactly what the serving engine renders before generating: control
    token look-alikes in the text are neutralised (``store.control_tokens``).
    When ``max_tokens`` is given and the prompt is longer, the oldest turns are
    dropped first (a leading system message is kept), then the start of the
    last user message is cut.
    """
    messages = neutralise_messages(messages, tokenizer_control_tokens(tokenizer))
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = list(messages[len(system) :])

    def text(turns: list[dict[str, str]]) -> str:
        return tokenizer.apply_chat_template(system + turns, tokenize=False, add_generation_prompt=True)

    def length(rendered: str) -> int:
        return len(tokenizer(rendered, add_special_tokens=False)["input_ids"])

    rendered = text(turns)
    if max_tokens is None:
        return rendered
    while length(rendered) > max_tokens and len(turns) > 1:
        turns = turns[1:]
        while len(turns) > 1 and turns[0]["role"] != "user":
            turns = turns[1:]
        rendered = text(turns)
    for _ in range(4):
        excess = length(rendered) - max_tokens
        if excess <= 0:
            break
        last = turns[-1]
        ids = tokenizer(last["content"], add_special_tokens=False)["input_ids"]
        kept = tokenizer.decode(ids[min(len(ids), excess + 1) :])
        turns = turns[:-1] + [{"role": last["role"], "content": kept}]
        rendered = text(turns)
    return rendered


def encode_prompt(tokenizer: Any, messages: list[dict[str, str]], max_tokens: int | None = None) -> list[int]:
    """The token ids of :func:`render_prompt` as the model reads them (no special
    tokens added around it): what the serving engine generates from, and what
    the trainer and the gate tokenise, so serving and training see the same
    tokens for the same conversation."""
    return list(tokenizer(render_prompt(tokenizer, messages, max_tokens), add_special_tokens=False)["input_ids"])


def render_answer(tokenizer: Any, content: str, complete: bool = True) -> str:
    """An assistant answer as the model produces it: the text, then the end-of-turn
    token -- unless the answer was cut at its token limit (``complete=False``):
    the model did not end it there, and must not learn to."""
    if not tokenizer.eos_token:
        raise ValueError("the tokenizer has no end-of-turn (eos) token; tuneloop needs one to train and score answers")
    content = neutralise(content, tokenizer_control_tokens(tokenizer))
    return content + tokenizer.eos_token if complete else content
