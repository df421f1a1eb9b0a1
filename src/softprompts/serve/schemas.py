"""The HTTP API's request bodies (pydantic; FastAPI validates them and documents them in the OpenAPI schema).
Error responses are ``errors.py``."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path
from pydantic import BaseModel as Body
from pydantic import Field

from softprompts.serve.registry import NAME_PATTERN

# the name rule is documented in the schema; the registry checks it (an invalid name answers 400, not 422)
_NAMED = {"pattern": NAME_PATTERN, "maxLength": 128}
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


__all__ = ["AdapterName", "ClassifyBody", "CompletionBody"]
