"""The one response builder: OpenAI's ``text_completion`` and ``chat.completion`` answers, whole or as the chunks
of a stream (``streaming.py`` sends them), and the classification answer.

Each rule is written once, for both: a choice's shape (a completion's ``text``; a chat answer's ``message``, or its
``delta`` when streamed, the first naming the assistant role), its text up to the first stop string and the finish
reason that follows (``stop`` when a stop string cut it), the logprobs of the tokens it keeps (``logprobs.py``),
the envelope (``id``, ``object``, ``created``, ``model``) and the usage.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass

from softprompts.model.generation import GenerationResult, TokenLogprob
from softprompts.serve.logprobs import chat_logprobs, completion_logprobs, join_completion_logprobs, token_texts, within
from softprompts.serve.schemas import GenerationFields
from softprompts.serve.text import StopStrings
from softprompts.serve.translate import Generation


@dataclass(frozen=True)
class AnswerShape:
    """How an answer looks: ``chat`` (messages, deltas) or ``text_completion`` choices; ``logprobs``: choices carry
    their tokens'; ``include_usage``: a stream ends with a usage chunk."""

    completion_id: str
    created: int
    model: str
    chat: bool = False
    include_usage: bool = False
    logprobs: bool = False

    @classmethod
    def of(cls, body: GenerationFields, chat: bool = False) -> AnswerShape:
        """A new answer's shape for a completions body (``chat``: a chat completions body)."""
        prefix, logprobs = ("chatcmpl", body.logprobs) if chat else ("cmpl", body.logprobs is not None)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return cls(f"{prefix}-{uuid.uuid4().hex[:24]}", int(time.time()), body.model, chat=chat,
                   include_usage=include_usage, logprobs=logprobs)

    def answer(self, choices: list[dict], usage: dict | None = None, streamed: bool = False) -> dict:
        """The envelope around ``choices`` (a stream's chunk when ``streamed``)."""
        kind = ("chat.completion.chunk" if streamed else "chat.completion") if self.chat else "text_completion"
        payload = {"id": self.completion_id, "object": kind, "created": self.created, "model": self.model,
                   "choices": choices}
        if usage is not None:
            payload["usage"] = usage
        return payload

    def chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        """One server-sent event."""
        return f"data: {json.dumps(self.answer(choices, usage, streamed=True))}\n\n"

    def choice(self, index: int, text: str, reason: str | None = None, logprobs: dict | None = None,
               streamed: bool = False, opening: bool = False) -> dict:
        """Choice ``index`` with ``text``: a completion's text, or a chat answer's message (``streamed``: the
        delta, which names the role in a stream's ``opening`` chunk and is empty when there is no text)."""
        if not self.chat:
            return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": reason}
        if streamed and not opening:
            return {"index": index, "delta": {"content": text} if text else {}, "logprobs": logprobs,
                    "finish_reason": reason}
        said = {"role": "assistant", "content": text}
        return {"index": index, "delta" if streamed else "message": said, "logprobs": logprobs, "finish_reason": reason}

    def token_logprobs(self, tokenizer, scored: list[TokenLogprob], offset: int) -> dict | None:
        """The logprobs of the tokens ``scored`` (a completion's: their text starts at character ``offset`` of the
        choice's text); ``None`` when the request asked for none."""
        if not self.logprobs:
            return None
        if self.chat:
            return chat_logprobs(tokenizer, scored)
        return completion_logprobs(tokenizer, [t.token for t in scored], scored, offset)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def kept_tokens(tokenizer, tokens: list[int], length: int) -> int:
    """How many of ``tokens`` start within the first ``length`` characters of their text: the tokens whose
    logprobs a text cut there keeps."""
    return within(token_texts(tokenizer, tokens), length)


def finish(tokenizer, result: GenerationResult, stops: StopStrings, logprobs: bool) -> tuple[str, str, list]:
    """A finished choice: ``(text up to the first stop string, finish reason, logprobs of the tokens it keeps)``;
    the reason is ``stop`` when a stop string cut the text, else the engine's (the kept logprobs: ``[]`` unless
    ``logprobs``)."""
    text, hit = stops.cut(tokenizer, result.tokens)
    kept = result.logprobs[: kept_tokens(tokenizer, result.tokens, len(text))] if logprobs else []
    return text, "stop" if hit else result.finish_reason, kept


def whole_answer(tokenizer, shape: AnswerShape, generation: Generation, results: list[GenerationResult],
                 prompt_scores: list[list[TokenLogprob | None]]) -> dict:
    """The answer to a request that is not streamed: every choice's ``results``, after its echoed prompt (with the
    prompt's token logprobs ``prompt_scores``, one list per prompt, when it asked for them)."""
    prompt_logprobs = [[completion_logprobs(tokenizer, ids, scores, 0)] for (_, ids), scores in
                       zip(generation.split, prompt_scores, strict=True)] if prompt_scores else None
    choices = []
    for index, ((p, _), echoed, result) in enumerate(zip(generation.rows, generation.echoed, results, strict=True)):
        text, reason, kept = finish(tokenizer, result, generation.stops, shape.logprobs)
        logprobs = shape.token_logprobs(tokenizer, kept, len(echoed))
        if logprobs is not None and not shape.chat:
            logprobs = join_completion_logprobs([*(prompt_logprobs[p] if prompt_logprobs else []), logprobs])
        choices.append(shape.choice(index, echoed + text, reason, logprobs))
    return shape.answer(choices, usage(generation.prompt_tokens, sum(r.generated_tokens for r in results)))


def label_scores(labels: list[str], logprobs: list[float]) -> dict:
    """One text's classification: the best label, every label's probability (a softmax over the labels' summed
    log-probabilities) and those log-probabilities."""
    top = max(logprobs)
    weights = [math.exp(v - top) for v in logprobs]
    total = sum(weights)
    best = max(range(len(labels)), key=lambda j: logprobs[j])
    return {
        "label": labels[best],
        "scores": {label: w / total for label, w in zip(labels, weights, strict=True)},
        "logprobs": dict(zip(labels, logprobs, strict=True)),
    }


def classification(model: str, labels: list[str], scored: list[list[float]]) -> dict:
    """The answer to ``/v1/classify``: each text's ``label_scores``."""
    return {"object": "classification", "model": model, "labels": labels,
            "results": [label_scores(labels, logprobs) for logprobs in scored]}


__all__ = ["AnswerShape", "classification", "finish", "kept_tokens", "label_scores", "usage", "whole_answer"]
