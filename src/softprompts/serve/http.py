"""The HTTP layer (FastAPI): a thin translation from OpenAI-style JSON to engine requests and back.

Endpoints: ``POST /v1/completions`` (``model`` = adapter name or ``base``; ``stream: true`` -> server-sent events),
``POST /v1/classify`` (rank classification over the adapter's labels), ``GET /v1/adapters``,
``POST /v1/adapters/{name}/load``, ``DELETE /v1/adapters/{name}``, ``GET /health``, ``GET /metrics``.

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: unknown adapter 404; invalid adapter
name or a prompt over the context limit 400 (the message names the limit); malformed body or invalid sampling
parameters 422 (``param`` names the field); an adapter that fails validation 409. Requests are independent: an
error answers that request only.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel as Body
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from softprompts.adapter import AdapterError
from softprompts.errors import SoftpromptsError
from softprompts.model.decode import Sampling
from softprompts.serve.batcher import Batcher
from softprompts.serve.engine import (
    ContextLengthError,
    Engine,
    GenerationRequest,
    GenerationResult,
    ScoreRequest,
)
from softprompts.serve.metrics import Metrics
from softprompts.serve.registry import BASE_NAME, InvalidAdapterName, Registry, UnknownAdapter
from softprompts.serve.text import classify_prompts, cut_at_stop, stream_safe_length


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


@dataclass
class ServerState:
    base: object
    engine: Engine
    registry: Registry
    batcher: Batcher
    metrics: Metrics


def build_state(
    base,
    adapters: str | Path,
    *,
    window_ms: float = 10.0,
    max_batch: int = 32,
    max_adapter_bytes: int = 1 << 30,
    poll_s: float = 2.0,
) -> ServerState:
    """Engine + registry (soft prompts converted to KV once, on load) + batching worker, not started yet."""
    metrics = Metrics()
    engine = Engine(base, max_batch=max_batch)
    registry = Registry(base, adapters, prepare=engine.prepare, max_bytes=max_adapter_bytes, poll_s=poll_s)
    batcher = Batcher(engine, window_s=window_ms / 1000, max_batch=max_batch, metrics=metrics)
    return ServerState(base=base, engine=engine, registry=registry, batcher=batcher, metrics=metrics)


def _error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(
        status_code=status, content={"error": {"message": message, "type": kind, "param": param, "code": status}}
    )


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI app over ``state``; its lifespan starts and stops the batching worker and the adapter poller."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.batcher.start()
        state.registry.start_polling()
        yield
        state.registry.stop()
        state.batcher.stop()

    app = FastAPI(title="softprompts", lifespan=lifespan)
    app.state.serve = state
    tokenizer = state.base.tokenizer
    metrics = state.metrics

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        field = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        message = f"invalid field {field!r}: {first.get('msg', 'invalid value')}" if field else str(first.get("msg"))
        response = _error(422, message, "invalid_request_error", field)
        body = json.loads(response.body)
        body["detail"] = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in errors]
        return JSONResponse(status_code=422, content=body)

    @app.exception_handler(UnknownAdapter)
    async def _unknown(request: Request, exc: UnknownAdapter):
        return _error(404, str(exc), "not_found_error", "model")

    @app.exception_handler(InvalidAdapterName)
    async def _bad_name(request: Request, exc: InvalidAdapterName):
        return _error(400, str(exc), "invalid_request_error", "model")

    @app.exception_handler(ContextLengthError)
    async def _too_long(request: Request, exc: ContextLengthError):
        return _error(400, str(exc), "invalid_request_error", "prompt")

    @app.exception_handler(AdapterError)
    async def _adapter_error(request: Request, exc: AdapterError):
        return _error(409, str(exc), "adapter_error", "model")

    @app.exception_handler(SoftpromptsError)
    async def _user_error(request: Request, exc: SoftpromptsError):
        return _error(400, str(exc), "invalid_request_error")

    @app.middleware("http")
    async def _count(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "other")
        metrics.inc("softprompts_requests_total", endpoint=endpoint, status=str(response.status_code))
        metrics.observe("softprompts_request_latency_seconds", time.perf_counter() - started, endpoint=endpoint)
        return response

    async def resolve(name: str):
        """``(artifact, entry)`` for an adapter name; ``base`` is the model alone."""
        if name == BASE_NAME:
            return None, None
        entry = await run_in_threadpool(state.registry.get, name)
        return entry.artifact, entry

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "model": state.base.name,
            "adapters": len(state.registry.entries()),
            "queued": state.batcher.pending,
        }

    @app.get("/metrics")
    async def metrics_text():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/adapters")
    async def list_adapters():
        return {"object": "list", "data": [e.describe() for e in state.registry.entries()]}

    @app.post("/v1/adapters/{name}/load")
    async def load_adapter(name: str):
        entry = await run_in_threadpool(state.registry.load, name)
        return entry.describe()

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str):
        await run_in_threadpool(state.registry.unload, name)
        return {"id": name, "deleted": True}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        artifact, _ = await resolve(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            return _error(422, "invalid field 'prompt': at least one prompt is required", "invalid_request_error", "prompt")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        stops = [s for s in stops if s]
        sampling = Sampling(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, seed=body.seed)
        problems = sampling.errors()
        if problems:
            return _error(422, problems[0], "invalid_request_error", problems[0].split()[0])
        virtual = artifact.length if artifact is not None else 0
        rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        for ids in rows:
            state.engine.check_length(len(ids), virtual, body.max_tokens)

        def stop_check(ids: list[int]) -> bool:
            text = tokenizer.decode(ids, skip_special_tokens=True)
            return any(s in text for s in stops)

        completion_id = f"cmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())

        def request(ids: list[int], on_token=None) -> GenerationRequest:
            return GenerationRequest(
                prompt_ids=ids,
                artifact=artifact,
                max_new_tokens=body.max_tokens,
                sampling=sampling,
                stop_check=stop_check if stops else None,
                on_token=on_token,
            )

        if body.stream:
            return StreamingResponse(
                _stream(state, rows, request, stops, completion_id, created, body.model),
                media_type="text/event-stream",
            )
        futures = [asyncio.wrap_future(state.batcher.submit(request(ids))) for ids in rows]
        results: list[GenerationResult] = await asyncio.gather(*futures)
        choices = []
        for index, result in enumerate(results):
            text, stopped = cut_at_stop(tokenizer.decode(result.tokens, skip_special_tokens=True), stops)
            reason = "stop" if stopped else result.finish_reason
            choices.append({"text": text, "index": index, "logprobs": None, "finish_reason": reason})
        prompt_tokens = sum(len(r) for r in rows)
        completion_tokens = sum(len(r.tokens) for r in results)
        metrics.inc("softprompts_prompt_tokens_total", prompt_tokens)
        metrics.inc("softprompts_generated_tokens_total", completion_tokens)
        for r in results:
            metrics.observe("softprompts_time_to_first_token_seconds", r.time_to_first_token_s)
        return {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": body.model,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    @app.post("/v1/classify")
    async def classify(body: ClassifyBody):
        if body.model == BASE_NAME:
            raise SoftpromptsError("classification needs an adapter with labels, not the base model")
        artifact, entry = await resolve(body.model)
        labels, prompts, targets = classify_prompts(entry.task, body.texts, body.labels, entry.name)
        candidates = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in targets]
        virtual = artifact.length
        requests = []
        for prompt in prompts:
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            state.engine.check_length(len(ids), virtual, max(len(c) for c in candidates))
            requests.append(ScoreRequest(prompt_ids=ids, candidates=candidates, artifact=artifact))
        scored = await asyncio.gather(*[asyncio.wrap_future(state.batcher.submit(r)) for r in requests])
        results = []
        for logprobs in scored:
            top = max(logprobs)
            weights = [math.exp(v - top) for v in logprobs]
            total = sum(weights)
            best = max(range(len(labels)), key=lambda j: logprobs[j])
            results.append({
                "label": labels[best],
                "scores": {label: w / total for label, w in zip(labels, weights, strict=True)},
                "logprobs": dict(zip(labels, logprobs, strict=True)),
            })
        return {"object": "classification", "model": body.model, "labels": labels, "results": results}

    return app


async def _stream(state: ServerState, rows, request, stops, completion_id, created, model):
    """Server-sent events: one ``text_completion`` chunk per text delta, a final chunk per choice, ``[DONE]``."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    tokenizer = state.base.tokenizer
    for index, ids in enumerate(rows):
        future = state.batcher.submit(
            request(ids, on_token=lambda tok, i=index: loop.call_soon_threadsafe(events.put_nowait, (i, tok, None)))
        )
        future.add_done_callback(lambda f, i=index: loop.call_soon_threadsafe(events.put_nowait, (i, None, f)))
    tokens: dict[int, list[int]] = {i: [] for i in range(len(rows))}
    sent = dict.fromkeys(tokens, 0)
    finished: set[int] = set()
    stopped: set[int] = set()

    def chunk(index: int, text: str, reason: str | None) -> str:
        payload = {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{"text": text, "index": index, "logprobs": None, "finish_reason": reason}],
        }
        return f"data: {json.dumps(payload)}\n\n"

    generated = 0
    while len(finished) < len(rows):
        index, tok, future = await events.get()
        if tok is not None:
            if index in stopped:
                continue
            tokens[index].append(tok)
            generated += 1
            text, hit = cut_at_stop(tokenizer.decode(tokens[index], skip_special_tokens=True), stops)
            safe = len(text) if hit else stream_safe_length(text, stops)
            if safe > sent[index]:
                yield chunk(index, text[sent[index] : safe], None)
                sent[index] = safe
            if hit:
                stopped.add(index)
            continue
        finished.add(index)
        error = future.exception()
        if error is not None:
            yield f"data: {json.dumps({'error': {'message': str(error), 'type': 'server_error'}})}\n\n"
            continue
        result: GenerationResult = future.result()
        text, hit = cut_at_stop(tokenizer.decode(result.tokens, skip_special_tokens=True), stops)
        rest = text[sent[index] :]
        yield chunk(index, rest, "stop" if hit else result.finish_reason)
        state.metrics.observe("softprompts_time_to_first_token_seconds", result.time_to_first_token_s)
    state.metrics.inc("softprompts_prompt_tokens_total", sum(len(r) for r in rows))
    state.metrics.inc("softprompts_generated_tokens_total", generated)
    yield "data: [DONE]\n\n"


def serve(state: ServerState, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the app with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(create_app(state), host=host, port=port, log_level=log_level)


__all__ = ["ClassifyBody", "CompletionBody", "ServerState", "build_state", "create_app", "serve"]
