"""``softprompts serve --engine vllm``: vLLM's OpenAI server with the adapters' front, run and watched as a child
(``interop/vllm_launch.py`` builds the command, ``interop/vllm_front.py`` is the front; ``supervise`` turns vLLM's
exit into a status a process supervisor acts on)."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile

from softprompts.cli.arguments import say_dtype
from softprompts.errors import SoftpromptsError

# options of the default engine -> what vLLM calls the same thing (refused when set with --engine vllm)
DEFAULT_ENGINE_ONLY = {
    "max_running": ("--max-running", 32, "--max-num-seqs"),
    "max_waiting": ("--max-waiting", 256, "vLLM's queue (it has no bound; put a gateway in front)"),
    "prefill_chunk": ("--prefill-chunk", 512, "--max-num-batched-tokens (chunked prefill)"),
    "request_timeout": ("--request-timeout", None, "a client-side timeout"),
    "quantize": ("--quantize", None, "--quantization"),
    "device": ("--device", "auto", "CUDA_VISIBLE_DEVICES (vLLM picks its platform itself)"),
}


def run_vllm(args: argparse.Namespace) -> int:
    from softprompts.interop.vllm_launch import FrontConfig, check_vllm_installed, served_names, vllm_command
    from softprompts.model.load import DEFAULT_MODEL, dtype_name, resolve, resolve_device, resolve_dtype

    set_here = [f"{flag} (vLLM: {theirs})" for key, (flag, default, theirs) in DEFAULT_ENGINE_ONLY.items()
                if getattr(args, key, default) != default]
    if set_here:
        raise SoftpromptsError("options of the default engine, not taken with --engine vllm: " + "; ".join(set_here))
    check_vllm_installed()
    model = args.model or DEFAULT_MODEL
    device = resolve_device("auto")  # vLLM's platform: a visible CUDA GPU, else the CPU
    say_dtype(args.dtype, device)
    dtype = dtype_name(resolve_dtype(args.dtype, device))  # as the default engine resolves it: the same tokens
    path = resolve(model)
    extra = ["--uvicorn-log-level", args.log_level, *args.extra_args, *_kv_cache_option(args, path, dtype)]
    kv_dir = tempfile.mkdtemp(prefix="softprompts-vllm-kv-")  # private (0700); removed here when vLLM ends, however
    config = FrontConfig(adapters=os.path.abspath(args.adapters), model=model, dtype=dtype,
                         served_names=served_names(model), poll_s=args.poll_seconds,
                         max_adapter_bytes=int(args.max_adapter_memory_mb * 2**20),
                         client_fields=tuple(args.allow_client_field or ()), kv_dir=kv_dir)
    argv, env = vllm_command(config, path, args.host, args.port, dtype, extra)
    if config.client_fields:
        print(f"clients may set {', '.join(config.client_fields)} (--allow-client-field): trust every client that "
              "can reach this server", flush=True)
    print(f"starting vLLM's OpenAI server for {model} with the adapters in {args.adapters} on "
          f"http://{args.host}:{args.port}", flush=True)
    try:
        return supervise(argv, env)
    finally:
        shutil.rmtree(kv_dir, ignore_errors=True)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def supervise(argv: list[str], env: dict[str, str]) -> int:
    """Run vLLM's server as a child and exit as a supervisor needs: with the server's own status when this process was
    asked to stop (the signal is passed on, once), and with 1 when the server ended on its own - vLLM's API server
    exits with status 0 when its engine process dies (measured: SIGKILL of the engine under load, exit 0 within
    0.8 s), which a supervisor restarting on failure would take for a clean stop. The child runs in its own session,
    so a terminal's Ctrl-C reaches it once, through here."""
    child = subprocess.Popen(argv, env=env, start_new_session=True)
    asked: list[int] = []

    def pass_on(signum, frame) -> None:
        if signum not in asked:
            asked.append(signum)
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, pass_on) for sig in STOP_SIGNALS}
    try:
        while True:
            try:
                code = child.wait()
                break
            except InterruptedError:  # pragma: no cover - wait() retries on EINTR itself since Python 3.5
                continue
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if asked:
        return code if code >= 0 else 0  # stopped on request: vLLM's status, 0 for a signal it died of
    if code == 0:
        print("error: vLLM's server stopped on its own (its engine process ended: see the log above); exiting 1 so "
              "a supervisor restarts it", file=sys.stderr, flush=True)
        return 1
    return code if code > 0 else 128 - code  # a signal that killed it: the shell's convention (128 + signal)


def _kv_cache_option(args: argparse.Namespace, model_path: str, dtype: str) -> list[str]:
    """``--kv-cache-memory-bytes N`` for vLLM: from ``--max-kv-mb``, or sized by ``vllm_launch.kv_cache_size`` on a
    CPU build when the user set none of vLLM's own KV options (there vLLM's default reserves 92% of the machine's RAM
    and refuses to start when that much is not free); nothing otherwise."""
    from softprompts.interop.vllm_launch import (
        KV_SIZE_OPTIONS,
        kv_bytes_per_token,
        kv_cache_size,
        max_model_len,
        option_values,
    )

    theirs = [o for o in KV_SIZE_OPTIONS if option_values(args.extra_args, o)]
    if os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        theirs.append("VLLM_CPU_KVCACHE_SPACE")
    if theirs and args.max_kv_mb is not None:
        raise SoftpromptsError(f"--max-kv-mb and {', '.join(theirs)} both size vLLM's KV cache; give one")
    if theirs:
        return []
    import psutil
    from transformers import AutoConfig
    from vllm.platforms import current_platform

    if args.max_kv_mb is None and not current_platform.is_cpu():
        return []  # on a GPU, vLLM's share of the GPU's memory is the usual default
    model_config = AutoConfig.from_pretrained(model_path)
    limit = int(getattr(getattr(model_config, "text_config", None) or model_config, "max_position_embeddings", 2048))
    size = kv_cache_size(kv_bytes_per_token(model_config, dtype), max_model_len(args.extra_args, limit),
                         psutil.virtual_memory().available, args.max_kv_mb)
    print(f"vLLM's KV cache: {size.reason}", flush=True)
    return ["--kv-cache-memory-bytes", str(size.bytes)]
