"""The generation routes: ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/classify``, each a thin
translation from OpenAI-style JSON to engine requests (token ids + artifacts) and back.

Completions send the prompt text as it is (a ``<|virtual|>`` marker in it places the soft prompt there). Chat
renders the conversation with the model's chat template and the adapter's placement (``data/chat.py``), stops at
the template's end-of-turn token, and answers with an assistant message. Every request goes to the same batching
worker, so completion and chat requests of any adapters share batches.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from softprompts.errors import SoftpromptsError
from softprompts.model.generation import GenerationRequest, GenerationResult, Sampling, eos_ids
from softprompts.serve.engine import ScoreRequest
from softprompts.serve.errors import ERROR_RESPONSES
from softprompts.serve.registry import BASE_NAME
from softprompts.serve.schemas import ChatBody, ClassifyBody, CompletionBody
from softprompts.serve.state import ServerState
from softprompts.serve.streaming import StreamShape, stream_completions
from softprompts.serve.text import classify_prompts, cut_at_stop
from softprompts.tasks import split_prompt

STREAMED = {**ERROR_RESPONSES, 200: {
    "description": "The completion, or with `stream: true` server-sent events ending with `data: [DONE]`",
    "content": {"application/json": {}, "text/event-stream": {}}}}


def add_generation_routes(app: FastAPI, state: ServerState) -> None:
    tokenizer = state.base.tokenizer
    metrics = state.metrics

    async def resolve(name: str):
        """The registry entry of an adapter name (``None`` for ``base``, the model alone)."""
        return None if name == BASE_NAME else await run_in_threadpool(state.registry.get, name)

    async def run(body, entry, texts: list[str], stop_ids: frozenset[int] | None, max_tokens: int,
                  shape: StreamShape, answer):
        """Decode every text (placement markers split off) and answer with ``answer(index, text, reason)``."""
        split = [split_prompt(state.base, text) for text in texts]
        artifacts = [await run_in_threadpool(state.artifact, entry, lead) for lead, _ in split]
        for (_, ids), artifact in zip(split, artifacts, strict=True):
            state.engine.check_length(len(ids), artifact.length if artifact is not None else 0, max_tokens)
        stops = [s for s in ([body.stop] if isinstance(body.stop, str) else list(body.stop or [])) if s]
        sampling = Sampling(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, seed=body.seed)

        def stop_check(ids: list[int]) -> bool:
            return any(s in tokenizer.decode(ids, skip_special_tokens=True) for s in stops)

        def request(index: int, on_token=None) -> GenerationRequest:
            return GenerationRequest(prompt_ids=split[index][1], artifact=artifacts[index], max_new_tokens=max_tokens,
                                     sampling=sampling, stop_ids=stop_ids, stop_check=stop_check if stops else None,
                                     on_token=on_token)

        counted = [list(lead) + ids for lead, ids in split]  # usage counts the lead's tokens too
        if body.stream:
            return StreamingResponse(stream_completions(state, counted, request, stops, shape),
                                     media_type="text/event-stream")
        futures = [asyncio.wrap_future(state.scheduler.submit(request(i))) for i in range(len(split))]
        results: list[GenerationResult] = await asyncio.gather(*futures)
        choices = []
        for index, result in enumerate(results):
            text, stopped = cut_at_stop(tokenizer.decode(result.tokens, skip_special_tokens=True), stops)
            choices.append(answer(index, text, "stop" if stopped else result.finish_reason))
        prompt_tokens = sum(map(len, counted))
        completion_tokens = sum(len(r.tokens) for r in results)
        metrics.tokens(body.model, prompt_tokens, completion_tokens)
        return {"id": shape.completion_id, "object": "chat.completion" if shape.chat else "text_completion",
                "created": shape.created, "model": body.model, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    @app.post("/v1/completions", responses=STREAMED)
    async def completions(body: CompletionBody):
        entry = await resolve(body.model)
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        shape = StreamShape(f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), body.model)
        return await run(body, entry, texts, None, body.max_tokens, shape, lambda index, text, reason: {
            "text": text, "index": index, "logprobs": None, "finish_reason": reason})

    @app.post("/v1/chat/completions", responses=STREAMED)
    async def chat_completions(body: ChatBody):
        entry = await resolve(body.model)
        chat = state.chat_format(entry)
        prompt = chat.render_prompt({"messages": [m.model_dump(exclude_none=True) for m in body.messages]})
        end = tokenizer(chat.end_of_turn, add_special_tokens=False)["input_ids"]
        stop_ids = frozenset(eos_ids(state.base) | ({end[0]} if len(end) == 1 else set()))
        shape = StreamShape(f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), body.model, chat=True,
                            include_usage=bool(body.stream_options and body.stream_options.include_usage))
        return await run(body, entry, [prompt], stop_ids, body.limit, shape, lambda index, text, reason: {
            "index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
            "finish_reason": reason})

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
