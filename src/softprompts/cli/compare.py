"""``softprompts compare``: train every method on the same data with the same budget and report which to pick.

Writes OUT/report.md, OUT/results.json and PNG plots; each (method, seed) run lives in OUT/runs/ and a re-run of
the same command skips finished runs and resumes unfinished ones.
"""

from __future__ import annotations

import argparse
import sys

from softprompts.cli.arguments import add_dtype_flag, add_quantize_flag, add_report_flag, finite, say_dtype
from softprompts.cli.task_inputs import add_chat_flags, label_list


def register(sub) -> None:
    p = sub.add_parser("compare", help="compare methods (and PEFT) on one task: report, plots, recommendation",
                       description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="embedded name, GGUF file, HF id or directory (default: "
                   "smollm2-135m)")
    p.add_argument("--dataset", default=None, help="catalog dataset (task, template, labels, splits preset; see "
                   "`softprompts data list`)")
    p.add_argument("--task", default=None, choices=("classify", "generate"), help="default: classify, or the dataset's")
    p.add_argument("--data", default=None, help="training data (.jsonl/.csv/.tsv); default: the dataset's train split")
    p.add_argument("--eval-data", default=None, help="dev data (best-adapter keeping, learning curves)")
    p.add_argument("--test-data", default=None, help="test data (final metric)")
    p.add_argument("--template", default=None, help=r'prompt template, e.g. "Review: {text}\nSentiment:"')
    p.add_argument("--target", default=None, help='target template, e.g. " {label}"')
    add_chat_flags(p)
    p.add_argument("--labels", default=None, help="comma-separated label set")
    p.add_argument("--methods", default=None, help="comma-separated methods to compare (default: every method)")
    p.add_argument("--baseline", default=None, type=_baselines, metavar="peft,lora,fewshot",
                   help="comma-separated: 'peft' also runs each method through HF PEFT, and PEFT LoRA (rank 8 on every "
                   "linear layer, lr 3e-4) as the weight-adapter ceiling; 'lora' runs only that ceiling (no PEFT "
                   "counterparts); 'fewshot' puts k demonstrations from the "
                   "training data in the prompt (no training) and measures what they cost per request, in the "
                   "prompt and cached as a KV prefix")
    p.add_argument("--no-lora", action="store_true", help="with --baseline peft: skip the LoRA runs")
    p.add_argument("--shots", type=int, default=None, help="with --baseline fewshot: k demonstrations (default: "
                   "chosen on dev among 0, 1, 2, 4, 8)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 100)")
    budget.add_argument("--minutes", type=finite, default=None, help="training minutes per run (steps estimated)")
    p.add_argument("--seeds", type=int, default=1, help="runs per method (mean ± std)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=finite, default=None, help="one learning rate for all (default: per method)")
    p.add_argument("--explain", type=int, default=None, metavar="ROWS",
                   help="after the runs, explain each method's adapter on ROWS dev (else test) rows as softprompts "
                   "explain does (attention share per layer, the layers that carry the task) and add a section to "
                   "report.md; OUT/explain/<method>/ holds each explanation")
    p.add_argument("--tune", type=int, default=None, metavar="N",
                   help="tune each method (and PEFT LoRA with --baseline peft) with N trials on dev before its runs: "
                   "learning rate, virtual tokens and the method's knobs (LoRA: lr and rank 4/8/16); the runs use "
                   "the best; studies in OUT/tune/<method>/ (needs pip install 'softprompts[tune]')")
    p.add_argument("--virtual-tokens", type=int, default=None, help="virtual tokens (default: per method)")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--train-limit", type=int, default=None, help="use the first N training examples")
    p.add_argument("--eval-limit", type=int, default=None, help="use the first N dev examples")
    p.add_argument("--test-limit", type=int, default=None, help="use the first N test examples")
    p.add_argument("--max-prompt-tokens", type=int, default=256)
    p.add_argument("--max-target-tokens", type=int, default=64)
    p.add_argument("--latency-tokens", type=int, default=8, help="tokens decoded when timing latency")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True, help="output directory (re-run the same command to resume)")
    add_quantize_flag(p)
    add_dtype_flag(p)
    add_report_flag(p)
    p.set_defaults(func=run)


def _baselines(text: str) -> str:
    """``--baseline``: one or more of peft, lora, fewshot, comma-separated (normalized, no repeats)."""
    names = list(dict.fromkeys(b.strip() for b in text.split(",") if b.strip()))
    unknown = [b for b in names if b not in ("peft", "lora", "fewshot")]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"takes peft, lora and/or fewshot, comma-separated; got {text!r}")
    return ",".join(names)


def run(args) -> int:
    from softprompts.compare import CompareConfig
    from softprompts.methods import METHODS
    from softprompts.model.load import DEFAULT_MODEL
    from softprompts.workflow import CompareFiles, TaskFlags, compare_files

    config = CompareConfig(
        model=args.model or DEFAULT_MODEL,
        quantize=args.quantize,
        dtype=args.dtype,
        methods=[m.strip() for m in (args.methods or ",".join(
            name for name, cls in METHODS.items() if cls.compared_by_default)).split(",") if m.strip()],
        seeds=args.seeds, baseline=args.baseline, lora=not args.no_lora, shots=args.shots, tune=args.tune,
        explain=args.explain,
        steps=args.steps if args.steps is not None or args.minutes is not None else 100, minutes=args.minutes,
        batch_size=args.batch_size, lr=args.lr, virtual_tokens=args.virtual_tokens, eval_every=args.eval_every,
        eval_limit=args.eval_limit, test_limit=args.test_limit, latency_tokens=args.latency_tokens,
        progress=not args.no_progress, report_to=args.report_to,
    )
    say_dtype(args.dtype)
    flags = TaskFlags(args.task, args.template, args.target, label_list(args.labels), args.placement, args.system,
                      args.max_prompt_tokens, args.max_target_tokens)
    results = compare_files(CompareFiles(args.out, config, flags, args.data, args.eval_data, args.test_data,
                                         args.dataset, args.train_limit))
    resume = results["resume"]
    if resume["skipped"]:
        print(f"skipped {len(resume['skipped'])} finished run(s): {', '.join(resume['skipped'])}", file=sys.stderr)
    print(f"wrote {args.out}/report.md, results.json and plots; "
          f"recommendation: {results['recommendation']['winner']}", file=sys.stderr)
    return 0
