"""Server-sent events for ``stream: true``: OpenAI's ``text_completion`` chunks (``/v1/completions``) or
``chat.completion.chunk`` deltas (``/v1/chat/completions``).

Tokens arrive from the batching worker's thread through ``on_token`` callbacks into an asyncio queue; text is sent
only up to a point where no stop string can still begin (``stream_safe_length``), so a stop string is never
half-sent. Chat streams open with the assistant role and end with an empty delta carrying the finish reason; a
completion with ``echo`` opens with its prompt; with ``logprobs`` each chunk carries the log-probabilities of the
tokens whose text it sends; with ``include_usage`` a last chunk holds the usage (and no choices), as OpenAI's does.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from softprompts.model.generation import GenerationResult, TokenLogprob
from softprompts.serve.logprobs import chat_logprobs, completion_logprobs, token_texts, within
from softprompts.serve.text import cut_at_stop, stream_safe_length


@dataclass(frozen=True)
class StreamShape:
    """How chunks look: ``chat`` deltas or ``text_completion`` choices; ``logprobs``: chunks carry their tokens'."""

    completion_id: str
    created: int
    model: str
    chat: bool = False
    include_usage: bool = False
    logprobs: bool = False

    def chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        payload = {"id": self.completion_id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                   "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            payload["usage"] = usage
        return f"data: {json.dumps(payload)}\n\n"

    def piece(self, tokenizer, index: int, text: str, reason: str | None, scored: list[TokenLogprob],
              offset: int) -> str:
        """A chunk of ``text``; ``scored``: the logprobs of the tokens it carries (``offset``: where it starts)."""
        if self.chat:
            delta = {"content": text} if text else {}
            lp = chat_logprobs(tokenizer, scored) if self.logprobs else None
            return self.chunk([{"index": index, "delta": delta, "logprobs": lp, "finish_reason": reason}])
        lp = completion_logprobs(tokenizer, [t.token for t in scored], scored, offset) if self.logprobs else None
        return self.chunk([{"text": text, "index": index, "logprobs": lp, "finish_reason": reason}])

    def opening(self, index: int, echo: str) -> str | None:
        """The first chunk of a choice: the assistant role (chat) or the echoed prompt (completions)."""
        if self.chat:
            return self.chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None}])
        if echo:
            return self.chunk([{"text": echo, "index": index, "logprobs": None, "finish_reason": None}])
        return None


async def stream_completions(state, echoed: list[str], prompt_tokens: int, request, stops, shape: StreamShape):
    """Server-sent events: the chunks of every choice as its tokens arrive, a final chunk per choice, ``[DONE]``.
    ``echoed[i]``: the text choice ``i`` starts with (its prompt with ``echo``, else ""); ``request(i, on_token)``
    builds choice ``i``'s engine request. When the client disconnects the stream closes and its rows are cancelled.
    """
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    tokenizer = state.base.tokenizer
    futures = []
    try:
        for index in range(len(echoed)):
            def on_token(tok, lp, i=index):
                loop.call_soon_threadsafe(events.put_nowait, (i, tok, lp, None))

            def on_done(future, i=index):
                loop.call_soon_threadsafe(events.put_nowait, (i, None, None, future))

            future = state.scheduler.submit(request(index, on_token=on_token))
            future.add_done_callback(on_done)
            futures.append(future)
        for index, echo in enumerate(echoed):
            opening = shape.opening(index, echo)
            if opening:
                yield opening
        async for event in _choices(tokenizer, events, echoed, stops, shape):
            yield event
    finally:  # the client left (the generator is closed) or every choice ended: no row outlives the stream
        for future in futures:
            state.scheduler.cancel(future)
    generated = sum(len(f.result().tokens) for f in futures if f.done() and not f.cancelled() and not f.exception())
    state.metrics.tokens(shape.model, prompt_tokens, generated)
    if shape.include_usage:
        yield shape.chunk([], {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                               "total_tokens": prompt_tokens + generated})
    yield "data: [DONE]\n\n"


async def _choices(tokenizer, events: asyncio.Queue, echoed: list[str], stops: list[str], shape: StreamShape):
    """The chunks of every choice from the token events, text held back where a stop string may begin."""
    tokens: dict[int, list[int]] = {i: [] for i in range(len(echoed))}
    scored: dict[int, list[TokenLogprob]] = {i: [] for i in tokens}
    sent = dict.fromkeys(tokens, 0)  # characters of the completion sent
    reported = dict.fromkeys(tokens, 0)  # tokens whose logprobs were sent
    finished: set[int] = set()
    stopped: set[int] = set()
    while len(finished) < len(echoed):
        index, tok, lp, future = await events.get()
        if tok is not None:
            if index in stopped:
                continue
            tokens[index].append(tok)
            if lp is not None:
                scored[index].append(lp)
            text, hit = cut_at_stop(tokenizer.decode(tokens[index], skip_special_tokens=True), stops)
            safe = len(text) if hit else stream_safe_length(text, stops)
            if safe > sent[index]:
                upto = within(token_texts(tokenizer, tokens[index]), safe) if shape.logprobs else 0
                fresh, at = scored[index][reported[index] : upto], len(echoed[index]) + sent[index]
                yield shape.piece(tokenizer, index, text[sent[index] : safe], None, fresh, at)
                sent[index], reported[index] = safe, max(reported[index], upto)
            if hit:
                stopped.add(index)
            continue
        finished.add(index)
        if future.cancelled():
            continue
        error = future.exception()
        if error is not None:
            yield f"data: {json.dumps({'error': {'message': str(error), 'type': 'server_error'}})}\n\n"
            continue
        result: GenerationResult = future.result()
        text, hit = cut_at_stop(tokenizer.decode(result.tokens, skip_special_tokens=True), stops)
        upto = within(token_texts(tokenizer, result.tokens), len(text)) if shape.logprobs else 0
        yield shape.piece(tokenizer, index, text[sent[index] :], "stop" if hit else result.finish_reason,
                          result.logprobs[reported[index] : upto], len(echoed[index]) + sent[index])


__all__ = ["StreamShape", "stream_completions"]
