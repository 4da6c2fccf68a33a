"""The dataset record shapes fine-tuning tools read, both ways: a preference
pair to a record (export) and a record back to a pair (import).

Formats (``FORMATS``):

- ``trl``: TRL's conversational preference format with an explicit prompt
  (ORPO/DPO trainers read it as is)::

    {"prompt": [{"role": "user", "content": "Hi"}],
     "chosen": [{"role": "assistant", "content": "Hello!"}],
     "rejected": [{"role": "assistant", "content": "Go away."}]}

- ``axolotl``: Axolotl's ``chat_template.default`` preference type
  (``rl: dpo``/``ipo``/``simpo``)::

    {"messages": [{"role": "user", "content": "Hi"}],
     "chosen": {"role": "assistant", "content": "Hello!"},
     "rejected": {"role": "assistant", "content": "Go away."}}

- ``llamafactory``: LLaMA-Factory's sharegpt preference format
  (``ranking: true``, see ``llamafactory_dataset_info``)::

    {"conversations": [{"from": "human", "value": "Hi"}], "system": "",
     "chosen": {"from": "gpt", "value": "Hello!"},
     "rejected": {"from": "gpt", "value": "Go away."}}

Exported records also carry metadata columns (``METADATA_COLUMNS``); every
tool above ignores columns it was not told about. Import accepts the same
shapes and a few close relatives (TRL's implicit-prompt format, where
``chosen``/``rejected`` hold the whole conversation; Axolotl's ``chatml.intel``
``{"system", "question", "chosen", "rejected"}``); metadata columns are
ignored on import.
"""

from __future__ import annotations

from typing import Any

from store.exchange.pair_format import ROLES, Pair

FORMATS = ("trl", "axolotl", "llamafactory")
METADATA_COLUMNS = (
    "pair_id", "source", "split", "chosen_adapter_version", "rejected_adapter_version", "created_at",
)
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
SHAREGPT_TAGS = {v: k for k, v in SHAREGPT_ROLES.items()}
FEEDBACK_COLUMNS = frozenset({"kind", "rating", "winner"})


class RecordError(ValueError):
    """One record is unusable: ``field`` names the column (or part of it)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f'"{field}" {message}')
        self.field = field
        self.message = message


class Unrepresentable(ValueError):
    """The pair cannot be written in the asked format (the reason says why)."""


# --- export -----------------------------------------------------------------


def to_record(fmt: str, pair: Pair) -> dict[str, Any]:
    """The record for ``pair`` in ``fmt`` (without metadata columns).

    Raises ``Unrepresentable`` when the format cannot hold the pair
    (LLaMA-Factory: a system message after the first turn, or turns that do
    not alternate human/gpt).
    """
    prompt = [{"role": m["role"], "content": m["content"]} for m in pair.prompt]
    if fmt == "trl":
        return {
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": pair.chosen}],
            "rejected": [{"role": "assistant", "content": pair.rejected}],
        }
    if fmt == "axolotl":
        return {
            "messages": prompt,
            "chosen": {"role": "assistant", "content": pair.chosen},
            "rejected": {"role": "assistant", "content": pair.rejected},
        }
    if fmt == "llamafactory":
        system = prompt[0]["content"] if prompt[0]["role"] == "system" else ""
        turns = prompt[1:] if prompt[0]["role"] == "system" else prompt
        for index, message in enumerate(turns):
            expected = "user" if index % 2 == 0 else "assistant"
            if message["role"] != expected:
                raise Unrepresentable(
                    "LLaMA-Factory needs user and assistant turns alternating after an optional first system "
                    f"message; turn {index + 1} is {message['role']!r}"
                )
        return {
            "conversations": [{"from": SHAREGPT_TAGS[m["role"]], "value": m["content"]} for m in turns],
            "system": system,
            "chosen": {"from": "gpt", "value": pair.chosen},
            "rejected": {"from": "gpt", "value": pair.rejected},
        }
    raise ValueError(f"unknown dataset format {fmt!r}; use one of {', '.join(FORMATS)}")


def llamafactory_dataset_info(file_name: str) -> dict[str, Any]:
    """The ``dataset_info.json`` entry that tells LLaMA-Factory how to read an
    export named ``file_name`` (placed in the same folder)."""
    return {
        "file_name": file_name,
        "formatting": "sharegpt",
        "ranking": True,
        "columns": {"messages": "conversations", "system": "system", "chosen": "chosen", "rejected": "rejected"},
        "tags": {
            "role_tag": "from", "content_tag": "value", "user_tag": "human",
            "assistant_tag": "gpt", "system_tag": "system",
        },
    }


# --- import -----------------------------------------------------------------


def detect_format(columns: set[str]) -> str:
    """The format a file is in, from its first record's columns.

    Raises ``ValueError`` naming the columns when no format fits.
    """
    if "conversations" in columns:
        return "llamafactory"
    if "messages" in columns or "question" in columns:
        return "axolotl"
    if {"chosen", "rejected"} <= columns:
        return "trl"
    if columns & FEEDBACK_COLUMNS:
        raise ValueError(
            "this looks like a raw feedback export (thumbs, A/B choices and corrections); those are for analysis and "
            "cannot be imported. Import a pair export (--format trl, axolotl or llamafactory) instead"
        )
    raise ValueError(
        f"cannot tell the format from the columns {sorted(columns)}: expected prompt/chosen/rejected (trl), "
        "messages/chosen/rejected (axolotl) or conversations/chosen/rejected (llamafactory); pass --format"
    )


def from_record(fmt: str, record: Any) -> Pair:
    """The pair a record describes. Raises ``RecordError`` naming the field."""
    if not isinstance(record, dict):
        raise RecordError("record", "must be a JSON object")
    if fmt == "trl":
        prompt, chosen, rejected = _from_trl(record)
    elif fmt == "axolotl":
        prompt, chosen, rejected = _from_axolotl(record)
    elif fmt == "llamafactory":
        prompt, chosen, rejected = _from_llamafactory(record)
    else:
        raise ValueError(f"unknown dataset format {fmt!r}; use one of {', '.join(FORMATS)}")
    if not prompt:
        raise RecordError(_prompt_field(fmt, record), "must hold at least one message")
    if prompt[-1]["role"] != "user":
        raise RecordError(_prompt_field(fmt, record), "must end with a user message")
    if chosen.strip() == rejected.strip():
        raise RecordError("rejected", "is the same answer as \"chosen\"; a pair needs two different answers")
    return Pair(prompt=prompt, chosen=chosen, rejected=rejected)


def _prompt_field(fmt: str, record: dict[str, Any]) -> str:
    if fmt == "trl":
        return "prompt" if "prompt" in record else "chosen"
    if fmt == "axolotl":
        return "messages" if "messages" in record else "question"
    return "conversations"


Messages = list[dict[str, str]]


def _messages(field: str, value: Any, role_key: str = "role", content_key: str = "content",
              roles: dict[str, str] | None = None) -> Messages:
    if not isinstance(value, list):
        raise RecordError(field, "must be a list of messages")
    found = []
    for index, message in enumerate(value):
        found.append(_message(f"{field}[{index}]", message, role_key, content_key, roles))
    return found


def _message(field: str, value: Any, role_key: str = "role", content_key: str = "content",
             roles: dict[str, str] | None = None) -> dict[str, str]:
    if not isinstance(value, dict):
        raise RecordError(field, f'must be a message object with "{role_key}" and "{content_key}"')
    role = value.get(role_key)
    allowed = roles or {r: r for r in ROLES}
    if role not in allowed:
        raise RecordError(f"{field}.{role_key}", f"must be one of {', '.join(allowed)}, got {role!r}")
    content = value.get(content_key)
    if not isinstance(content, str):
        raise RecordError(f"{field}.{content_key}", "must be a string")
    return {"role": allowed[role], "content": content}


def _answer(field: str, value: Any, role_key: str = "role", content_key: str = "content",
            roles: dict[str, str] | None = None) -> str:
    """An answer given as text, as one assistant message, or as a message list
    whose last message is the answer."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, dict):
        text = _assistant(field, _message(field, value, role_key, content_key, roles))
    elif isinstance(value, list) and value:
        last = _messages(field, value, role_key, content_key, roles)[-1]
        text = _assistant(f"{field}[{len(value) - 1}]", last)
    else:
        raise RecordError(field, "must be a non-empty list of messages")
    if not text.strip():
        raise RecordError(field, "must not be an empty answer")
    return text


def _assistant(field: str, message: dict[str, str]) -> str:
    if message["role"] != "assistant":
        raise RecordError(field, f"must be an assistant message, got role {message['role']!r}")
    return message["content"]


def _required(record: dict[str, Any], field: str) -> Any:
    if field not in record or record[field] is None:
        raise RecordError(field, "is missing")
    return record[field]


def _from_trl(record: dict[str, Any]) -> tuple[Messages, str, str]:
    chosen_value = _required(record, "chosen")
    rejected_value = _required(record, "rejected")
    prompt_value = record.get("prompt")
    if prompt_value is None:
        # Implicit prompt: chosen and rejected are whole conversations that share all but the answer.
        chosen_all = _messages("chosen", chosen_value)
        rejected_all = _messages("rejected", rejected_value)
        if len(chosen_all) < 2:
            raise RecordError("chosen", "must hold the conversation and the answer when there is no \"prompt\"")
        if chosen_all[:-1] != rejected_all[:-1]:
            raise RecordError("rejected", "must share every message but the last with \"chosen\"")
        prompt = chosen_all[:-1]
        return prompt, _text("chosen", chosen_all), _text("rejected", rejected_all)
    if isinstance(prompt_value, str):
        prompt = [{"role": "user", "content": prompt_value}]
    else:
        prompt = _messages("prompt", prompt_value)
    return prompt, _answer("chosen", chosen_value), _answer("rejected", rejected_value)


def _text(field: str, conversation: Messages) -> str:
    text = _assistant(f"{field}[{len(conversation) - 1}]", conversation[-1])
    if not text.strip():
        raise RecordError(field, "must not end with an empty answer")
    return text


def _from_axolotl(record: dict[str, Any]) -> tuple[Messages, str, str]:
    if "messages" in record:
        value = _required(record, "messages")
        prompt = [{"role": "user", "content": value}] if isinstance(value, str) else _messages("messages", value)
    elif "question" in record:  # chatml.intel
        question = _required(record, "question")
        if not isinstance(question, str):
            raise RecordError("question", "must be a string")
        prompt = [{"role": "user", "content": question}]
        system = record.get("system")
        if system:
            if not isinstance(system, str):
                raise RecordError("system", "must be a string")
            prompt.insert(0, {"role": "system", "content": system})
    else:
        raise RecordError("messages", 'is missing (or "question", for chatml.intel records)')
    return prompt, _answer("chosen", _required(record, "chosen")), _answer("rejected", _required(record, "rejected"))


def _from_llamafactory(record: dict[str, Any]) -> tuple[Messages, str, str]:
    keys = {"role_key": "from", "content_key": "value", "roles": SHAREGPT_ROLES}
    prompt = _messages("conversations", _required(record, "conversations"), **keys)
    system = record.get("system")
    if system:
        if not isinstance(system, str):
            raise RecordError("system", "must be a string")
        if prompt and prompt[0]["role"] == "system":
            raise RecordError("system", "is given twice: in \"system\" and as the first conversation turn")
        prompt.insert(0, {"role": "system", "content": system})
    chosen = _answer("chosen", _required(record, "chosen"), **keys)
    rejected = _answer("rejected", _required(record, "rejected"), **keys)
    return prompt, chosen, rejected
