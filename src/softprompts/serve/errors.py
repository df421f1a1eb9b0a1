"""The HTTP API's error responses (OpenAI's shape), for every route, and how they are documented.

Every error is ``{"error": {"message", "type", "param", "code"}}`` with a message that names the problem:

| status | when |
|---|---|
| 400 | invalid adapter name, prompt + virtual tokens + ``max_tokens`` over the context (limit named), bad labels, a
  field this server does not implement (or an OpenAI field at a value it does not implement; all of them named) |
| 404 | unknown adapter (or route) |
| 405 | a method the route does not take |
| 409 | an adapter that fails validation (malformed files, another base model, non-finite values) |
| 422 | a body that is not JSON, not a JSON object, or has an invalid field (``param`` names it; pydantic's ``detail``
  list is kept beside the error) |
| 429 | admission control: the waiting queue is full, or the request alone needs more KV than the server's budget
  (with ``Retry-After``) |
| 500 | a server fault (JSON like the rest, and counted by ``/metrics``) |

``ERROR_RESPONSES`` documents these in the OpenAPI schema, so clients generated from it know every answer.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from softprompts.adapter import AdapterError
from softprompts.errors import SoftpromptsError
from softprompts.model.generation import ContextLengthError
from softprompts.serve.admission import Overloaded
from softprompts.serve.registry import InvalidAdapterName, UnknownAdapter
from softprompts.serve.schemas import UNSUPPORTED

log = logging.getLogger("softprompts.serve")


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorBody(BaseModel):
    error: ErrorInfo


class FieldProblem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorBody(ErrorBody):
    detail: list[FieldProblem] = []  # pydantic's problems, when the body failed its schema


def _documented(status: int, description: str, model: type[BaseModel] = ErrorBody) -> dict:
    return {status: {"model": model, "description": description}}


ERROR_RESPONSES: dict[int, dict] = {
    **_documented(400, "Invalid request: adapter name, context length, labels, unsupported fields (the message names "
                       "the problem)"),
    **_documented(404, "Unknown adapter"),
    **_documented(409, "The adapter fails validation (its error is the message)"),
    **_documented(422, "The body is not a JSON object, or a field is invalid (`param` names it)", ValidationErrorBody),
    **_documented(429, "The server is at capacity (see Retry-After) or the request exceeds its KV budget"),
    **_documented(500, "Server fault"),
}

# library error -> (HTTP status, OpenAI error type, the request field it is about)
ERROR_STATUS: dict[type[Exception], tuple[int, str, str | None]] = {
    Overloaded: (429, "rate_limit_error", None),
    UnknownAdapter: (404, "not_found_error", "model"),
    InvalidAdapterName: (400, "invalid_request_error", "model"),
    ContextLengthError: (400, "invalid_request_error", "prompt"),
    AdapterError: (409, "adapter_error", "model"),
    SoftpromptsError: (400, "invalid_request_error", None),
}


def error_response(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(
        status_code=status, content={"error": {"message": message, "type": kind, "param": param, "code": status}}
    )


def _validation_message(content_type: str | None, first: dict) -> tuple[str, str | None]:
    """``(message, param)`` for the first problem of a body that failed validation."""
    kind, loc = first.get("type", ""), [p for p in first.get("loc", ()) if p != "body"]
    if kind == "json_invalid":
        where = f" at character {loc[0]}" if loc else ""
        reason = (first.get("ctx") or {}).get("error") or first.get("msg", "")
        return f"the request body is not valid JSON{where} ({reason}); send one JSON object", None
    if not loc and kind in ("model_attributes_type", "dict_type", "model_type"):
        content_type = content_type or "none"
        if "json" not in content_type:
            return (f"the request body must be a JSON object sent with 'Content-Type: application/json' (the "
                    f"request's content type is {content_type!r})"), None
        return "the request body must be a JSON object with the fields of this endpoint", None
    field = ".".join(str(p) for p in loc) or (first.get("ctx") or {}).get("field")  # a whole-body rule names one
    message = first.get("msg", "invalid value")
    return (f"invalid field {field!r}: {message}" if field else message), field


def _unsupported_fields(errors: list[dict]) -> str | None:
    """The message for fields this server does not implement (unknown ones, OpenAI ones at another value than
    their neutral one), naming all of them; ``None`` when there are none."""
    unknown = sorted({".".join(str(p) for p in e.get("loc", ()) if p != "body") for e in errors
                      if e.get("type") == "extra_forbidden"})
    valued = [e.get("msg", "") for e in errors if e.get("type") == UNSUPPORTED]
    parts = []
    if unknown:
        parts.append(f"unsupported field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}: this "
                     f"server does not implement {'them' if len(unknown) > 1 else 'it'} (ignoring a field would "
                     "change your results without telling you); remove it")
    parts += valued
    return "; ".join(parts) or None


def invalid_body_response(errors: list[dict], content_type: str | None) -> JSONResponse:
    """The answer to a body that failed its schema (pydantic's ``errors()``): 400 naming every field this server
    does not implement, else 422 naming the first problem, with pydantic's list kept beside it."""
    unsupported = _unsupported_fields(errors)
    if unsupported:
        return error_response(400, unsupported, "invalid_request_error", None)
    message, param = _validation_message(content_type, errors[0] if errors else {})
    content = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": 422},
               "detail": [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in errors]}
    return JSONResponse(status_code=422, content=content)


def error_of(exc: Exception) -> JSONResponse:
    """The answer to a library error raised by a request (``ERROR_STATUS``: its most specific class wins)."""
    for kind in type(exc).__mro__:
        if kind in ERROR_STATUS:
            status, name, param = ERROR_STATUS[kind]
            return error_response(status, str(exc), name, getattr(exc, "param", None) or param)
    raise exc


def install_error_handlers(app: FastAPI) -> None:
    """Map validation, HTTP and library errors to the responses above; each answers its own request only."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return invalid_body_response(exc.errors(), request.headers.get("content-type"))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        response = error_response(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}", kind)
        for key, value in (exc.headers or {}).items():
            response.headers[key] = value
        return response

    @app.exception_handler(Exception)
    async def _fault(request: Request, exc: Exception):
        log.exception("server error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal server error ({type(exc).__name__}); the server logged the details",
                              "server_error")

    for error, (status, kind, param) in ERROR_STATUS.items():  # the most specific class of an error wins (MRO)
        app.add_exception_handler(error, _handler(status, kind, param))


def _handler(status: int, kind: str, param: str | None):
    async def handle(request: Request, exc: Exception) -> JSONResponse:
        response = error_response(status, str(exc), kind, param)
        if getattr(exc, "retry_after", None) is not None:
            response.headers["Retry-After"] = str(exc.retry_after)
        return response

    return handle


__all__ = ["ERROR_RESPONSES", "ERROR_STATUS", "ErrorBody", "error_of", "error_response", "install_error_handlers",
           "invalid_body_response"]
