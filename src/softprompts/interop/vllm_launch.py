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
import sys
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
    (the first is the one vLLM is asked for), hot-reload polling, the adapters' memory limit, API keys."""

    adapters: str
    model: str
    dtype: str | None = None
    served_names: tuple[str, ...] = (BASE_NAME,)
    poll_s: float = 2.0
    max_adapter_bytes: int = 1 << 30
    api_keys: tuple[str, ...] = ()

    def to_env(self) -> dict[str, str]:
        return {ENV: json.dumps({**self.__dict__, "served_names": list(self.served_names),
                                 "api_keys": list(self.api_keys)})}

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> FrontConfig:
        raw = (env if env is not None else os.environ).get(ENV)
        if not raw:
            raise SoftpromptsError(f"{FRONT} is started by `softprompts serve --engine vllm`, which sets {ENV}; it "
                                   "was not set")
        fields = json.loads(raw)
        return cls(**{**fields, "served_names": tuple(fields["served_names"]), "api_keys": tuple(fields["api_keys"])})


def _option_values(args: list[str], name: str) -> list[str]:
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
    keys = tuple(_option_values(vllm_args, "--api-key")) or tuple(k for k in [os.environ.get("VLLM_API_KEY")] if k)
    config = FrontConfig(**{**config.__dict__, "api_keys": keys})
    argv = [sys.executable, "-m", SERVER_MODULE, "--model", model_path, "--host", host, "--port", str(port),
            "--dtype", dtype, "--served-model-name", *config.served_names, "--enable-prompt-embeds",
            "--kv-transfer-config", json.dumps(connector_config()), "--middleware", FRONT, *vllm_args]
    return argv, {**os.environ, **config.to_env()}


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


__all__ = ["BASE_NAME", "ENV", "FRONT", "FrontConfig", "OWNED", "check_vllm_installed", "served_names",
           "vllm_command"]
