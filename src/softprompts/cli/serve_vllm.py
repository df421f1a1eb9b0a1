"""``softprompts serve --engine vllm``: replace this process with vLLM's OpenAI server and the adapters' front
(``interop/vllm_launch.py`` builds the command, ``interop/vllm_front.py`` is the front)."""

from __future__ import annotations

import argparse
import os

from softprompts.errors import SoftpromptsError

# options of the default engine -> what vLLM calls the same thing (refused when set with --engine vllm)
DEFAULT_ENGINE_ONLY = {
    "max_running": ("--max-running", 32, "--max-num-seqs"),
    "max_waiting": ("--max-waiting", 256, "vLLM's queue (it has no bound; put a gateway in front)"),
    "max_kv_mb": ("--max-kv-mb", None, "--kv-cache-memory-bytes or --gpu-memory-utilization; on CPU "
                  "VLLM_CPU_KVCACHE_SPACE"),
    "prefill_chunk": ("--prefill-chunk", 512, "--max-num-batched-tokens (chunked prefill)"),
    "request_timeout": ("--request-timeout", None, "a client-side timeout"),
    "quantize": ("--quantize", None, "--quantization"),
    "device": ("--device", "auto", "CUDA_VISIBLE_DEVICES (vLLM picks its platform itself)"),
}


def run_vllm(args: argparse.Namespace) -> int:
    from softprompts.interop.vllm_launch import FrontConfig, check_vllm_installed, served_names, vllm_command
    from softprompts.model.load import DEFAULT_MODEL, resolve

    set_here = [f"{flag} (vLLM: {theirs})" for key, (flag, default, theirs) in DEFAULT_ENGINE_ONLY.items()
                if getattr(args, key, default) != default]
    if set_here:
        raise SoftpromptsError("options of the default engine, not taken with --engine vllm: " + "; ".join(set_here))
    check_vllm_installed()
    model = args.model or DEFAULT_MODEL
    dtype = args.dtype or "float32"  # the default engine's dtype, so both engines give the same tokens
    config = FrontConfig(adapters=os.path.abspath(args.adapters), model=model, dtype=dtype,
                         served_names=served_names(model), poll_s=args.poll_seconds,
                         max_adapter_bytes=int(args.max_adapter_memory_mb * 2**20))
    argv, env = vllm_command(config, resolve(model), args.host, args.port, dtype,
                             ["--uvicorn-log-level", args.log_level, *args.extra_args])
    print(f"starting vLLM's OpenAI server for {model} with the adapters in {args.adapters} on "
          f"http://{args.host}:{args.port}", flush=True)
    os.execvpe(argv[0], argv, env)
    return 0  # not reached
