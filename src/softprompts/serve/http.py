"""The HTTP layer (FastAPI): the app, its lifespan, the response counter, and the adapter and health routes
(module-level functions on ``router``, reading what the server holds from the app); the generation routes are
``routes.py``'s ``router``.

Endpoints: ``POST /v1/completions`` and ``POST /v1/chat/completions`` (``model`` = adapter name or ``base``;
``stream: true`` -> server-sent events), ``POST /v1/classify`` (rank classification over the adapter's labels),
``GET /v1/models`` (OpenAI's list), ``GET /v1/adapters``, ``POST /v1/adapters/{name}/load``,
``DELETE /v1/adapters/{name}``, ``GET /health``,
``GET /metrics``.

Request bodies live in ``schemas.py``, error responses (OpenAI's shape, every status documented) in ``errors.py``,
server-sent events in ``streaming.py``, what the server holds in ``state.py``. Requests are independent: an error
answers that request only.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import PlainTextResponse
from starlette.concurrency import run_in_threadpool

from softprompts.serve.errors import ERROR_RESPONSES, install_error_handlers
from softprompts.serve.metrics import CONTENT_TYPE
from softprompts.serve.registry import BASE_NAME
from softprompts.serve.routes import router as generation_router
from softprompts.serve.routes import served
from softprompts.serve.schemas import AdapterName
from softprompts.serve.state import ServerState, build_state
from softprompts.serve.tokens import router as tokenizer_router


class ResponseCounter:
    """ASGI middleware counting every response by route and status, with its latency (a pure ASGI wrapper, not
    ``BaseHTTPMiddleware``: that one hides a client's disconnect from the routes, which cancel on it)."""

    def __init__(self, app, metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # an exception escaping the routes becomes the 500 of errors.py: count it as one

        async def send_counted(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            endpoint = getattr(scope.get("route"), "path", "other")
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)


router = APIRouter()


@router.get("/health")
async def health(http: Request):
    state = served(http)
    return {
        "status": "ok",
        "model": state.base.name,
        "adapters": len(state.registry.entries()),
        "running": state.scheduler.running,
        "queued": state.scheduler.pending,
    }


@router.get("/metrics", response_class=PlainTextResponse,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text exposition format"}})
async def metrics_text(http: Request):
    return PlainTextResponse(served(http).metrics.render(), media_type=CONTENT_TYPE)


@router.get("/v1/models")
async def list_models(http: Request):
    """OpenAI's model list: ``base`` (the model alone) and every adapter and table task, so clients that list
    models before they call work."""
    state = served(http)
    created = int(state.started)
    rows = [{"id": BASE_NAME, "object": "model", "created": created, "owned_by": "softprompts",
             "root": state.base.name, "parent": None}]
    rows += [{"id": e.name, "object": "model", "created": int(e.loaded_at) or created, "owned_by": "softprompts",
              "root": state.base.name, "parent": BASE_NAME, "method": e.method, "task": e.task_kind}
             for e in state.registry.entries()]
    return {"object": "list", "data": rows}


@router.get("/v1/adapters")
async def list_adapters(http: Request):
    return {"object": "list", "data": [e.describe() for e in served(http).registry.entries()]}


@router.post("/v1/adapters/{name}/load", responses=ERROR_RESPONSES)
async def load_adapter(name: AdapterName, http: Request):
    entry = await run_in_threadpool(served(http).registry.load, name)
    return entry.describe()


@router.delete("/v1/adapters/{name}", responses=ERROR_RESPONSES)
async def unload_adapter(name: AdapterName, http: Request):
    await run_in_threadpool(served(http).registry.unload, name)
    return {"id": name, "deleted": True}


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI app over ``state``; its lifespan starts and stops the batching worker and the adapter poller."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.scheduler.start()
        state.registry.start_polling()
        yield
        state.registry.stop()
        state.scheduler.stop()

    app = FastAPI(title="softprompts", lifespan=lifespan)
    app.state.serve = state  # what the routes read (``routes.served``)
    install_error_handlers(app)
    app.add_middleware(ResponseCounter, metrics=state.metrics)
    app.include_router(router)
    app.include_router(generation_router)
    app.include_router(tokenizer_router)
    return app


def serve(state: ServerState, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the app with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(create_app(state), host=host, port=port, log_level=log_level)


__all__ = ["ServerState", "build_state", "create_app", "serve"]
