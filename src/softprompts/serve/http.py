"""The HTTP layer (FastAPI): a thin translation from OpenAI-style JSON to engine requests and back.

Endpoints: ``POST /v1/completions`` (``model`` = adapter name or ``base``; ``stream: true`` -> server-sent events),
``POST /v1/classify`` (rank classification over the adapter's labels), ``GET /v1/adapters``,
``POST /v1/adapters/{name}/load``, ``DELETE /v1/adapters/{name}``, ``GET /health``, ``GET /metrics``.

Request bodies and error responses (OpenAI's shape; 404/400/422/409) live in ``schemas.py``, server-sent events
in ``streaming.py``. Requests are independent: an error answers that request only.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from softprompts.errors import SoftpromptsError
from softprompts.model.decode import GenerationRequest, GenerationResult, Sampling
from softprompts.serve.batcher import Batcher
from softprompts.serve.engine import Engine, ScoreRequest
from softprompts.serve.errors import ERROR_RESPONSES, error_response, install_error_handlers
from softprompts.serve.metrics import Metrics
from softprompts.serve.registry import BASE_NAME, Registry
from softprompts.serve.schemas import AdapterName, ClassifyBody, CompletionBody
from softprompts.serve.streaming import stream_completions
from softprompts.serve.text import classify_prompts, cut_at_stop


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

    install_error_handlers(app)

    @app.middleware("http")
    async def _count(request: Request, call_next):
        started = time.perf_counter()
        status = 500  # an exception escaping the routes becomes the 500 of errors.py: count it as one
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            endpoint = getattr(request.scope.get("route"), "path", "other")
            metrics.inc("softprompts_requests_total", endpoint=endpoint, status=str(status))
            metrics.observe("softprompts_request_latency_seconds", time.perf_counter() - started, endpoint=endpoint)

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

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text exposition format"}})
    async def metrics_text():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/adapters")
    async def list_adapters():
        return {"object": "list", "data": [e.describe() for e in state.registry.entries()]}

    @app.post("/v1/adapters/{name}/load", responses=ERROR_RESPONSES)
    async def load_adapter(name: AdapterName):
        entry = await run_in_threadpool(state.registry.load, name)
        return entry.describe()

    @app.delete("/v1/adapters/{name}", responses=ERROR_RESPONSES)
    async def unload_adapter(name: AdapterName):
        await run_in_threadpool(state.registry.unload, name)
        return {"id": name, "deleted": True}

    @app.post("/v1/completions", responses={
        **ERROR_RESPONSES,
        200: {"description": "A text_completion object, or with `stream: true` server-sent events ending with "
                             "`data: [DONE]`", "content": {"application/json": {}, "text/event-stream": {}}}})
    async def completions(body: CompletionBody):
        artifact, _ = await resolve(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        stops = [s for s in stops if s]
        sampling = Sampling(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, seed=body.seed)
        problems = sampling.errors()
        if problems:
            return error_response(422, problems[0], "invalid_request_error", problems[0].split()[0])
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
                stream_completions(state, rows, request, stops, completion_id, created, body.model),
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

    @app.post("/v1/classify", responses=ERROR_RESPONSES)
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
            state.engine.check_length(len(ids), virtual, max(len(c) for c in candidates), "label tokens")
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


def serve(state: ServerState, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the app with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(create_app(state), host=host, port=port, log_level=log_level)


__all__ = ["ServerState", "build_state", "create_app", "serve"]
