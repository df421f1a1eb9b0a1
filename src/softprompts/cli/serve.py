"""``softprompts serve``: an OpenAI-compatible HTTP server over a directory of adapters."""

from __future__ import annotations

import argparse
from pathlib import Path

from softprompts.cli.arguments import add_dtype_flag, add_quantize_flag, finite, say_dtype

ENGINES = ("softprompts", "vllm")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve every adapter in a directory over HTTP (mixed-adapter batches)",
        description="Serve the adapters in DIR (one subdirectory each) from one frozen model: POST /v1/completions "
        "and /v1/chat/completions (model = adapter name or 'base'), POST /v1/classify, GET /v1/models, "
        "GET /v1/adapters, GET /health, GET /metrics (Prometheus). "
        "New or changed adapter directories are picked up while serving. With --engine vllm, vLLM's OpenAI server "
        "serves the same adapters by name (run from the venv `make vllm` builds); options this command does not "
        "know are passed to vLLM (e.g. --tensor-parallel-size 2 --max-model-len 4096).",
    )
    p.add_argument("--engine", choices=ENGINES, default="softprompts", help="softprompts (default: this "
                   "package's engine, continuous batching in one process) or vllm (vLLM's engine and OpenAI server; "
                   "docs/SERVING.md says when to switch)")
    p.add_argument("--adapters", required=True, metavar="DIR", help="directory of adapter subdirectories")
    p.add_argument("--model", default=None, help="base model (default: the embedded smollm2-135m)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto", help="torch device for the model (default auto: the first CUDA GPU "
                   "when one is visible, else cpu)")
    add_dtype_flag(p)
    add_quantize_flag(p)
    p.add_argument("--max-running", type=int, default=32, help="most requests decoding together (continuous "
                   "batching: requests join and leave the running batch at every step)")
    p.add_argument("--max-waiting", type=int, default=256, help="most requests queued; beyond it requests get HTTP "
                   "429 with Retry-After instead of growing memory")
    p.add_argument("--max-kv-mb", type=finite, default=None, help="KV-cache budget of the running requests, counted "
                   "at their worst case (prompt + max_tokens); a request that alone exceeds it gets 429 "
                   "(default: no budget beyond --max-running). With --engine vllm: the size of vLLM's KV cache "
                   "(default on a CPU: room for 32 full-length sequences, at most a quarter of the free memory)")
    p.add_argument("--prefill-chunk", type=int, default=512, metavar="TOKENS", help="prompts longer than this are "
                   "prefilled this many tokens per step, between the running requests' decode steps, so a long "
                   "prompt never stalls them for its whole prefill (default 512)")
    p.add_argument("--request-timeout", type=finite, default=None, metavar="SECONDS", help="end a generation still "
                   "running this long after it arrived (finish_reason 'timeout', with the tokens so far); default none")
    p.add_argument("--max-adapter-memory-mb", type=finite, default=1024.0,
                   help="LRU limit on loaded adapters and their placed artifacts (an adapter after a lead), together")
    p.add_argument("--poll-seconds", type=finite, default=2.0, help="adapter directory polling interval (0 = off)")
    p.add_argument("--allow-client-field", action="append", choices=("kv_transfer_params", "ec_transfer_params",
                   "prompt_embeds"), metavar="FIELD", help="--engine vllm only: let clients set this field, which "
                   "the front otherwise refuses (400) on every request, the base model's too. RISK: kv_transfer_params"
                   " asks the KV connector to load a file (only inside the front's own KV directory), prompt_embeds "
                   "makes vLLM deserialize a client's tensor; allow them only when every client is trusted "
                   "(docs/SERVING.md)")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=run, takes_extra_args=True)


def run(args: argparse.Namespace) -> int:
    from softprompts.errors import SoftpromptsError
    from softprompts.model.load import DEFAULT_MODEL, load_base, resolve_device

    try:
        from softprompts.serve.http import build_state, serve
    except ImportError as exc:
        raise SoftpromptsError(f"serving needs fastapi and uvicorn ({exc}); pip install 'softprompts[serve]'") from None
    problems = [msg for bad, msg in [
        (args.max_running < 1, f"--max-running must be >= 1, got {args.max_running}"),
        (args.max_waiting < 1, f"--max-waiting must be >= 1, got {args.max_waiting}"),
        (args.prefill_chunk < 1, f"--prefill-chunk must be >= 1, got {args.prefill_chunk}"),
        (args.max_kv_mb is not None and args.max_kv_mb <= 0, f"--max-kv-mb must be > 0, got {args.max_kv_mb}"),
        (args.request_timeout is not None and args.request_timeout <= 0,
         f"--request-timeout must be > 0 seconds, got {args.request_timeout}"),
        (args.max_adapter_memory_mb <= 0, f"--max-adapter-memory-mb must be > 0, got {args.max_adapter_memory_mb}"),
        (args.poll_seconds < 0, f"--poll-seconds must be >= 0 (0 = off), got {args.poll_seconds}"),
        (not Path(args.adapters).is_dir(), f"adapter directory {args.adapters} does not exist (--adapters)"),
    ] if bad]
    if problems:  # before the model loads
        raise SoftpromptsError("; ".join(problems))
    if args.allow_client_field and args.engine != "vllm":
        raise SoftpromptsError("--allow-client-field is for --engine vllm (the default engine has no such fields)")
    if args.engine == "vllm":
        from softprompts.cli.serve_vllm import run_vllm

        return run_vllm(args)
    if args.extra_args:
        raise SoftpromptsError(f"unrecognized arguments: {' '.join(args.extra_args)} (options for vLLM are taken with "
                               "--engine vllm)")
    say_dtype(args.dtype, resolve_device(args.device))
    base = load_base(args.model or DEFAULT_MODEL, dtype=args.dtype, device=args.device, quantize=args.quantize)
    state = build_state(
        base,
        args.adapters,
        max_running=args.max_running,
        max_waiting=args.max_waiting,
        max_kv_bytes=int(args.max_kv_mb * 2**20) if args.max_kv_mb is not None else None,
        request_timeout_s=args.request_timeout,
        prefill_chunk=args.prefill_chunk,
        max_adapter_bytes=int(args.max_adapter_memory_mb * 2**20),
        poll_s=args.poll_seconds,
    )
    names = [e.name for e in state.registry.entries()]
    print(f"serving {base.name} with {len(names)} adapters ({', '.join(names[:8])}{'...' if len(names) > 8 else ''}) "
          f"on http://{args.host}:{args.port}", flush=True)
    serve(state, host=args.host, port=args.port, log_level=args.log_level)
    return 0
