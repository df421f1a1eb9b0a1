"""Server-sent events for ``stream: true``: OpenAI's ``text_completion`` chunks (``/v1/completions``) or
``chat.completion.chunk`` deltas (``/v1/chat/completions``).

Tokens arrive from the batching worker's thread through ``on_token`` callbacks into an asyncio queue; text is sent
only up to a point where no stop string can still begin (``stream_safe_length``), so a stop string is never
half-sent. Chat streams open with the assistant role and end with an empty delta carrying the finish reason; a
completion with ``echo`` opens with its prompt; with ``logprobs`` each chunk carries the log-probabilities of the
tokens whose text it sends; with ``include_usage`` a last chunk holds the usage (and no choices), as OpenAI's does.
Chunks are built by ``answers.py``, the builder of whole answers too.
"""

from __future__ import annotations

import asyncio
import json

from softprompts.model.generation import GenerationResult, TokenLogprob
from softprompts.serve.answers import AnswerShape, finish, usage
from softprompts.serve.logprobs import within
from softprompts.serve.state import ServerState
from softprompts.serve.text import StopStrings, StopWatch, stream_safe_length
from softprompts.serve.translate import Generation


def piece(shape: AnswerShape, tokenizer, index: int, text: str, reason: str | None, scored: list[TokenLogprob],
          offset: int) -> str:
    """A chunk of choice ``index``'s ``text``; ``scored``: the logprobs of the tokens it carries (``offset``: where
    its text starts in the choice's)."""
    logprobs = shape.token_logprobs(tokenizer, scored, offset)
    return shape.chunk([shape.choice(index, text, reason, logprobs, streamed=True)])


def opening(shape: AnswerShape, index: int, echo: str) -> str | None:
    """The first chunk of a choice: the assistant role (chat) or the echoed prompt (completions)."""
    if shape.chat:
        return shape.chunk([shape.choice(index, "", streamed=True, opening=True)])
    if echo:
        return shape.chunk([shape.choice(index, echo)])
    return None


async def stream_completions(state: ServerState, generation: Generation, shape: AnswerShape):
    """Server-sent events: the chunks of every choice as its tokens arrive, a final chunk per choice, ``[DONE]``.
    ``generation.echoed[i]``: the text choice ``i`` starts with; ``generation.request(i, on_token)``: its engine
    request. When the client disconnects the stream closes and its rows are cancelled.
    """
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    echoed = generation.echoed
    futures = []
    try:
        for index in range(len(echoed)):
            def on_token(tok, lp, i=index):
                loop.call_soon_threadsafe(events.put_nowait, (i, tok, lp, None))

            def on_done(future, i=index):
                loop.call_soon_threadsafe(events.put_nowait, (i, None, None, future))

            future = state.scheduler.submit(generation.request(index, on_token=on_token))
            future.add_done_callback(on_done)
            futures.append(future)
        for index, echo in enumerate(echoed):
            first = opening(shape, index, echo)
            if first:
                yield first
        async for event in _choices(state.base.tokenizer, events, echoed, generation.stops, shape):
            yield event
    finally:  # the client left (the generator is closed) or every choice ended: no row outlives the stream
        for future in futures:
            state.scheduler.cancel(future)
    ended = [f for f in futures if f.done() and not f.cancelled() and not f.exception()]
    generated = sum(f.result().generated_tokens for f in ended)
    state.metrics.tokens(shape.model, generation.prompt_tokens, generated)
    if shape.include_usage:
        yield shape.chunk([], usage(generation.prompt_tokens, generated))
    yield "data: [DONE]\n\n"


async def _choices(tokenizer, events: asyncio.Queue, echoed: list[str], stops: StopStrings, shape: AnswerShape):
    """The chunks of every choice from the token events, text held back where a stop string may begin (each
    choice's text decoded incrementally: ``StopWatch``)."""
    tokens: dict[int, list[int]] = {i: [] for i in range(len(echoed))}
    watches = {i: StopWatch(stops, tokenizer) for i in tokens}
    pieces: dict[int, list[str]] = {i: [] for i in tokens}  # each token's own text, decoded once (logprobs)
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
            if shape.logprobs:
                pieces[index].append(tokenizer.decode([tok]))  # logprobs.token_texts, one token at a time
            if lp is not None:
                scored[index].append(lp)
            text, hit = watches[index].cut(tokens[index])
            safe = len(text) if hit else stream_safe_length(text, stops.stops)
            if safe > sent[index]:
                upto = within(pieces[index], safe) if shape.logprobs else 0  # answers.kept_tokens
                fresh, at = scored[index][reported[index] : upto], len(echoed[index]) + sent[index]
                yield piece(shape, tokenizer, index, text[sent[index] : safe], None, fresh, at)
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
        text, reason, kept = finish(tokenizer, result, stops, shape.logprobs)
        yield piece(shape, tokenizer, index, text[sent[index] :], reason, kept[reported[index] :],
                    len(echoed[index]) + sent[index])


__all__ = ["opening", "piece", "stream_completions"]
