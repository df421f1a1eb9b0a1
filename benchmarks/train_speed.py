"""Training step time and peak memory: ours vs PEFT vs the limit, every method, interleaved in one process.

The LIMIT is what no prompt method can beat on a frozen model: the model's forward + backward with the gradient
going only to a 20-token block of input embeddings (an ``nn.Parameter [P, d]`` concatenated in front of the token
embeddings), the LM head at the same label positions, the same fp32 cross-entropy, AdamW and gradient clipping.
Each system trains the same tokens (``B`` rows of ``T`` random ids, labels on every token), same dtype, same
optimizer. One repetition runs one optimizer step of every (method, system) pair in rotating order; the reported
time is the median over repetitions, so machine noise (shared CPUs) hits all systems alike and the ratios are
side by side. Peak memory is measured once per system after warm-up (``softprompts.compare.latency.peak_bytes``:
``torch.cuda.max_memory_allocated`` on GPU; on CPU the peak of the running sum of the CPU allocator's
allocation/free events recorded by ``torch.profiler`` with ``profile_memory=True``: tensor bytes only).

Systems per method (``systems.py``: each method's declared PEFT counterpart, what ``softprompts compare`` runs):

    prompt   ours PromptTuning              PEFT PromptTuningConfig
    prefix   ours PrefixTuning (MLP e=h=512) PEFT PrefixTuningConfig(prefix_projection=True, encoder_hidden_size=512)
    ptuning  ours PTuning (MLP h=512)        PEFT PromptEncoderConfig(MLP, encoder_hidden_size=512)
    deep     ours DeepPrompt                 PEFT PrefixTuningConfig(prefix_projection=False)

Usage::

    python benchmarks/train_speed.py --quick                 # CPU, SmolLM2, batch 2 x 32, 3 reps (~1 min, idle 2 cores)
    python benchmarks/train_speed.py                         # CPU, SmolLM2, batch 2 x 64 tokens, 5 reps
    python benchmarks/train_speed.py --device cuda --json    # anchor: random-init Llama-3.2-1B shape, bf16, 8 x 256
    python benchmarks/train_speed.py --device cuda --compile # + ours with torch.compile'd loss (step.compiled_loss)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from systems import our_method, peft_model
from torch import nn

from softprompts.compare.latency import peak_bytes
from softprompts.model.decoder.base import BaseModel
from softprompts.tasks import Encoded, collate
from softprompts.training.step import accumulate_step, compiled_loss, label_loss_sum

METHODS = ("prompt", "prefix", "ptuning", "deep")
ENCODER_HIDDEN = 512
LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, head_dim=64,
                max_position_embeddings=4096, rope_theta=500000.0)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            vocab_size=512, tie_word_embeddings=True, max_position_embeddings=256)


@dataclass(frozen=True)
class Setup:
    """One benchmark configuration."""

    model: str  # "smollm2-135m", "llama-3.2-1b-shape" (random init) or "tiny-llama" (random init)
    device: str
    dtype: str
    batch: int
    seq: int
    virtual_tokens: int
    reps: int
    warmup: int = 2
    checkpointing: bool = False
    compile: bool = False


def load_model(setup: Setup) -> BaseModel:
    """The frozen base model of ``setup`` (random-init shapes are built on the device directly, no download)."""
    dtype = getattr(torch, setup.dtype)
    if setup.model == "smollm2-135m":
        from softprompts import load_base

        return load_base("smollm2-135m", dtype=dtype, device=setup.device)
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**(LLAMA_1B if setup.model == "llama-3.2-1b-shape" else TINY))
    torch.manual_seed(0)
    with torch.device(setup.device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return BaseModel(model=model, tokenizer=None, name=setup.model)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# --- the three systems: each is a zero-argument "one optimizer step" callable ------------------------------------


def clip_and_step(params: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def ours_step(base: BaseModel, name: str, ids: torch.Tensor, checkpoint: bool = False,
              compile_loss: bool = False) -> Callable[[], None]:
    """Our training loop's step: collate (left-padded, label positions), artifact once, label-only LM head."""
    method = our_method(base, name, VIRTUAL, ENCODER_HIDDEN)
    method.train()
    params = list(method.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    rows = [Encoded(r[:1], r[1:]) for r in ids.tolist()]  # labels on every token that has a predecessor
    n_tokens = float(sum(len(r.target_ids) for r in rows))

    def step() -> None:
        batch = collate(rows, 0, base.device)
        accumulate_step(base, method, method.artifact_kind, [batch], n_tokens, checkpoint_layers=checkpoint,
                        loss_fn=compiled_loss() if compile_loss else label_loss_sum)
        clip_and_step(params, optimizer)

    return step


def peft_step(base: BaseModel, name: str, ids: torch.Tensor) -> Callable[[], None]:
    """PEFT's step as its users run it: ``model(input_ids, attention_mask, labels).loss.backward()``."""
    model = peft_model(base, name, VIRTUAL, ENCODER_HIDDEN)
    model.train()
    base.model.eval()  # same frozen base (no dropout) for every system
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    def step() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(**batch).loss.backward()
        clip_and_step(params, optimizer)

    return step


def limit_step(base: BaseModel, ids: torch.Tensor) -> Callable[[], None]:
    """Frozen forward + backward with the gradient only to a ``[P, d]`` input block; same head, loss, optimizer."""
    model = base.model
    block = nn.Parameter(torch.randn(VIRTUAL, base.shapes.hidden_size, device=base.device) * 0.02)  # fp32, as ours
    optimizer = torch.optim.AdamW([block], lr=1e-3)
    batch, length = ids.shape
    positions = torch.arange(VIRTUAL, VIRTUAL + length - 1, device=base.device)  # predict tokens 1..T-1
    labels = ids[:, 1:].reshape(-1)
    n_tokens = labels.numel()

    def step() -> None:
        embeds = torch.cat([block.to(base.dtype).expand(batch, -1, -1), model.get_input_embeddings()(ids)], dim=1)
        logits = model(inputs_embeds=embeds, use_cache=False, logits_to_keep=positions).logits  # [B, T-1, V]
        loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), labels, reduction="sum") / n_tokens
        loss.backward()
        clip_and_step([block], optimizer)

    return step


VIRTUAL = 20


# --- the run -----------------------------------------------------------------------------------------------------


def timed(step: Callable[[], None], device: str) -> float:
    sync(device)
    started = time.perf_counter()
    step()
    sync(device)
    return time.perf_counter() - started


def run(setup: Setup, methods: list[str], log=print) -> list[dict]:
    """Build every system, warm each up, measure peak memory once each, then interleave timed repetitions."""
    global VIRTUAL
    VIRTUAL = setup.virtual_tokens
    base = load_model(setup)
    torch.manual_seed(1)
    ids = torch.randint(3, base.shapes.vocab_size, (setup.batch, setup.seq), device=setup.device)
    systems: dict[tuple[str, str], Callable[[], None]] = {}
    for name in methods:
        systems[name, "ours"] = ours_step(base, name, ids)
        if setup.checkpointing:
            systems[name, "ours_ckpt"] = ours_step(base, name, ids, checkpoint=True)
        if setup.compile:
            systems[name, "ours_compiled"] = ours_step(base, name, ids, compile_loss=True)
        systems[name, "peft"] = peft_step(base, name, ids)
    systems["all", "limit"] = limit_step(base, ids)  # the same for every method: timed once per repetition
    keys = list(systems)
    peaks, times, first_call = {}, {k: [] for k in keys}, {}
    for key in keys:
        first_call[key] = timed(systems[key], setup.device)  # includes compilation for a compiled step
        for _ in range(setup.warmup):  # warm-up: optimizer state, allocator, kernels
            systems[key]()
        log(f"{key[0]}/{key[1]} ready (first step {first_call[key]:.2f} s)", file=sys.stderr)
        peaks[key] = peak_bytes(systems[key], setup.device)
    for rep in range(setup.reps):
        shift = rep % len(keys)
        for key in keys[shift:] + keys[:shift]:  # rotate the order: no system always runs first or last
            times[key].append(timed(systems[key], setup.device))
        log(f"rep {rep + 1}/{setup.reps} done", file=sys.stderr)
    meta = environment(setup)
    records = []
    for name in methods:
        med = {s: statistics.median(times[name, s]) for s in ("ours", "peft")}
        med["limit"] = statistics.median(times["all", "limit"])
        rec = {"method": name, "ours_s": med["ours"], "peft_s": med["peft"], "limit_s": med["limit"],
               "ours_x_limit": med["ours"] / med["limit"], "peft_x_limit": med["peft"] / med["limit"],
               "peft_over_ours": med["peft"] / med["ours"],
               "ours_peak_bytes": peaks[name, "ours"], "peft_peak_bytes": peaks[name, "peft"],
               "limit_peak_bytes": peaks["all", "limit"]}
        if setup.checkpointing:
            rec["ours_ckpt_s"] = statistics.median(times[name, "ours_ckpt"])
            rec["ours_ckpt_peak_bytes"] = peaks[name, "ours_ckpt"]
        if setup.compile:
            rec["ours_compiled_s"] = statistics.median(times[name, "ours_compiled"])
            rec["ours_compiled_x_limit"] = rec["ours_compiled_s"] / med["limit"]
            rec["ours_compiled_peak_bytes"] = peaks[name, "ours_compiled"]
            rec["compile_first_step_s"] = first_call[name, "ours_compiled"]
        rec["samples_s"] = {k[1]: [round(t, 5) for t in times[k]] for k in keys if k[0] in (name, "all")}
        records.append({**rec, **meta})
    return records


def environment(setup: Setup) -> dict:
    """Device, versions, commit and the configuration: what a reader needs to reproduce a row."""
    import peft
    import transformers

    device = torch.cuda.get_device_name() if setup.device.startswith("cuda") else cpu_name()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    memory = ("torch.cuda.max_memory_allocated" if setup.device.startswith("cuda")
              else "torch.profiler profile_memory: peak of the running sum of CPU allocator events")
    return {"device": device, "setup": asdict(setup), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "threads": torch.get_num_threads(),
            "commit": commit, "peak_memory_method": memory}


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip() + f" ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def table(records: list[dict], checkpointing: bool, compiled: bool = False) -> str:
    mib = 2**20
    head = ("| method | ours ms | PEFT ms | limit ms | ours x limit | PEFT x limit | PEFT/ours | ours peak MiB | "
            "PEFT peak MiB | limit peak MiB |")
    if checkpointing:
        head += " ours+ckpt ms | ours+ckpt peak MiB |"
    if compiled:
        head += " ours compiled ms | compiled x limit | compiled peak MiB | first compiled step s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        line = (f"| {r['method']} | {r['ours_s'] * 1e3:.1f} | {r['peft_s'] * 1e3:.1f} | {r['limit_s'] * 1e3:.1f} | "
                f"{r['ours_x_limit']:.3f} | {r['peft_x_limit']:.3f} | {r['peft_over_ours']:.2f} | "
                f"{r['ours_peak_bytes'] / mib:.0f} | {r['peft_peak_bytes'] / mib:.0f} | "
                f"{r['limit_peak_bytes'] / mib:.0f} |")
        if checkpointing:
            line += f" {r['ours_ckpt_s'] * 1e3:.1f} | {r['ours_ckpt_peak_bytes'] / mib:.0f} |"
        if compiled:
            line += (f" {r['ours_compiled_s'] * 1e3:.1f} | {r['ours_compiled_x_limit']:.3f} | "
                     f"{r['ours_compiled_peak_bytes'] / mib:.0f} | {r['compile_first_step_s']:.1f} |")
        lines.append(line)
    return "\n".join(lines)


def parse_setup(args: argparse.Namespace) -> Setup:
    if args.tiny:
        base = Setup("tiny-llama", args.device, "float32", 2, 16, 4, 3, warmup=1)
    elif args.device.startswith("cuda"):
        base = Setup("llama-3.2-1b-shape", args.device, "bfloat16", 8, 256, 20, 20)
    elif args.quick:
        base = Setup("smollm2-135m", args.device, "float32", 2, 32, 20, 3, warmup=1)
    else:
        base = Setup("smollm2-135m", args.device, "float32", 2, 64, 20, 5)
    changes = {k: v for k, v in dict(batch=args.batch, seq=args.seq, reps=args.reps, dtype=args.dtype,
                                       virtual_tokens=args.virtual_tokens).items() if v is not None}
    return Setup(**{**asdict(base), **changes, "checkpointing": args.checkpointing, "compile": args.compile})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (SmolLM2) or cuda (random-init Llama-3.2-1B shape, bf16)")
    parser.add_argument("--quick", action="store_true", help="small CPU configuration (batch 2 x 32 tokens, 3 reps)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama (tests)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seq", type=int)
    parser.add_argument("--virtual-tokens", type=int)
    parser.add_argument("--reps", type=int)
    parser.add_argument("--dtype", help="float32 / bfloat16 (default: float32 on CPU, bfloat16 on GPU)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--checkpointing", action="store_true", help="also time ours with gradient checkpointing")
    parser.add_argument("--compile", action="store_true", help="also time ours with the torch.compile'd loss")
    parser.add_argument("--json", action="store_true", help="one JSON object per method on stdout")
    args = parser.parse_args(argv)
    setup = parse_setup(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    records = run(setup, methods, log=print)
    if args.json:
        for r in records:
            print(json.dumps(r))
    else:
        s = setup
        print(f"{records[0]['device']} | {s.model} {s.dtype} | batch {s.batch} x {s.seq} tokens, {s.virtual_tokens} "
              f"virtual, labels on every token | median of {s.reps} interleaved reps | commit {records[0]['commit']}")
        print(table(records, setup.checkpointing, setup.compile))


if __name__ == "__main__":
    main()
