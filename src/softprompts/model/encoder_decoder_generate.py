"""The decode loop for encoder-decoder bases: encode once, then one decoder token per row per step from the cache.

For each group of requests that may share an exact batch (same artifact kind and virtual length,
``encoder_decoder.groups_by_length``)::

    encode   : the prompts [b, S] (packed, soft prompt first) with the encoder prefix -> EncoderState
    prefill  : decoder input [start] with the decoder and cross-attention prefixes in an EncoderDecoderCache
    step     : choose each row's next token from its logits (greedy, or its own seeded generator), feed them all

A row ends on a stop token (excluded from its output; the model's EOS unless the request names others), when its
``stop_check`` says so or after ``max_new_tokens``. Rows that ended keep their place in the batch until the group
ends (their tokens are no longer recorded), so each row's tokens equal the request alone.
"""

from __future__ import annotations

import time

import torch

from softprompts.model.encoder_decoder import decode, decode_more, encode, groups_by_length
from softprompts.model.encoder_decoder_score import right_pad
from softprompts.model.generation import (
    ContextLengthError,
    GenerationRequest,
    GenerationResult,
    choose_next,
    eos_ids,
    token_logprobs,
)
from softprompts.model.inject import VirtualContext


def check_request(base, request: GenerationRequest) -> None:
    """The encoder reads virtual + prompt tokens, the decoder virtual + new tokens: each within the context."""
    limit = base.context_limit
    virtual = request.artifact.length if request.artifact is not None else 0
    if not request.prompt_ids:
        raise ContextLengthError("the prompt must have at least one token")
    sides = (("prompt", len(request.prompt_ids)), ("max_tokens", request.max_new_tokens))
    for what, tokens in sides:
        if tokens + virtual > limit:
            raise ContextLengthError(f"this model's context limit is {limit} tokens; the {what} side needs "
                                     f"{tokens + virtual} ({virtual} virtual + {tokens} {what}): lower it")


@torch.no_grad()
def generate(base, requests: list[GenerationRequest], stop_default: frozenset[int] | None = None,
             ) -> list[GenerationResult]:
    """Results in request order (module docstring); ``stop_default``: the stop ids of requests that name none
    (default: the model's EOS)."""
    for request in requests:
        check_request(base, request)
    results = [GenerationResult(tokens=[], finish_reason="length", prompt_tokens=len(r.prompt_ids)) for r in requests]
    for group in groups_by_length([r.artifact for r in requests]):
        live = [i for i in group if requests[i].max_new_tokens > 0]
        if live:
            _run_group(base, [requests[i] for i in live], [results[i] for i in live], stop_default)
    return results


def _run_group(base, requests: list[GenerationRequest], results: list[GenerationResult],
               stop_default: frozenset[int] | None) -> None:
    started = time.perf_counter()
    device = base.device
    default_stop = frozenset(eos_ids(base)) if stop_default is None else stop_default
    generators = [torch.Generator().manual_seed(int(r.sampling.seed))
                  if r.sampling.temperature > 0 and r.sampling.seed is not None else None for r in requests]
    ctx = VirtualContext.from_rows([r.artifact for r in requests])
    ids, mask = right_pad([r.prompt_ids for r in requests], base.pad_id, device)
    encoder = encode(base, ctx, ids, mask, base.layout)
    start = torch.full((len(requests), 1), base.decoder_start_id, dtype=torch.long, device=device)
    state = decode(base, ctx, encoder, start, None, base.layout, use_cache=True)
    done = [False] * len(requests)
    for step in range(max(r.max_new_tokens for r in requests)):
        logits = state.logits[:, -1].float()  # [b, V]
        chosen = []
        for row, (request, result) in enumerate(zip(requests, results, strict=True)):
            token = int(choose_next(logits[row : row + 1], request.sampling, generators[row])[0])
            chosen.append(token)
            if done[row]:
                continue
            if step == 0:
                result.time_to_first_token_s = time.perf_counter() - started
            stops = request.stop_ids if request.stop_ids is not None else default_stop
            if token in stops:
                done[row], result.finish_reason = True, "stop"
                continue
            result.tokens.append(token)
            if request.collect_logits:
                result.logits.append(logits[row].cpu())
            if request.logprobs is not None:
                result.logprobs += token_logprobs(logits[row : row + 1], torch.tensor([token]), request.logprobs)
            if request.on_token is not None:
                request.on_token(token, result.logprobs[-1] if request.logprobs is not None else None)
            if request.stop_check is not None and request.stop_check(result.tokens):
                done[row], result.finish_reason = True, "stop"
            elif len(result.tokens) >= request.max_new_tokens:
                done[row] = True
        if all(done):
            return
        state = decode_more(base, state, torch.tensor(chosen, device=device)[:, None])


__all__ = ["check_request", "generate"]
