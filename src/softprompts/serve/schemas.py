"""The HTTP API's request bodies (pydantic; FastAPI validates them and documents them in the OpenAPI schema).
Error responses are ``errors.py``."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import Path
from pydantic import BaseModel, ConfigDict, Field

from softprompts.serve.registry import NAME_PATTERN

# the name rule is documented in the schema; the registry checks it (an invalid name answers 400, not 422)
_NAMED = {"pattern": NAME_PATTERN, "maxLength": 128}
class Body(BaseModel):
    """A request body, validated strictly: a JSON value of another type than the schema says (``"seed": true``,
    ``"max_tokens": "8"``) is a 422, never coerced."""

    model_config = ConfigDict(strict=True)


DEFAULT_CHAT_TOKENS = 256  # a chat answer ends at the end-of-turn token; this only bounds a runaway one
AdapterName = Annotated[str, Path(description="an adapter directory or TABLE.TASK", json_schema_extra=_NAMED)]


# -- request bodies ---------------------------------------------------------------------------------------------
class CompletionBody(Body):
    """OpenAI ``/v1/completions`` fields we serve (others are ignored); ``top_k`` and ``seed`` are extensions."""

    model: str = Field(min_length=1, description="an adapter name or `base`", json_schema_extra=_NAMED)
    prompt: str | Annotated[list[str], Field(min_length=1)]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)
    user: str | None = None


class ClassifyBody(Body):
    """``model``: a classification adapter; ``texts``: strings (fill the prompt template) or rows (dicts)."""

    model: str = Field(min_length=1, description="a classification adapter", json_schema_extra=_NAMED)
    texts: list[str | dict[str, str]] = Field(min_length=1, max_length=256)
    labels: list[str] | None = Field(None, min_length=2)




class ChatMessage(Body):
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class StreamOptions(Body):
    include_usage: bool = False


class ChatBody(Body):
    """OpenAI ``/v1/chat/completions`` fields we serve; the conversation is rendered with the model's chat template
    (and an adapter's placement). ``max_completion_tokens`` is OpenAI's newer name for ``max_tokens``."""

    model: str = Field(min_length=1, description="an adapter name or `base`", json_schema_extra=_NAMED)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)
    user: str | None = None

    @property
    def limit(self) -> int:
        return self.max_completion_tokens or self.max_tokens or DEFAULT_CHAT_TOKENS


__all__ = ["AdapterName", "ChatBody", "ChatMessage", "ClassifyBody", "CompletionBody"]
