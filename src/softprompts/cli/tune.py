"""``softprompts tune``: search a method's learning rate, virtual tokens and own knobs on the dev split within a
budget (Optuna: TPE, weak trials pruned at the dev evaluations), and keep the best adapter.

Writes OUT/best/ (the best trial's adapter), OUT/best.json, OUT/tune.md, OUT/trials.png, and OUT/study.db (the study:
kill it and rerun the same command to continue; `optuna-dashboard OUT/study.db` opens it). Needs
pip install 'softprompts[tune]'.
"""

from __future__ import annotations

import argparse
import sys

from softprompts.cli.arguments import add_dtype_flag, add_quantize_flag, add_report_flag, finite, say_dtype
from softprompts.cli.task_inputs import add_chat_flags, label_list


def register(sub) -> None:
    p = sub.add_parser("tune", help="search lr, virtual tokens and a method's knobs on dev (Optuna), keep the best",
                       description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="embedded name, HF id or directory (default: smollm2-135m)")
    p.add_argument("--method", default="prompt", help="the method to tune (see `softprompts train --help`)")
    p.add_argument("--task", default="classify", choices=("classify", "generate"))
    p.add_argument("--data", required=True, help="training data: .jsonl, .json, .csv or .tsv (or chat rows)")
    p.add_argument("--eval-data", default=None, help="dev data, the split the search chooses on (required)")
    p.add_argument("--template", default=None, help=r'prompt template, e.g. "Review: {text}\nSentiment:"')
    p.add_argument("--target", default=None, help='target template, e.g. " {label}"')
    add_chat_flags(p)
    p.add_argument("--labels", default=None, help="comma-separated label set (default: the labels found in --data)")
    p.add_argument("--trials", type=int, default=None, help="finished trials the study should hold (budget)")
    p.add_argument("--minutes", type=finite, default=None, help="trial time the study may spend (budget; a trial "
                   "under way finishes)")
    p.add_argument("--lr-range", type=_float_pair, default=None, metavar="LO,HI",
                   help="log-uniform learning-rate range (default: the method's default lr / 10 .. x 10)")
    p.add_argument("--virtual-tokens-choices", type=_int_list, default=None, metavar="P1,P2,...",
                   help="virtual-token counts to try (default: the method's P/2, P, 2P)")
    p.add_argument("--pruner", default="halving", choices=("halving", "hyperband", "none"),
                   help="stop weak trials at the dev evaluations: successive halving, Hyperband, or never")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps per trial")
    p.add_argument("--batch-size", type=int, default=8, help="examples per optimizer step")
    p.add_argument("--eval-every", type=int, default=25, help="dev evaluation (and pruning) every N steps")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N dev examples only")
    p.add_argument("--init", default=None, help="random, vocab, text or labels (default: per method)")
    p.add_argument("--max-prompt-tokens", type=int, default=256)
    p.add_argument("--max-target-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="every trial's seed (init, data order) and the sampler's")
    p.add_argument("--device", default="auto", help="torch device (default: the first CUDA GPU, else cpu)")
    p.add_argument("--out", required=True, help="output directory (rerun the same command to continue)")
    add_quantize_flag(p)
    add_dtype_flag(p)
    add_report_flag(p)
    p.set_defaults(func=run)


def _float_pair(text: str) -> tuple[float, float]:
    parts = [finite(x.strip()) for x in text.split(",")]
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"takes LO,HI (two numbers), got {text!r}")
    return parts[0], parts[1]


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes whole numbers, comma-separated, got {text!r}") from None


def run(args) -> int:
    from softprompts.methods import method_class
    from softprompts.training import TrainConfig
    from softprompts.training.tune import TuneConfig
    from softprompts.workflow import Hardware, TaskFlags, TuneFiles, tune_files, tune_summary

    say_dtype(args.dtype, args.device)
    train_config = TrainConfig(steps=args.steps, lr=method_class(args.method).default_lr, batch_size=args.batch_size,
                               eval_every=args.eval_every, eval_limit=args.eval_limit, seed=args.seed,
                               report_to=args.report_to)
    config = TuneConfig(trials=args.trials, minutes=args.minutes, lr_range=args.lr_range,
                        virtual_tokens=args.virtual_tokens_choices, pruner=args.pruner, seed=args.seed)
    flags = TaskFlags(args.task, args.template, args.target, label_list(args.labels), args.placement, args.system,
                      args.max_prompt_tokens, args.max_target_tokens)
    hardware = Hardware(args.device, quantize=args.quantize, dtype=args.dtype)
    result = tune_files(TuneFiles(args.out, args.data, args.eval_data, config, train_config, flags, args.method,
                                  args.init, args.model, hardware))
    print(tune_summary(result, args.out), file=sys.stderr)
    return 0
