"""The generation routes: ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/classify``, module-level functions
on ``router`` (``http.py`` includes it), each a thin translation from OpenAI-style JSON to engine requests (token ids
+ artifacts, ``translate.py``) and back (``answers.py``; streams: ``streaming.py``).

Completions send the prompt text as it is (a ``<|virtual|>`` marker in it places the soft prompt there). Chat
renders the conversation with the model's chat template and the adapter's placement (``data/chat.py``), stops at
the template's end-of-turn token, and answers with an assistant message. Every request goes to the same scheduler,
so completion and chat requests of any adapters share batches. A client that disconnects while its request waits or
decodes frees its rows at the next step (``results_or_cancel``; streams cancel theirs when they close).
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from softprompts.errors import SoftpromptsError
from softprompts.serve.answers import AnswerShape, classification, whole_answer
from softprompts.serve.errors import ERROR_RESPONSES
from softprompts.serve.plan import RequestPlan, plan_generation, plan_scores
from softprompts.serve.registry import BASE_NAME, Entry
from softprompts.serve.schemas import ChatBody, ClassifyBody, CompletionBody
from softprompts.serve.state import ServerState
from softprompts.serve.streaming import stream_completions
from softprompts.serve.translate import Generation, score_requests

STREAMED = {**ERROR_RESPONSES, 200: {
    "description": "The completion, or with `stream: true` server-sent events ending with `data: [DONE]`",
    "content": {"application/json": {}, "text/event-stream": {}}}}


DISCONNECT_POLL_S = 0.1  # how often a waiting non-streaming request checks whether its client is still there
CLIENT_CLOSED = 499  # the response status (never sent) of a request whose client left: nginx's convention


async def results_or_cancel(http: Request, scheduler, futures: list) -> list | None:
    """The futures' results, or ``None`` when the client disconnects first; either way no row outlives its request
    (a cancelled row leaves the batch at the next step)."""
    gathered = asyncio.gather(*[asyncio.wrap_future(f) for f in futures])
    try:
        while True:
            done, _ = await asyncio.wait({gathered}, timeout=DISCONNECT_POLL_S)
            if done:
                return gathered.result()
            if await http.is_disconnected():
                return None
    finally:
        for future in futures:
            scheduler.cancel(future)
        if not gathered.done():
            gathered.cancel()
        gathered.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: no "never retrieved" log


router = APIRouter()


def served(http: Request) -> ServerState:
    """What the server holds (``create_app`` keeps it on the app)."""
    return http.app.state.serve


async def resolve(state: ServerState, name: str) -> Entry | None:
    """The registry entry of an adapter name (``None`` for ``base``, the model alone)."""
    return None if name == BASE_NAME else await run_in_threadpool(state.registry.get, name)


async def answer(http: Request, state: ServerState, plan: RequestPlan, shape: AnswerShape):
    """Run ``plan`` (its placed artifacts resolved in a thread: a new lead's is computed once): a stream of
    server-sent events with ``stream: true``, else the whole answer once every choice (and, with ``echo`` and
    ``logprobs``, every prompt's scoring) is done."""
    artifacts = await run_in_threadpool(state.artifacts, plan.adapter, plan.prompts)
    generation = Generation(plan, artifacts, state.base.tokenizer)
    if generation.body.stream:
        return StreamingResponse(stream_completions(state, generation, shape), media_type="text/event-stream")
    futures = ([state.scheduler.submit(generation.request(i)) for i in range(len(generation.rows))]
               if generation.max_tokens else [])
    scored = [state.scheduler.submit(r) for r in generation.prompt_requests()]
    answers = await results_or_cancel(http, state.scheduler, futures + scored)
    if answers is None:
        return Response(status_code=CLIENT_CLOSED)
    results = answers[: len(futures)] or generation.nothing_generated()
    whole = whole_answer(state.base.tokenizer, shape, generation, results, answers[len(futures) :])
    state.metrics.tokens(generation.body.model, generation.prompt_tokens, whole["usage"]["completion_tokens"])
    return whole


@router.post("/v1/completions", responses=STREAMED)
async def completions(body: CompletionBody, http: Request):
    state = served(http)
    entry = await resolve(state, body.model)
    shape = AnswerShape.of(body)
    return await answer(http, state, plan_generation(state.base, entry, body), shape)


@router.post("/v1/chat/completions", responses=STREAMED)
async def chat_completions(body: ChatBody, http: Request):
    state = served(http)
    entry = await resolve(state, body.model)
    plan = plan_generation(state.base, entry, body)
    return await answer(http, state, plan, AnswerShape.of(body, chat=True))


@router.post("/v1/classify", responses=ERROR_RESPONSES)
async def classify(body: ClassifyBody, http: Request):
    if body.model == BASE_NAME:
        raise SoftpromptsError("classification needs an adapter with labels, not the base model")
    state = served(http)
    entry = await resolve(state, body.model)
    plan = plan_scores(state.base, entry, body)
    requests = score_requests(plan, await run_in_threadpool(state.artifacts, entry, plan.prompts))
    scored = await asyncio.gather(*[asyncio.wrap_future(state.scheduler.submit(r)) for r in requests])
    state.metrics.tokens(body.model, sum(len(r.prompt_ids) for r in requests), 0)
    return classification(body.model, plan.labels, scored)


__all__ = ["CLIENT_CLOSED", "DISCONNECT_POLL_S", "STREAMED", "results_or_cancel", "router", "served"]
