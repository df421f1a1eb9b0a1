"""Server-sent events for ``stream: true``: OpenAI's ``text_completion`` chunks (``/v1/completions``) or
``chat.completion.chunk`` deltas (``/v1/chat/completions``).

Tokens arrive from the batching worker's thread through ``on_token`` callbacks into an asyncio queue; text is sent
only up to a point where no stop string can still begin (``stream_safe_length``), so a stop string is never
half-sent. Chat streams open with the assistant role and end with an empty delta carrying the finish reason; with
``include_usage`` a last chunk holds the usage (and no choices), as OpenAI's does.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from softprompts.model.generation import GenerationResult
from softprompts.serve.text import cut_at_stop, stream_safe_length


@dataclass(frozen=True)
class StreamShape:
    """How chunks look: ``chat`` deltas or ``text_completion`` choices."""

    completion_id: str
    created: int
    model: str
    chat: bool = False
    include_usage: bool = False

    def chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        payload = {"id": self.completion_id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                   "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            payload["usage"] = usage
        return f"data: {json.dumps(payload)}\n\n"

    def piece(self, index: int, text: str, reason: str | None) -> str:
        if self.chat:
            delta = {"content": text} if text else {}
            return self.chunk([{"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}])
        return self.chunk([{"text": text, "index": index, "logprobs": None, "finish_reason": reason}])

    def opening(self, index: int) -> str | None:
        if not self.chat:
            return None
        return self.chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None}])


async def stream_completions(state, rows, request, stops, shape: StreamShape):
    """Server-sent events: the chunks of every row as its tokens arrive, a final chunk per choice, ``[DONE]``.
    ``rows``: prompt ids per choice; ``request(i, on_token)`` builds row ``i``'s engine request."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    tokenizer = state.base.tokenizer
    for index in range(len(rows)):
        future = state.scheduler.submit(
            request(index, on_token=lambda tok, i=index: loop.call_soon_threadsafe(events.put_nowait, (i, tok, None)))
        )
        future.add_done_callback(lambda f, i=index: loop.call_soon_threadsafe(events.put_nowait, (i, None, f)))
    for index in range(len(rows)):
        opening = shape.opening(index)
        if opening:
            yield opening
    tokens: dict[int, list[int]] = {i: [] for i in range(len(rows))}
    sent = dict.fromkeys(tokens, 0)
    finished: set[int] = set()
    stopped: set[int] = set()
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
                yield shape.piece(index, text[sent[index] : safe], None)
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
        yield shape.piece(index, text[sent[index] :], "stop" if hit else result.finish_reason)
    prompt_tokens = sum(len(r) for r in rows)
    state.metrics.tokens(shape.model, prompt_tokens, generated)
    if shape.include_usage:
        yield shape.chunk([], {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                               "total_tokens": prompt_tokens + generated})
    yield "data: [DONE]\n\n"


__all__ = ["StreamShape", "stream_completions"]
