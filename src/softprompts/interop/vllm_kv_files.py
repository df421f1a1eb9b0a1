"""What a vLLM request with a KV prefix carries, and the file the connector reads: no vLLM import, so the serving
front (``vllm_front.py``) and its tests run without vLLM.

A KV-prefix request is ``P`` placeholder token ids, then the real prompt; its ``kv_transfer_params`` name the KV file
(``layers.{l}.key`` / ``.value``: ``[H_kv, P, D]``, post-RoPE keys at positions ``0..P-1``) and ``P``; its
``cache_salt`` is the file's sha256, so vLLM's prefix cache shares placeholder blocks only between requests whose KV is
the same bytes. ``vllm_kv.SoftpromptsKVConnector`` loads the file into those positions.
"""

from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import save_file

from softprompts.errors import SoftpromptsError
from softprompts.files import atomic_file, file_sha256
from softprompts.model.artifacts import KVPrefix

CONNECTOR_NAME = "SoftpromptsKVConnector"
CONNECTOR_MODULE = "softprompts.interop.vllm_kv"
PATH_KEY = "softprompts_kv"
LENGTH_KEY = "num_virtual_tokens"
KV_DIR_KEY = "kv_dir"  # the connector's extra config: the only directory it loads files from (serve --engine vllm)
PLACEHOLDER_ID = 0
SALT_PREFIX = "softprompts-kv-"


class VllmKVError(SoftpromptsError):
    """A KV prefix vLLM cannot take, or a request that cannot carry one."""


def connector_config(**extra_config) -> dict:
    """vLLM's ``KVTransferConfig`` fields for the connector (``--kv-transfer-config`` takes them as JSON)."""
    return {"kv_connector": CONNECTOR_NAME, "kv_role": "kv_both", "kv_connector_module_path": CONNECTOR_MODULE,
            "kv_connector_extra_config": dict(extra_config)}


def inside(path: str | Path, directory: str | Path | None) -> bool:
    """Whether ``path`` (symbolic links resolved) lies in ``directory``; any path when ``directory`` is ``None``
    (offline use: the caller owns the process)."""
    if directory is None:
        return True
    real, root = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([real, root]) == root and real != root


def save_kv(prefix: KVPrefix, path: str | Path) -> Path:
    """Write ``prefix`` (``layers.{l}.key`` / ``.value``: ``[H_kv, P, D]``) where the connector reads it (atomically:
    a reader sees the old file or the new one, never half of one)."""
    if not prefix.length:
        raise VllmKVError("an empty KV prefix has nothing to load")
    tensors = {k: t.detach().cpu().contiguous() for k, t in prefix.tensors().items()}
    return atomic_file(path, lambda tmp: save_file(tensors, str(tmp)))


def kv_params(path: str | Path, num_virtual_tokens: int) -> dict:
    """The request's ``kv_transfer_params``: the KV file and its length ``P``."""
    return {PATH_KEY: str(Path(path).resolve()), LENGTH_KEY: int(num_virtual_tokens)}


def placeholder_prompt(num_virtual_tokens: int, prompt_ids: list[int], placeholder_id: int = PLACEHOLDER_ID
                       ) -> list[int]:
    """``P`` placeholders then the real prompt (at least one real token: vLLM samples from its last position)."""
    if not prompt_ids:
        raise VllmKVError("a KV-prefix request needs at least one real prompt token (vLLM computes the prompt's "
                          "last position to sample from)")
    return [placeholder_id] * num_virtual_tokens + list(prompt_ids)


def kv_request(path: str | Path, prompt_ids: list[int], num_virtual_tokens: int | None = None,
               placeholder_id: int = PLACEHOLDER_ID) -> tuple[dict, dict]:
    """``(prompt, extra_args)`` for one offline request with the KV prefix saved at ``path`` before ``prompt_ids``.

    ``prompt``: vLLM's token prompt, ``P`` placeholders then ``prompt_ids``, salted with the file's content hash;
    ``extra_args``: ``{"kv_transfer_params": ...}`` for ``SamplingParams(extra_args=...)``, whose
    ``kv_transfer_params`` is also the OpenAI server's request field of that name."""
    path = Path(path).resolve()
    if not path.is_file():
        raise VllmKVError(f"no KV prefix file at {path}")
    if num_virtual_tokens is None:
        num_virtual_tokens = read_length(path)
    prompt = {"prompt_token_ids": placeholder_prompt(num_virtual_tokens, prompt_ids, placeholder_id),
              "cache_salt": SALT_PREFIX + file_sha256(path)}
    return prompt, {"kv_transfer_params": kv_params(path, num_virtual_tokens)}


def read_length(path: str | Path) -> int:
    """``P`` of a saved KV prefix, from its header."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return int(handle.get_slice("layers.0.key").get_shape()[-2])


__all__ = ["CONNECTOR_MODULE", "CONNECTOR_NAME", "KV_DIR_KEY", "LENGTH_KEY", "PATH_KEY", "PLACEHOLDER_ID",
           "SALT_PREFIX", "VllmKVError", "connector_config", "inside", "kv_params", "kv_request", "placeholder_prompt",
           "read_length", "save_kv"]
