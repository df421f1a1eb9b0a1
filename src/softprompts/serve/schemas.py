"""The HTTP API's request bodies and its error responses (OpenAI's shape), shared by the routes in ``http.py``.

Errors: ``{"error": {"message", "type", "param", "code"}}``; unknown adapter 404; invalid adapter name or a prompt
over the context limit 400 (the message names the limit); malformed body or invalid sampling parameters 422
(``param`` names the field; pydantic's own ``detail`` list is kept beside it); an adapter that fails validation 409.
"""

from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel as Body
from pydantic import Field

from softprompts.adapter import AdapterError
from softprompts.errors import SoftpromptsError
from softprompts.model.decode import ContextLengthError
from softprompts.serve.registry import InvalidAdapterName, UnknownAdapter


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


def error_response(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(
        status_code=status, content={"error": {"message": message, "type": kind, "param": param, "code": status}}
    )


# library error -> (HTTP status, OpenAI error type, the request field it is about)
ERROR_STATUS: dict[type[Exception], tuple[int, str, str | None]] = {
    UnknownAdapter: (404, "not_found_error", "model"),
    InvalidAdapterName: (400, "invalid_request_error", "model"),
    ContextLengthError: (400, "invalid_request_error", "prompt"),
    AdapterError: (409, "adapter_error", "model"),
    SoftpromptsError: (400, "invalid_request_error", None),
}


def install_error_handlers(app: FastAPI) -> None:
    """Map validation and library errors to the responses above; each answers its own request only."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        field = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        message = f"invalid field {field!r}: {first.get('msg', 'invalid value')}" if field else str(first.get("msg"))
        response = error_response(422, message, "invalid_request_error", field)
        body = json.loads(response.body)
        body["detail"] = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in errors]
        return JSONResponse(status_code=422, content=body)

    for error, (status, kind, param) in ERROR_STATUS.items():  # the most specific class of an error wins (MRO)
        app.add_exception_handler(error, _handler(status, kind, param))


def _handler(status: int, kind: str, param: str | None):
    async def handle(request: Request, exc: Exception) -> JSONResponse:
        return error_response(status, str(exc), kind, param)

    return handle


__all__ = ["ClassifyBody", "CompletionBody", "error_response", "install_error_handlers"]
