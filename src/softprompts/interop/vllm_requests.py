"""An adapter request on vLLM's engine: the client's body, checked and rendered exactly as ``softprompts serve``
does it, becomes one body for vLLM's own ``/v1/completions``.

The body is validated by the default engine's schemas (``serve/schemas.py``: the same fields, the same refusals of
fields that are not implemented) and planned by the default engine's plan (``serve/plan.py``: rendered, split,
placed and fitted by the same code), and only the last step differs - how the artifact reaches the model
(``_artifact_fields``, the one place here that asks an artifact's kind)::

    completions  prompt (text, texts, token ids)      -> (lead, ids) per prompt, split at the <|virtual|> marker
    chat         messages                             -> the chat template with the adapter's placement and system
                                                         message (data/chat.py); the answer ends at end of sequence
                                                         or the template's end of turn
    soft prompt  prompt_embeds = [e(lead); E; e(ids)]    [k + P + T, hidden]: the sequence our engine feeds the model
                                                         (model/placement.py), base64 of ``torch.save``
    DePT         prompt_embeds = [e(lead); E; e(ids) + A·B on the first S ids]   (``input_embeds``: the offsets by
                                                         the artifact's own rule; the soft part's KV is not reused)
    KV prefix    prompt = [placeholder] * P + ids, kv_transfer_params = {file, P}, cache_salt = "softprompts-kv-" +
                 sha256 of the file (interop/vllm_kv_files.py; the connector loads the file into positions 0..P-1)

Sampling fields map one to one (``temperature``, ``top_p``, ``top_k``, ``seed``, ``n``, ``stop``, ``min_tokens``,
``ignore_eos``, ``logprobs``, ``stream``); stop tokens are sent explicitly (the base's end of sequence, and the end of
turn for chat), so both engines stop on the same tokens. ``echo`` is refused: vLLM would echo placeholders or
embeddings, not the prompt.

Fields only the front may set (``FRONT_FIELDS``) are refused in every body a client sends, the base model's too
(``check_client_fields``): ``kv_transfer_params`` would make the KV connector open a file the client names,
``prompt_embeds`` (and chat's ``{"type": "prompt_embeds"}`` parts) make vLLM deserialize a client's tensor (vLLM
documents that input as for trusted users only; the launcher turns it on for the front's own use), and a
``cache_salt`` in the front's namespace would share an adapter's cached KV blocks with a base request. An operator can
let trusted clients set one with ``serve --engine vllm --allow-client-field NAME``; the reserved salt namespace stays
closed.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from softprompts.errors import SoftpromptsError
from softprompts.interop.vllm import encode_prompt_embeds
from softprompts.interop.vllm_kv_files import SALT_PREFIX, kv_params, placeholder_prompt
from softprompts.model.artifacts import KVPrefix, OffsetPrompt, SoftPrompt, VirtualContext
from softprompts.model.generation import eos_ids
from softprompts.model.placement import place
from softprompts.serve.plan import RequestPlan, plan_generation
from softprompts.serve.registry import Entry
from softprompts.serve.schemas import ChatBody, CompletionBody

# field -> why only the front may set it
FRONT_FIELDS = {
    "kv_transfer_params": "it names a file on the server for vLLM's KV connector to load",
    "ec_transfer_params": "it addresses vLLM's encoder-cache transfer, which the front does not use",
    "prompt_embeds": "vLLM deserializes the tensor a client sends (its documentation: for trusted users only)",
    "cache_salt": "it selects which cached KV blocks a request may share",  # only the front's namespace is refused
}
ALLOWABLE_FIELDS = tuple(f for f in FRONT_FIELDS if f != "cache_salt")


class ClientFieldError(SoftpromptsError):
    """A body carries a field that only the front may set (a 400 naming it)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def _front_fields(payload: object) -> Iterator[tuple[str, str, object]]:
    """``(location, field, value)`` of every front-only field in a JSON value, at any depth (walked without
    recursion: a deeply nested body costs no stack): a key in ``FRONT_FIELDS`` (``vllm_xargs`` is SamplingParams'
    ``extra_args``, where vLLM reads ``kv_transfer_params`` too), or a content part of type ``prompt_embeds``."""
    stack: list[tuple[str, object]] = [("", payload)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, dict):
            if value.get("type") == "prompt_embeds":
                yield where or "body", "prompt_embeds", value
            for key, inner in value.items():
                here = f"{where}.{key}" if where else str(key)
                if key in FRONT_FIELDS:
                    yield here, key, inner
                stack.append((here, inner))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", inner) for i, inner in enumerate(value))


def check_client_fields(payload: object, allowed: Collection[str] = ()) -> None:
    """Refuse (``ClientFieldError``, a 400) a body with a field only the front may set, unless the operator allowed
    that field for trusted clients (``allowed``); a ``cache_salt`` in the front's namespace (``SALT_PREFIX``) is
    refused even then. The first such field is named; the body never reaches vLLM."""
    for where, field, value in _front_fields(payload):
        if field == "cache_salt":
            if not (isinstance(value, str) and value.startswith(SALT_PREFIX)):
                continue  # a client's own salt isolates its requests' cache: vLLM's feature, kept
            raise ClientFieldError(f"{where}: salts starting with {SALT_PREFIX!r} are reserved for adapters' KV "
                                   "prefixes (such a salt would share an adapter's cached KV with this request); "
                                   "choose another salt", param=where)
        if field not in allowed:
            raise ClientFieldError(f"{where}: set by the softprompts front, not by clients ({FRONT_FIELDS[field]}); "
                                   f"remove it (an operator can allow it for trusted clients: "
                                   f"--allow-client-field {field})", param=where)


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
    kv_path: Path | None = None  # the KV file a KV-prefix request names (the front forgets it if vLLM cannot load it)


def _sampling(plan: RequestPlan, stop_ids: frozenset[int], served_model: str) -> dict:
    """vLLM's sampling fields of ``plan``: one to one, the stop tokens explicit (``stop_ids``)."""
    body = plan.body
    fields = {"model": served_model, "max_tokens": plan.max_tokens, "temperature": body.temperature,
              "top_p": body.top_p, "n": body.n, "stop": body.stop or [], "stream": body.stream,
              "min_tokens": body.min_tokens, "ignore_eos": body.ignore_eos, "stop_token_ids": sorted(stop_ids)}
    if body.top_k:
        fields["top_k"] = body.top_k
    if body.seed is not None:
        fields["seed"] = body.seed
    if plan.logprobs is not None:
        fields["logprobs"] = plan.logprobs
    if body.stream and body.stream_options is not None:
        fields["stream_options"] = {"include_usage": body.stream_options.include_usage}
    if body.user is not None:
        fields["user"] = body.user
    return fields


@torch.no_grad()
def input_embeds(base, placed: SoftPrompt | OffsetPrompt, ids: list[int]) -> torch.Tensor:
    """``[k + P + T, hidden]``: what our injection feeds the model for a prompt ``ids`` (``T`` tokens) after the
    placed soft part ``[e(lead); E]`` (``k + P``): ``[e(lead); E; e(x_i) + (A·B)_i]``, the offsets (DePT) added to
    the first ``min(S, T)`` real tokens by the artifact's own rule (``VirtualContext.offset_embeds``; a soft prompt
    has none)."""
    rest = base.embed(torch.tensor(ids, dtype=torch.long))  # [T, hidden]
    mask = torch.ones(1, len(ids), dtype=torch.long, device=rest.device)
    rest = VirtualContext.from_rows([placed]).offset_embeds(rest[None], mask)[0]
    return torch.cat([placed.embeds.to(device=rest.device, dtype=rest.dtype), rest], dim=0)


def _artifact_fields(base, entry: Entry, plan: RequestPlan, kv_file: Callable[[Entry], KVFile]
                     ) -> tuple[dict, Path | None]:
    """How ``entry``'s artifact reaches vLLM for each planned prompt (the one place that asks its kind): a soft
    prompt as ``prompt_embeds`` ``[e(lead); E; e(ids)]`` (DePT's with the offsets on ``e(ids)``: ``input_embeds``), a
    KV prefix as placeholders + the KV file the connector loads; ``(fields, the KV file or None)``."""
    artifact = entry.source
    if isinstance(artifact, SoftPrompt | OffsetPrompt):
        return {"prompt_embeds": [encode_prompt_embeds(input_embeds(base, place(base, artifact, p.lead), p.ids))
                                  for p in plan.prompts]}, None
    if isinstance(artifact, KVPrefix):
        saved = kv_file(entry)
        return {"prompt": [placeholder_prompt(artifact.length, p.ids) for p in plan.prompts],
                "cache_salt": SALT_PREFIX + saved.digest,
                "kv_transfer_params": kv_params(saved.path, artifact.length)}, saved.path
    raise SoftpromptsError(f"adapter {entry.name!r} has no artifact in memory; retry the request")


def translate(base, entry: Entry, payload: dict, chat: bool, served_model: str,
              kv_file: Callable[[Entry], KVFile]) -> VllmRequest:
    """The vLLM request for ``payload`` (a completions or, with ``chat``, a chat completions body) to ``entry``'s
    adapter: the body's plan (``serve/plan.py``, as the default engine makes it), then the artifact's last step.
    Raises pydantic's ``ValidationError`` for a body the default engine would refuse, and ``SoftpromptsError`` (a
    400) for a prompt that does not fit or a field this engine cannot serve."""
    body = ChatBody.model_validate(payload) if chat else CompletionBody.model_validate(payload)
    if not chat and body.echo:
        raise SoftpromptsError("echo is not served for adapters on the vLLM engine (vLLM would echo the virtual "
                               "tokens' placeholders, not your prompt); use the default engine for echo and "
                               "prompt scoring")
    plan = plan_generation(base, entry, body)
    stop_ids = plan.stop_ids if plan.stop_ids is not None else frozenset(eos_ids(base))
    fields = _sampling(plan, stop_ids, served_model)
    placed, kv_path = _artifact_fields(base, entry, plan, kv_file)
    fields.update(placed)
    return VllmRequest(body=fields, model=entry.name, chat=chat, virtual_tokens=entry.source.length,
                       prompts=len(plan.prompts), top_logprobs=plan.logprobs if chat else None, kv_path=kv_path)


__all__ = ["ALLOWABLE_FIELDS", "FRONT_FIELDS", "ClientFieldError", "KVFile", "VllmRequest", "check_client_fields",
           "translate"]
