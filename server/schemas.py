"""Request bodies of the JSON APIs (pydantic), in one module: routes import
their shapes from here, never from another route module.

``validate_chat`` checks a chat history against tuneloop's limits beyond its
shape (length of each message, who speaks last).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from server.errors import ApiError
from store.conversations import check_turn_count
from store.feedback import Rating, Winner
from store.settings import Settings

MAX_TAGS = 10
MAX_TAG_CHARS = 40
MAX_STOPS = 4
MAX_STOP_CHARS = 64
MAX_CONTENT_PARTS = 32


class FeedbackIn(BaseModel):
    rating: Rating
    comment: str | None = Field(None, max_length=2000)
    tags: list[str] = Field(default_factory=list, max_length=MAX_TAGS)

    @field_validator("tags")
    @classmethod
    def _clean_tags(cls, tags: list[str]) -> list[str]:
        cleaned = []
        for tag in tags:
            tag = tag.strip().lower()
            if not tag:
                continue
            if len(tag) > MAX_TAG_CHARS:
                raise ValueError(f"a tag may have at most {MAX_TAG_CHARS} characters")
            if tag not in cleaned:
                cleaned.append(tag)
        return cleaned


class ChoiceIn(BaseModel):
    winner: Winner


class CorrectionIn(BaseModel):
    text: str = Field(description="the answer you wanted instead; at most TUNELOOP_MAX_MESSAGE_CHARS characters")


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]

    @field_validator("content")
    @classmethod
    def _bounded_parts(cls, content: str | list[ContentPart]) -> str | list[ContentPart]:
        if isinstance(content, list) and len(content) > MAX_CONTENT_PARTS:
            raise ValueError(f"at most {MAX_CONTENT_PARTS} content parts; join the text into fewer")
        return content

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[ChatMessageIn] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=4)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)

    @field_validator("stop")
    @classmethod
    def _bounded_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences")
        if any(len(stop) > MAX_STOP_CHARS for stop in stops):
            raise ValueError(f"a stop sequence may have at most {MAX_STOP_CHARS} characters")
        return value


class ComparisonIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    messages: list[ChatMessageIn] = Field(min_length=1)
    temperature: float = Field(0.8, gt=0.0, le=2.0, description="> 0: two samples must differ")
    max_tokens: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0, le=2**62)
    only_if_selected: bool = Field(
        False,
        description="Let the server decide, as it does for a browser turn, whether this context is worth an A/B "
        "comparison (TUNELOOP_AB_SELECTION at TUNELOOP_AB_RATE). If not, one plain answer is returned instead: "
        '`"id": null, "b": null`. Either way the response has `"selection"`.',
    )
    canary: bool = Field(
        False,
        description="Pit the running canary (or, during the watch after a promotion, the version it replaced) "
        "against the active version: one side each, at random. 409 when none is being served.",
    )


def validate_chat(messages: list[ChatMessageIn], settings: Settings, answers: int = 1) -> list[dict[str, str]]:
    """Check a history (plus ``answers`` answers to it) against tuneloop's limits,
    before anything is stored or generated; return it as plain dicts."""
    check_turn_count(0, len(messages) + answers, settings.max_turns)
    plain = []
    for i, message in enumerate(messages):
        text = message.text()
        if len(text) > settings.max_message_chars:
            raise ApiError(
                400,
                f"messages.{i}.content is {len(text)} characters; the limit is "
                f"{settings.max_message_chars} (TUNELOOP_MAX_MESSAGE_CHARS)",
                f"messages.{i}.content",
            )
        plain.append({"role": message.role, "content": text})
    if plain[-1]["role"] != "user":
        raise ApiError(400, "the last message must have role `user`", "messages")
    if not plain[-1]["content"].strip():
        raise ApiError(400, "the last user message is empty", "messages")
    return plain
