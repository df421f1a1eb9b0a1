"""The generation routes: ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/classify``, each a thin
translation from OpenAI-style JSON to engine requests (token ids + artifacts) and back.

Completions send the prompt text as it is (a ``<|virtual|>`` marker in it places the soft prompt there). Chat
renders the conversation with the model's chat template and the adapter's placement (``data/chat.py``), stops at
the template's end-of-turn token, and answers with an assistant message. Every request goes to the same scheduler,
so completion and chat requests of any adapters share batches. A client that disconnects while its request waits or
decodes frees its rows at the next step (``results_or_cancel``; streams cancel theirs when they close).
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from softprompts.errors import SoftpromptsError
from softprompts.model.generation import GenerationRequest, GenerationResult, Sampling, eos_ids
from softprompts.serve.engine import PromptLogprobsRequest, ScoreRequest
from softprompts.serve.errors import ERROR_RESPONSES
from softprompts.serve.logprobs import chat_logprobs, completion_logprobs, join_completion_logprobs, token_texts, within
from softprompts.serve.registry import BASE_NAME
from softprompts.serve.schemas import ChatBody, ClassifyBody, CompletionBody
from softprompts.serve.state import ServerState
from softprompts.serve.streaming import StreamShape, stream_completions
from softprompts.serve.text import classify_prompts, cut_at_stop
from softprompts.tasks import split_prompt

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


def add_generation_routes(app: FastAPI, state: ServerState) -> None:
    tokenizer = state.base.tokenizer
    metrics = state.metrics

    async def resolve(name: str):
        """The registry entry of an adapter name (``None`` for ``base``, the model alone)."""
        return None if name == BASE_NAME else await run_in_threadpool(state.registry.get, name)

    async def run(http: Request, body, entry, texts: list[str], stop_ids: frozenset[int] | None, max_tokens: int,
                  shape: StreamShape, logprobs: int | None = None, echo: bool = False):
        """Decode ``body.n`` choices of every text (placement markers split off); choice ``j`` of text ``p`` is
        index ``p * n + j`` and samples with ``seed + j``. ``echo``: the text comes back first (with its prompt
        token logprobs when ``logprobs`` is set)."""
        split = [split_prompt(state.base, text) for text in texts]
        artifacts = [await run_in_threadpool(state.artifact, entry, lead) for lead, _ in split]
        for (_, ids), artifact in zip(split, artifacts, strict=True):
            state.engine.check_length(len(ids), artifact.length if artifact is not None else 0, max_tokens)
        if echo and logprobs is not None and any(lead for lead, _ in split):
            raise SoftpromptsError("echo with logprobs scores the prompt's tokens after the virtual tokens; a prompt "
                                   "with a <|virtual|> marker has tokens before them: send it without the marker")
        stops = [s for s in ([body.stop] if isinstance(body.stop, str) else list(body.stop or [])) if s]
        n = body.n
        rows = [(p, j) for p in range(len(texts)) for j in range(n)]

        def stop_check(ids: list[int]) -> bool:
            return any(s in tokenizer.decode(ids, skip_special_tokens=True) for s in stops)

        def request(index: int, on_token=None) -> GenerationRequest:
            p, j = rows[index]
            sampling = Sampling(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                                seed=body.seed + j if body.seed is not None else None)
            return GenerationRequest(prompt_ids=split[p][1], artifact=artifacts[p], max_new_tokens=max_tokens,
                                     sampling=sampling, stop_ids=stop_ids, stop_check=stop_check if stops else None,
                                     on_token=on_token, logprobs=logprobs)

        prompt_tokens = sum(len(lead) + len(ids) for lead, ids in split)  # usage counts the lead's tokens too
        echoed = [texts[p] if echo else "" for p, _ in rows]
        if body.stream:
            return StreamingResponse(stream_completions(state, echoed, prompt_tokens, request, stops, shape),
                                     media_type="text/event-stream")
        futures = [state.scheduler.submit(request(i)) for i in range(len(rows))] if max_tokens else []
        scored = [state.scheduler.submit(PromptLogprobsRequest(ids, artifact, logprobs))
                  for (_, ids), artifact in zip(split, artifacts, strict=True)] if echo and logprobs is not None else []
        answers = await results_or_cancel(http, state.scheduler, futures + scored)
        if answers is None:
            return Response(status_code=CLIENT_CLOSED)
        results: list[GenerationResult] = answers[: len(futures)] or [
            GenerationResult(tokens=[], finish_reason="length", prompt_tokens=len(split[p][1])) for p, _ in rows]
        choices = []
        for index, ((p, _), result) in enumerate(zip(rows, results, strict=True)):
            text, stopped = cut_at_stop(tokenizer.decode(result.tokens, skip_special_tokens=True), stops)
            reason = "stop" if stopped else result.finish_reason
            kept = result.logprobs[: within(token_texts(tokenizer, result.tokens), len(text))]
            if shape.chat:
                choices.append({"index": index, "message": {"role": "assistant", "content": text},
                                "logprobs": chat_logprobs(tokenizer, kept) if logprobs is not None else None,
                                "finish_reason": reason})
                continue
            lp = None
            if logprobs is not None:
                parts = [completion_logprobs(tokenizer, split[p][1], answers[len(futures) + p], 0)] if echo else []
                parts.append(completion_logprobs(tokenizer, [t.token for t in kept], kept, len(echoed[index])))
                lp = join_completion_logprobs(parts)
            choices.append({"text": echoed[index] + text, "index": index, "logprobs": lp, "finish_reason": reason})
        completion_tokens = sum(len(r.tokens) for r in results)
        metrics.tokens(body.model, prompt_tokens, completion_tokens)
        return {"id": shape.completion_id, "object": "chat.completion" if shape.chat else "text_completion",
                "created": shape.created, "model": body.model, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    def include_usage(body) -> bool:
        return bool(body.stream_options and body.stream_options.include_usage)

    @app.post("/v1/completions", responses=STREAMED)
    async def completions(body: CompletionBody, http: Request):
        entry = await resolve(body.model)
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        shape = StreamShape(f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), body.model,
                            include_usage=include_usage(body), logprobs=body.logprobs is not None)
        return await run(http, body, entry, texts, None, body.max_tokens, shape, body.logprobs, body.echo)

    @app.post("/v1/chat/completions", responses=STREAMED)
    async def chat_completions(body: ChatBody, http: Request):
        entry = await resolve(body.model)
        chat = state.chat_format(entry)
        prompt = chat.render_prompt({"messages": [m.model_dump(exclude_none=True) for m in body.messages]})
        end = tokenizer(chat.end_of_turn, add_special_tokens=False)["input_ids"]
        stop_ids = frozenset(eos_ids(state.base) | ({end[0]} if len(end) == 1 else set()))
        shape = StreamShape(f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), body.model, chat=True,
                            include_usage=include_usage(body), logprobs=body.logprobs)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return await run(http, body, entry, [prompt], stop_ids, body.limit, shape, logprobs)

    @app.post("/v1/classify", responses=ERROR_RESPONSES)
    async def classify(body: ClassifyBody):
        if body.model == BASE_NAME:
            raise SoftpromptsError("classification needs an adapter with labels, not the base model")
        entry = await resolve(body.model)
        task = entry.task
        labels, prompts, targets = classify_prompts(task, body.texts, body.labels, entry.name,
                                                    state.chat_format(entry) if task.get("chat") else None)
        candidates = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in targets]
        requests = []
        for prompt in prompts:
            lead, ids = split_prompt(state.base, prompt)
            artifact = await run_in_threadpool(state.artifact, entry, lead)
            state.engine.check_length(len(ids), artifact.length, max(len(c) for c in candidates), "label tokens")
            requests.append(ScoreRequest(prompt_ids=ids, candidates=candidates, artifact=artifact))
        scored = await asyncio.gather(*[asyncio.wrap_future(state.scheduler.submit(r)) for r in requests])
        metrics.tokens(body.model, sum(len(r.prompt_ids) for r in requests), 0)
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


__all__ = ["add_generation_routes"]
