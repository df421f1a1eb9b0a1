"""``softprompts demo``: train prompt tuning and prefix tuning on bundled sentiment data and compare them."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("demo", help="train and compare two methods on bundled data (a few minutes on CPU)",
                       description=__doc__)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", default="prompt,prefix", help="comma-separated methods")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per method")
    p.add_argument("--dev-limit", type=int, default=100, help="dev examples for best-adapter keeping")
    p.add_argument("--test-limit", type=int, default=None, help="evaluate on the first N test examples")
    p.add_argument("--out", default=None, help="where to keep the adapters (default: a temporary directory)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args) -> int:
    from softprompts.demo import run_demo
    from softprompts.errors import SoftpromptsError

    if args.steps < 1:
        raise SoftpromptsError(f"--steps must be a positive integer, got {args.steps}")
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    run_demo(args.model, methods, steps=args.steps, dev_limit=args.dev_limit, test_limit=args.test_limit,
             out_dir=args.out, seed=args.seed)
    return 0
