"""An adapter request on vLLM's engine: the client's body, checked and rendered exactly as ``softprompts serve``
does it, becomes one body for vLLM's own ``/v1/completions``.

The body is validated by the default engine's schemas (``serve/schemas.py``: the same fields, the same refusals of
fields that are not implemented), its prompts are rendered and placed by the same functions, and only the last step
differs - how the artifact reaches the model::

    completions  prompt (text, texts, token ids)      -> (lead, ids) per prompt, split at the <|virtual|> marker
    chat         messages                             -> the chat template with the adapter's placement and system
                                                         message (data/chat.py); the answer ends at end of sequence
                                                         or the template's end of turn
    soft prompt  prompt_embeds = [e(lead); E; e(ids)]    [k + P + T, hidden]: the sequence our engine feeds the model
                                                         (model/placement.py), base64 of ``torch.save``
    KV prefix    prompt = [placeholder] * P + ids, kv_transfer_params = {file, P}, cache_salt = "softprompts-kv-" +
                 sha256 of the file (interop/vllm_kv_files.py; the connector loads the file into positions 0..P-1)

Sampling fields map one to one (``temperature``, ``top_p``, ``top_k``, ``seed``, ``n``, ``stop``, ``min_tokens``,
``ignore_eos``, ``logprobs``, ``stream``); stop tokens are sent explicitly (the base's end of sequence, and the end of
turn for chat), so both engines stop on the same tokens. ``echo`` is refused: vLLM would echo placeholders or
embeddings, not the prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from softprompts.errors import SoftpromptsError
from softprompts.interop.vllm import encode_prompt_embeds
from softprompts.interop.vllm_kv_files import SALT_PREFIX, kv_params, placeholder_prompt
from softprompts.model.artifacts import KVPrefix, SoftPrompt
from softprompts.model.generation import eos_ids
from softprompts.model.placement import place
from softprompts.serve.registry import Entry
from softprompts.serve.schemas import ChatBody, CompletionBody
from softprompts.serve.state import chat_format_of
from softprompts.serve.translate import render_chat, split_request_prompt


@dataclass(frozen=True)
class KVFile:
    """A KV prefix saved where the connector reads it, and the sha256 of its bytes."""

    path: Path
    digest: str


@dataclass(frozen=True)
class VllmRequest:
    """What goes to vLLM (``body``, for ``/v1/completions``) and how its answer is turned back: reported as
    ``model``, as a chat completion when ``chat``, with ``virtual_tokens`` per prompt taken out of the usage (the
    default engine counts the prompt without them) and at most ``top_logprobs`` alternatives per chat token."""

    body: dict
    model: str
    chat: bool
    virtual_tokens: int
    prompts: int
    top_logprobs: int | None = None


def _sampling(body: CompletionBody | ChatBody, max_tokens: int, stop_ids: set[int], logprobs: int | None,
              served_model: str) -> dict:
    fields = {"model": served_model, "max_tokens": max_tokens, "temperature": body.temperature, "top_p": body.top_p,
              "n": body.n, "stop": body.stop or [], "stream": body.stream, "min_tokens": body.min_tokens,
              "ignore_eos": body.ignore_eos, "stop_token_ids": [] if body.ignore_eos else sorted(stop_ids)}
    if body.top_k:
        fields["top_k"] = body.top_k
    if body.seed is not None:
        fields["seed"] = body.seed
    if logprobs is not None:
        fields["logprobs"] = logprobs
    if body.stream and body.stream_options is not None:
        fields["stream_options"] = {"include_usage": body.stream_options.include_usage}
    if body.user is not None:
        fields["user"] = body.user
    return fields


def translate(base, entry: Entry, payload: dict, chat: bool, served_model: str,
              kv_file: Callable[[Entry], KVFile]) -> VllmRequest:
    """The vLLM request for ``payload`` (a completions or, with ``chat``, a chat completions body) to ``entry``'s
    adapter. Raises pydantic's ``ValidationError`` for a body the default engine would refuse, and
    ``SoftpromptsError`` (a 400) for a prompt that does not fit or a field this engine cannot serve."""
    if chat:
        body = ChatBody.model_validate(payload)
        prompt, stop_ids = render_chat(base, chat_format_of(base, entry), body)
        prompts: list[str | list[int]] = [prompt]
        max_tokens, logprobs = body.limit, ((body.top_logprobs or 0) if body.logprobs else None)
    else:
        body = CompletionBody.model_validate(payload)
        if body.echo:
            raise SoftpromptsError("echo is not served for adapters on the vLLM engine (vLLM would echo the virtual "
                                   "tokens' placeholders, not your prompt); use the default engine for echo and "
                                   "prompt scoring")
        prompts, stop_ids = body.prompts, eos_ids(base)
        max_tokens, logprobs = body.max_tokens, body.logprobs
    split = [split_request_prompt(base, p, "prompt" if len(prompts) == 1 else f"prompt[{i}]")
             for i, p in enumerate(prompts)]
    fields = _sampling(body, max_tokens, set(stop_ids), logprobs, served_model)
    artifact = entry.source
    if isinstance(artifact, SoftPrompt):
        embeds = []
        for lead, ids in split:
            placed = place(base, artifact, lead)
            base.check_fits(len(ids), placed.length, max_tokens)
            with torch.no_grad():
                rest = base.embed(torch.tensor(ids, dtype=torch.long))
                embeds.append(encode_prompt_embeds(torch.cat([placed.embeds.to(rest.dtype), rest], dim=0)))
        fields["prompt_embeds"] = embeds
    elif isinstance(artifact, KVPrefix):
        saved = kv_file(entry)
        for lead, ids in split:
            place(base, artifact, lead)  # a KV prefix after a lead: the placement error, as on the default engine
            base.check_fits(len(ids), artifact.length, max_tokens)
        fields["prompt"] = [placeholder_prompt(artifact.length, ids) for _, ids in split]
        fields["cache_salt"] = SALT_PREFIX + saved.digest
        fields["kv_transfer_params"] = kv_params(saved.path, artifact.length)
    else:
        raise SoftpromptsError(f"adapter {entry.name!r} has no artifact in memory; retry the request")
    top = (body.top_logprobs or 0) if chat and body.logprobs else None
    return VllmRequest(body=fields, model=entry.name, chat=chat, virtual_tokens=artifact.length,
                       prompts=len(split), top_logprobs=top)


__all__ = ["KVFile", "VllmRequest", "translate"]
