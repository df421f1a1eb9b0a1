"""Server-sent events for ``POST /v1/completions`` with ``stream: true`` (OpenAI's ``text_completion`` chunks).

Tokens arrive from the batching worker's thread through ``on_token`` callbacks into an asyncio queue; text is sent
only up to a point where no stop string can still begin (``stream_safe_length``), so a stop string is never
half-sent.
"""

from __future__ import annotations

import asyncio
import json

from softprompts.model.decode import GenerationResult
from softprompts.serve.text import cut_at_stop, stream_safe_length


async def stream_completions(state, rows, request, stops, completion_id, created, model):
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


__all__ = ["stream_completions"]
