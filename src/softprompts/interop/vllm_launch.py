"""``softprompts serve --engine vllm``: the command that starts vLLM's OpenAI server with the adapters' front.

vLLM's own server runs (``python -m vllm.entrypoints.openai.api_server``), so every vLLM option, its scheduler,
paged attention, tensor / pipeline parallelism and its OpenAI surface stay what they are. Three things are added:

* ``--middleware softprompts.interop.vllm_front.SoftpromptsFront``: the ASGI front that serves adapters by name
  (``vllm_front.py``);
* ``--enable-prompt-embeds`` (soft prompts go in as ``prompt_embeds``) and ``--kv-transfer-config`` naming the KV
  connector (KV prefixes go in through ``vllm_kv.SoftpromptsKVConnector``);
* ``--served-model-name base MODEL``: the base model answers to ``base`` (as on the default engine) and to its name.

The front reads its settings (``FrontConfig``) from the environment the command is started with, because vLLM builds
the middleware itself, with no arguments. Nothing here imports vLLM.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from softprompts.errors import SoftpromptsError
from softprompts.interop.vllm_kv_files import connector_config

FRONT = "softprompts.interop.vllm_front.SoftpromptsFront"
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
ENV = "SOFTPROMPTS_VLLM_FRONT"  # the FrontConfig as JSON
BASE_NAME = "base"
# vLLM options the front owns: naming the base and the connector are how adapters reach the engine
OWNED = ("--served-model-name", "--kv-transfer-config", "--middleware", "--enable-prompt-embeds")


@dataclass(frozen=True)
class FrontConfig:
    """What the front needs: the adapters directory, the base model (name or path, and the dtype the front loads it
    in on CPU: tokenizer, embeddings for soft prompts, adapter validation), the names vLLM serves the base under
    (the first is the one vLLM is asked for), hot-reload polling, the adapters' memory limit, API keys, the
    directory the front writes KV files to (the only one the connector reads from) and the front-only fields an
    operator lets trusted clients set (``vllm_requests.ALLOWABLE_FIELDS``)."""

    adapters: str
    model: str
    dtype: str | None = None
    served_names: tuple[str, ...] = (BASE_NAME,)
    poll_s: float = 2.0
    max_adapter_bytes: int = 1 << 30
    api_keys: tuple[str, ...] = ()
    kv_dir: str | None = None
    client_fields: tuple[str, ...] = ()

    def to_env(self) -> dict[str, str]:
        return {ENV: json.dumps({**self.__dict__, "served_names": list(self.served_names),
                                 "api_keys": list(self.api_keys), "client_fields": list(self.client_fields)})}

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> FrontConfig:
        raw = (env if env is not None else os.environ).get(ENV)
        if not raw:
            raise SoftpromptsError(f"{FRONT} is started by `softprompts serve --engine vllm`, which sets {ENV}; it "
                                   "was not set")
        fields = json.loads(raw)
        return cls(**{**fields, "served_names": tuple(fields["served_names"]), "api_keys": tuple(fields["api_keys"]),
                      "client_fields": tuple(fields.get("client_fields", ()))})


def option_values(args: list[str], name: str) -> list[str]:
    """The values given to ``name`` in ``args`` (``--name V`` or ``--name=V``)."""
    values = []
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            values.append(args[i + 1])
        elif arg.startswith(name + "="):
            values.append(arg.split("=", 1)[1])
    return values


def vllm_command(config: FrontConfig, model_path: str, host: str, port: int, dtype: str,
                 vllm_args: list[str]) -> tuple[list[str], dict[str, str]]:
    """``(argv, environment)`` that start vLLM's OpenAI server with the front. ``vllm_args``: the user's own vLLM
    options, passed on as they are (refused: the ones the front owns, ``OWNED``)."""
    owned = [arg.split("=", 1)[0] for arg in vllm_args if arg.split("=", 1)[0] in OWNED]
    if owned:
        raise SoftpromptsError(f"{', '.join(sorted(set(owned)))}: set by softprompts serve --engine vllm (the base is "
                               f"served as {BASE_NAME!r} and as its model name, adapters by their names, soft prompts "
                               "as prompt_embeds and KV prefixes through the softprompts connector); remove it")
    keys = tuple(option_values(vllm_args, "--api-key")) or tuple(k for k in [os.environ.get("VLLM_API_KEY")] if k)
    kv_dir = config.kv_dir or tempfile.mkdtemp(prefix="softprompts-vllm-kv-")  # private (0700): the front writes,
    config = FrontConfig(**{**config.__dict__, "api_keys": keys, "kv_dir": kv_dir})  # the connector reads only here
    argv = [sys.executable, "-m", SERVER_MODULE, "--model", model_path, "--host", host, "--port", str(port),
            "--dtype", dtype, "--served-model-name", *config.served_names, "--enable-prompt-embeds",
            "--kv-transfer-config", json.dumps(connector_config(kv_dir=kv_dir)), "--middleware", FRONT, *vllm_args]
    return argv, {**os.environ, **config.to_env()}


# vLLM options that size its KV cache; when none is given on a CPU build, the launcher sizes it (``kv_cache_size``)
KV_SIZE_OPTIONS = ("--kv-cache-memory-bytes", "--gpu-memory-utilization")
SIZED_SEQUENCES = 32  # full-length sequences the default KV cache makes room for (the default engine's --max-running)
AVAILABLE_SHARE = 0.25  # at most this share of the memory available at start


@dataclass(frozen=True)
class KVCacheSize:
    """vLLM's KV cache as the launcher chose it: ``bytes`` (``--kv-cache-memory-bytes``) and why (``reason``)."""

    bytes: int
    reason: str


DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}
# vLLM's human-readable integers (``vllm.utils.argparse_utils.human_readable_int``): 4k = 4,000, 4K = 4,096
_READABLE_INT = re.compile(r"(\d+(?:\.\d+)?)([kmgtKMGT]?)")
_MULTIPLIERS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "K": 2**10, "M": 2**20, "G": 2**30,
                "T": 2**40}


def max_model_len(vllm_args: list[str], model_limit: int) -> int:
    """The sequence length vLLM serves: the last ``--max-model-len`` in ``vllm_args`` read as vLLM reads it (an
    integer, ``4k`` = 4,000, ``4K`` = 4,096; ``-1`` / ``auto``: the model's own), else ``model_limit`` (the model's
    ``max_position_embeddings``); ``SoftpromptsError`` for a value vLLM would refuse."""
    given = option_values(vllm_args, "--max-model-len")
    if not given or given[-1].strip().lower() in ("-1", "auto"):
        return model_limit
    match = _READABLE_INT.fullmatch(given[-1].strip())
    binary_fraction = match is not None and match.group(2).isupper() and "." in match.group(1)  # vLLM refuses 1.5K
    length = int(float(match.group(1)) * _MULTIPLIERS[match.group(2)]) if match and not binary_fraction else 0
    if length < 1:
        raise SoftpromptsError(f"--max-model-len {given[-1]!r}: give a positive number of tokens (e.g. 4096, 4k or "
                               "4K), or auto")
    return length


def kv_bytes_per_token(config, dtype: str) -> int:
    """Bytes of keys and values one token takes in every layer of a model of this ``transformers`` config:
    ``2 * layers * H_kv * D * dtype bytes`` (an upper bound where some layers attend to a sliding window)."""
    text = getattr(config, "text_config", None) or config
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * text.num_hidden_layers * heads * head_dim * DTYPE_BYTES.get(dtype, 4)


def kv_cache_size(bytes_per_token: int, max_model_len: int, available: int, max_kv_mb: float | None = None,
                  sequences: int = SIZED_SEQUENCES) -> KVCacheSize:
    """The KV cache for vLLM on a CPU, where ``--gpu-memory-utilization`` (default 0.92) is a share of the machine's
    whole RAM and vLLM refuses to start when that much is not free. ``max_kv_mb`` (the user's ``--max-kv-mb``) wins;
    else room for ``sequences`` sequences of ``max_model_len`` tokens, at most ``AVAILABLE_SHARE`` of the memory
    ``available`` now. A cache that cannot hold one full-length sequence is an error naming the numbers and the fix.
    ``bytes_per_token``: keys and values of every layer, ``2 * sum_l H_l * D_l * dtype bytes``."""
    one = bytes_per_token * max_model_len
    gib = 2**30

    def fix() -> str:
        return (f"one {max_model_len}-token sequence needs {one / 2**20:.0f} MiB of KV ({bytes_per_token} bytes per "
                f"token); lower --max-model-len, free memory, or set --max-kv-mb")

    if max_kv_mb is not None:
        chosen = int(max_kv_mb * 2**20)
        if chosen > available:
            raise SoftpromptsError(f"--max-kv-mb {max_kv_mb:g} is more than the {available / gib:.1f} GiB of memory "
                                   "available now; lower it or free memory")
        if chosen < one:
            raise SoftpromptsError(f"--max-kv-mb {max_kv_mb:g} cannot hold one full sequence: {fix()}")
        return KVCacheSize(chosen, f"{chosen / gib:.2f} GiB (--max-kv-mb)")
    wanted, cap = one * sequences, int(available * AVAILABLE_SHARE)
    chosen = min(wanted, cap)
    if chosen < one:
        raise SoftpromptsError(f"not enough memory for vLLM's KV cache: {available / gib:.1f} GiB available, and "
                               f"{fix()}")
    why = (f"room for {sequences} sequences of {max_model_len} tokens" if chosen == wanted else
           f"a quarter of the {available / gib:.1f} GiB available ({chosen // one} sequences of {max_model_len} "
           f"tokens; {sequences} would take {wanted / gib:.1f} GiB)")
    return KVCacheSize(chosen, f"{chosen / gib:.2f} GiB, {why}; --max-kv-mb sets it")


def check_vllm_installed() -> None:
    """A clear error where vLLM is not installed (the default venv does not have it)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise SoftpromptsError(f"--engine vllm needs vLLM, which is not installed in this environment "
                               f"({sys.prefix}); run `make vllm` and start .venv-vllm/bin/softprompts serve "
                               "--engine vllm")


def served_names(model: str) -> tuple[str, ...]:
    """``base`` and the model's name (a path's last part), once each."""
    name = Path(model).name if os.sep in model and Path(model).exists() else model
    return tuple(dict.fromkeys([BASE_NAME, name]))


__all__ = ["BASE_NAME", "ENV", "FRONT", "KV_SIZE_OPTIONS", "FrontConfig", "KVCacheSize", "OWNED",
           "check_vllm_installed", "kv_bytes_per_token", "kv_cache_size", "max_model_len", "option_values",
           "served_names", "vllm_command"]
