"""The HTTP API's request bodies (pydantic; FastAPI validates them and documents them in the OpenAPI schema).
Error responses are ``errors.py``."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import Path
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from softprompts.serve.registry import NAME_PATTERN

# the name rule is documented in the schema; the registry checks it (an invalid name answers 400, not 422)
_NAMED = {"pattern": NAME_PATTERN, "maxLength": 128}


class Body(BaseModel):
    """A request body, validated strictly: a JSON value of another type than the schema says (``"seed": true``,
    ``"max_tokens": "8"``) is a 422, never coerced; a field this server does not implement is a 400 that names it
    (ignoring it would change the client's results without telling it)."""

    model_config = ConfigDict(strict=True, extra="forbid")


MAX_CHOICES = 16  # n
MAX_LOGPROBS = 20  # top alternatives per token (OpenAI allows 5 for completions, 20 for chat)
UNSUPPORTED = "unsupported_value"  # the error type of an OpenAI field sent with a value we do not implement


class OpenAIFields(Body):
    """OpenAI fields accepted only at their neutral value (what sending nothing means), so clients that always send
    them work; any other value is refused by name."""

    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def _unsupported(self) -> list[str]:
        return [name for name, bad in [
            ("presence_penalty", self.presence_penalty != 0),
            ("frequency_penalty", self.frequency_penalty != 0),
            ("logit_bias", bool(self.logit_bias)),
        ] if bad]

    @model_validator(mode="after")
    def _neutral_only(self):
        names = self._unsupported()
        if names:
            raise PydanticCustomError(UNSUPPORTED, "{fields}: this server does not implement "
                                      + ("them" if len(names) > 1 else "it") + "; remove or send the neutral value "
                                      "(what sending nothing means)", {"fields": ", ".join(names), "field": names[0]})
        return self


DEFAULT_CHAT_TOKENS = 256  # a chat answer ends at the end-of-turn token; this only bounds a runaway one
AdapterName = Annotated[str, Path(description="an adapter directory or TABLE.TASK", json_schema_extra=_NAMED)]


# -- request bodies ---------------------------------------------------------------------------------------------
class StreamOptions(Body):
    include_usage: bool = False


class GenerationFields(OpenAIFields):
    """What completions and chat completions share: the model to run, sampling, stops, streaming and ``n``
    choices (choice ``j`` sampled with ``seed + j``)."""

    model: str = Field(min_length=1, description="an adapter name or `base`", json_schema_extra=_NAMED)
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    ignore_eos: bool = Field(False, description="vLLM's extension: the end-of-sequence (and chat end-of-turn) "
                             "tokens do not end the answer; it runs to its token limit or a stop string")
    min_tokens: int = Field(0, ge=0, description="vLLM's extension: no stop token or stop string ends the answer "
                            "before this many tokens (stop tokens are masked until then)")

    def _min_within(self, limit: int) -> None:
        if self.min_tokens > limit:
            raise PydanticCustomError("min_tokens_over_max", "min_tokens ({min_tokens}) is more than the token "
                                      "limit ({limit})", {"field": "min_tokens", "min_tokens": self.min_tokens,
                                                          "limit": limit})


TokenIds = Annotated[list[int], Field(min_length=1)]
PROMPT_FORMS = ("a string, a list of strings, a list of token ids or a list of lists of token ids (each non-empty); "
                "token ids are integers")


def prompts_of(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """The prompts of a ``prompt`` field: each a text or a list of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    return [prompt] if isinstance(prompt[0], int) else list(prompt)


class CompletionBody(GenerationFields):
    """OpenAI ``/v1/completions``; ``top_k`` is an extension. ``logprobs: k``: each token's log-probability and its
    top ``k`` alternatives; ``echo``: the prompt comes back before the completion (with its own token logprobs when
    ``logprobs`` is set), and ``max_tokens: 0`` then scores the prompt only (loglikelihood evaluation). ``n``
    choices per prompt, choice ``j`` sampled with ``seed + j``."""

    prompt: str | Annotated[list[str], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
    max_tokens: int = Field(16, ge=0)
    best_of: int | None = Field(None, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None

    def _unsupported(self) -> list[str]:
        return [*super()._unsupported(), *[name for name, bad in [
            ("best_of", self.best_of not in (None, self.n)),
            ("suffix", bool(self.suffix)),
        ] if bad]]

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt_forms(cls, value, handler):
        """One message naming the four forms, instead of one error per form of the union."""
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("prompt_form", "prompt must be " + PROMPT_FORMS) from None

    @property
    def prompts(self) -> list[str | list[int]]:
        return prompts_of(self.prompt)

    @model_validator(mode="after")
    def _tokens_to_generate(self):
        self._min_within(self.max_tokens)
        if self.max_tokens == 0 and not self.echo:
            raise PydanticCustomError("max_tokens_zero", "max_tokens 0 generates nothing: it is only allowed with "
                                      "echo (the prompt and, with logprobs, its token log-probabilities)",
                                      {"field": "max_tokens"})
        if self.stream and self.echo and self.logprobs is not None:
            raise PydanticCustomError(UNSUPPORTED, "echo with logprobs is not streamed; send stream: false",
                                      {"field": "stream"})
        return self


class ClassifyBody(Body):
    """``model``: a classification adapter; ``texts``: strings (fill the prompt template) or rows (dicts)."""

    model: str = Field(min_length=1, description="a classification adapter", json_schema_extra=_NAMED)
    texts: list[str | dict[str, str]] = Field(min_length=1, max_length=256)
    labels: list[str] | None = Field(None, min_length=2)


class ContentPart(BaseModel):
    """A part of a message's content. Only text parts are served; a part of another type (``image_url``,
    ``input_audio``, ...) is refused by name, so it may carry that type's fields."""

    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self):
        if self.type != "text":
            raise PydanticCustomError(UNSUPPORTED, "content parts of type '{kind}': this server serves a text "
                                      'model; send text parts only ({"type": "text", "text": "..."})',
                                      {"kind": self.type, "field": "content"})
        if self.text is None:
            raise PydanticCustomError("missing_text", "a text content part needs 'text'", {"field": "text"})
        return self


class ChatMessage(Body):
    """A message; ``content`` is a string or a list of text parts (joined by newlines, as vLLM joins them)."""

    role: Literal["system", "user", "assistant"]
    content: str | Annotated[list[ContentPart], Field(min_length=1)]
    name: str | None = None

    @field_validator("content", mode="wrap")
    @classmethod
    def _content_forms(cls, value, handler):
        """A list's own problem (a part's, named by its index), not the string branch's of the union."""
        try:
            return handler(value)
        except ValidationError as exc:
            if not isinstance(value, list):
                raise PydanticCustomError("content_form", "content must be a string or a list of text parts") from None
            first = next(e for e in exc.errors() if str(e["loc"][0]).startswith("list["))
            where = f"part {first['loc'][1]}: " if len(first["loc"]) > 1 else ""
            raise PydanticCustomError(first["type"], where + first["msg"]) from None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(part.text for part in self.content)

    def rendered(self) -> dict:
        """The message as the chat template takes it: content as one string."""
        return {**self.model_dump(exclude_none=True, exclude={"content"}), "content": self.text}


class ResponseFormat(Body):
    type: str = "text"  # only "text" is served (json_object / json_schema: a 400 naming response_format)


class ChatBody(GenerationFields):
    """OpenAI ``/v1/chat/completions``; the conversation is rendered with the model's chat template (and an adapter's
    placement). ``max_completion_tokens`` is OpenAI's newer name for ``max_tokens``; ``logprobs: true`` with
    ``top_logprobs: k`` gives each answer token's log-probability and top ``k`` alternatives."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None

    def _unsupported(self) -> list[str]:
        wants_json = self.response_format is not None and self.response_format.type != "text"
        return [*super()._unsupported(), *(["response_format"] if wants_json else [])]

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        self._min_within(self.limit)
        if self.top_logprobs is not None and not self.logprobs:
            raise PydanticCustomError("top_logprobs_without_logprobs", "top_logprobs needs logprobs: true",
                                      {"field": "top_logprobs"})
        return self

    @property
    def limit(self) -> int:
        return self.max_completion_tokens or self.max_tokens or DEFAULT_CHAT_TOKENS


class TokenizeBody(Body):
    """vLLM's ``/tokenize``: a text's token ids as ``/v1/completions`` would use them (without special tokens,
    unless ``add_special_tokens``)."""

    prompt: str
    model: str | None = None
    add_special_tokens: bool = False


class DetokenizeBody(Body):
    """vLLM's ``/detokenize``: the text of token ids."""

    tokens: list[int]
    model: str | None = None


__all__ = ["MAX_CHOICES", "MAX_LOGPROBS", "UNSUPPORTED", "AdapterName", "ChatBody", "ChatMessage", "ClassifyBody",
           "CompletionBody", "ContentPart", "DetokenizeBody", "TokenizeBody", "prompts_of"]
