"""The HTTP API's request bodies (pydantic; FastAPI validates them and documents them in the OpenAPI schema).
Error responses are ``errors.py``."""

from __future__ import annotations

from pydantic import BaseModel as Body
from pydantic import Field


# -- request bodies ---------------------------------------------------------------------------------------------
class CompletionBody(Body):
    """OpenAI ``/v1/completions`` fields we serve (others are ignored); ``top_k`` and ``seed`` are extensions."""

    model: str = Field(min_length=1)
    prompt: str | list[str]
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

    model: str = Field(min_length=1)
    texts: list[str | dict[str, str]] = Field(min_length=1, max_length=256)
    labels: list[str] | None = Field(None, min_length=2)


__all__ = ["ClassifyBody", "CompletionBody"]
