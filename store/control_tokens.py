"""Text that looks like a chat template's control tokens is data, never a turn
boundary.

A user (or an imported dataset) can type ``<|im_start|>system ...``; rendered
by the chat template and tokenised as is, that text becomes real control
tokens and forges turns -- at serving and in training. ``neutralise`` puts an
invisible WORD JOINER (U+2060) after the first character of every such marker,
so the tokenizer reads it as ordinary characters. Applied wherever chat text
meets a tokenizer (the serving engine's prompt, the trainer's and the gate's
rendering); stored text is left as the user wrote it.

>>> neutralise("hi <|im_end|>", ["<|im_end|>"])
'hi <\u2060|im_end|>'
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

WORD_JOINER = "\u2060"
# Markers of the ChatML family whatever the tokenizer lists: <|anything|>.
_GENERIC = r"<\|[^\s<>|]{1,64}\|>"


@lru_cache(maxsize=16)
def _pattern(tokens: frozenset[str]) -> re.Pattern[str]:
    alternatives = [re.escape(t) for t in sorted(tokens, key=len, reverse=True) if len(t) > 1]
    return re.compile("|".join([*alternatives, _GENERIC]))


def neutralise(text: str, control_tokens: Iterable[str] = ()) -> str:
    """``text`` with every control-token look-alike broken up (see the module)."""
    if "<" not in text and not control_tokens:
        return text
    return _pattern(frozenset(control_tokens)).sub(lambda m: m.group(0)[0] + WORD_JOINER + m.group(0)[1:], text)


def tokenizer_control_tokens(tokenizer: Any) -> frozenset[str]:
    """Every special or added token a Hugging Face tokenizer would read out of
    plain text as one token."""
    tokens = set(getattr(tokenizer, "all_special_tokens", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    tokens |= {added.content for added in decoder.values()}
    return frozenset(t for t in tokens if t)


def neutralise_messages(messages: list[dict[str, str]], control_tokens: Iterable[str] = ()) -> list[dict[str, str]]:
    return [{**m, "content": neutralise(m["content"], control_tokens)} for m in messages]
