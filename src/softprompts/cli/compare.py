"""``softprompts compare``: train every method on the same data with the same budget and report which to pick.

Writes OUT/report.md, OUT/results.json and PNG plots; each (method, seed) run lives in OUT/runs/ and a re-run of
the same command skips finished runs and resumes unfinished ones.
"""

from __future__ import annotations

import argparse
import sys

from softprompts.cli.arguments import add_quantize_flag, add_report_flag, finite
from softprompts.cli.task_inputs import add_chat_flags
from softprompts.errors import SoftpromptsError


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
    add_report_flag(p)
    p.set_defaults(func=run)


def _baselines(text: str) -> str:
    """``--baseline``: one or more of peft, lora, fewshot, comma-separated (normalized, no repeats)."""
    names = list(dict.fromkeys(b.strip() for b in text.split(",") if b.strip()))
    unknown = [b for b in names if b not in ("peft", "lora", "fewshot")]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"takes peft, lora and/or fewshot, comma-separated; got {text!r}")
    return ",".join(names)


def _task_rows(spec, inputs: dict, train_limit: int | None) -> dict | None:
    """Chat rows for the few-shot baseline (it writes demonstrations as turns): each split's rows, as its examples."""
    from softprompts.data.sources import read_rows

    if spec.chat is None:
        return None
    rows = {split: read_rows(inputs[split]) if inputs[split] else [] for split in ("train", "dev", "test")}
    rows["train"] = rows["train"][:train_limit] if train_limit else rows["train"]
    return rows


def _resolve_inputs(args) -> dict:
    """Task, template, labels and split paths from the flags, filled in from ``--dataset`` presets."""
    inputs = {"task": args.task, "prompt": args.template, "target": args.target,
              "labels": [x.strip() for x in args.labels.split(",") if x.strip()] if args.labels else None,
              "train": args.data, "dev": args.eval_data, "test": args.test_data}
    if args.dataset:
        from softprompts.data.catalog import get_dataset
        from softprompts.data.prepare import prepared_paths

        entry = get_dataset(args.dataset)
        presets = entry.presets()
        if args.template is None and args.target is None:
            inputs["prompt"], inputs["target"] = presets["prompt"], presets["target"]
        inputs["task"] = inputs["task"] or presets["task"]
        inputs["labels"] = inputs["labels"] or presets["labels"]
        if not (args.data and args.eval_data and args.test_data):
            paths = prepared_paths(args.dataset, progress=not args.no_progress)
            for split in ("train", "dev", "test"):
                inputs[split] = inputs[split] or paths.get(split)
    inputs["task"] = inputs["task"] or "classify"
    if not inputs["train"]:
        raise SoftpromptsError("--data required (or --dataset NAME for catalog presets)")
    return inputs


def run(args) -> int:
    from softprompts.compare import CompareConfig, CompareData, run_compare
    from softprompts.compare.preflight import option_problems, refuse
    from softprompts.files import check_output
    from softprompts.methods import METHODS
    from softprompts.model.load import DEFAULT_MODEL, load_base
    from softprompts.workflow import TaskFlags, load_task

    check_output(args.out, overwrite=True)  # an existing compare is resumed; a path under a file fails now
    inputs = _resolve_inputs(args)
    model = args.model or DEFAULT_MODEL
    config = CompareConfig(
        model=model,
        quantize=args.quantize,
        methods=[m.strip() for m in (args.methods or ",".join(
            name for name, cls in METHODS.items() if cls.compared_by_default)).split(",") if m.strip()],
        seeds=args.seeds, baseline=args.baseline, lora=not args.no_lora, shots=args.shots, tune=args.tune,
        explain=args.explain,
        steps=args.steps if args.steps is not None or args.minutes is not None else 100, minutes=args.minutes,
        batch_size=args.batch_size, lr=args.lr, virtual_tokens=args.virtual_tokens, eval_every=args.eval_every,
        eval_limit=args.eval_limit, test_limit=args.test_limit, latency_tokens=args.latency_tokens,
        progress=not args.no_progress, report_to=args.report_to,
    )
    loaded = []

    def tokenizer():  # chat rows need the model's chat template: the model loads now and the compare reuses it
        refuse(option_problems(config))  # the options first, then (run_compare) every problem of the rows at once
        loaded.append(load_base(model, device="auto", quantize=args.quantize))
        return loaded[0].tokenizer

    flags = TaskFlags(inputs["task"], inputs["prompt"], inputs["target"], inputs["labels"], args.placement, args.system,
                      args.max_prompt_tokens, args.max_target_tokens)
    spec, train, (dev, test) = load_task(flags, inputs["train"], [inputs["dev"], inputs["test"]], tokenizer,
                                         optional_devs=True)
    train = train[: args.train_limit] if args.train_limit else train
    fewshot = "fewshot" in (args.baseline or "").split(",")
    rows = _task_rows(spec, inputs, args.train_limit) if fewshot else None
    description = {"dataset": args.dataset, "train": str(inputs["train"]), "dev": str(inputs["dev"]),
                   "test": str(inputs["test"]), "train_limit": args.train_limit}
    results = run_compare(config, CompareData(spec, train, dev, test, description, rows), args.out,
                          base=loaded[0] if loaded else None)
    resume = results["resume"]
    if resume["skipped"]:
        print(f"skipped {len(resume['skipped'])} finished run(s): {', '.join(resume['skipped'])}", file=sys.stderr)
    print(f"wrote {args.out}/report.md, results.json and plots; "
          f"recommendation: {results['recommendation']['winner']}", file=sys.stderr)
    return 0
