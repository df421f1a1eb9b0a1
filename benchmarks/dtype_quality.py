"""What bfloat16 weights cost in quality against float32: greedy tokens and test accuracy, side by side, one run.

    OMP_NUM_THREADS=1 python benchmarks/dtype_quality.py                 # embedded SmolLM2-135M, uci-sentiment
    OMP_NUM_THREADS=1 python benchmarks/dtype_quality.py --prompts 50 --rows 300 --steps 60

The base loads twice (float32, bfloat16; ``--dtype auto`` picks bfloat16 on a CPU with AVX512-BF16 / AMX, see
``model/load.auto_dtype``). On the uci-sentiment test split, rendered through the demo's template:

* **greedy**: the first ``--prompts`` prompts decoded greedily for ``--new-tokens`` tokens (no early stop) at each
  dtype; the fraction whose tokens are identical, and for the others the position of the first different token;
* **bare accuracy**: rank classification of the first ``--rows`` rows by the bare model at each dtype, with the
  binomial standard error and the number of rows whose predicted label differs;
* **prompt adapter**: a prompt-tuning adapter trained ``--steps`` steps on the float32 base (the demo's recipe),
  saved, loaded onto each base and evaluated the same way (``--steps 0`` skips it).

Prints a Markdown table and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from serve_throughput import _commit, write_result  # noqa: E402

import softprompts as sp  # noqa: E402
from softprompts.data.datasets import bundled_path  # noqa: E402
from softprompts.data.sources import load_task_data  # noqa: E402
from softprompts.data.templates import Template  # noqa: E402
from softprompts.demo import LABELS, TEMPLATE  # noqa: E402
from softprompts.evaluate import classify  # noqa: E402
from softprompts.methods import build_method, method_class  # noqa: E402
from softprompts.model.decode_loop import generate_ids  # noqa: E402

DTYPES = ("float32", "bfloat16")


def greedy(bases: dict, prompts: list[list[int]], new_tokens: int) -> dict:
    """Greedy tokens at each dtype: ``{"identical": fraction, "first_diff": [positions of differing prompts]}``."""
    out = {name: generate_ids(base, prompts, None, max_new_tokens=new_tokens, stop_ids=set())
           for name, base in bases.items()}
    a, b = (out[name] for name in DTYPES)
    first = [next(i for i, (x, y) in enumerate(zip(r, s, strict=False)) if x != y) if r != s else None
             for r, s in zip(a, b, strict=True)]
    diffs = sorted(f for f in first if f is not None)
    return {"prompts": len(prompts), "new_tokens": new_tokens, "identical": sum(f is None for f in first) / len(first),
            "first_diff": diffs}


def accuracy(bases: dict, adapters: dict, examples, spec) -> dict:
    """Accuracy (and standard error) at each dtype, and how many rows' predictions differ between them."""
    gold = [ex.label for ex in examples]
    preds = {name: classify(base, adapters.get(name), examples, spec) for name, base in bases.items()}
    row = {"n": len(examples), "differ": sum(p != q for p, q in zip(*(preds[n] for n in DTYPES), strict=True))}
    for name, p in preds.items():
        acc = sum(x == g for x, g in zip(p, gold, strict=True)) / len(gold)
        row[name] = {"accuracy": round(acc, 4), "se": round(math.sqrt(acc * (1 - acc) / len(gold)), 4)}
    return row


def train_prompt(base, data: dict, spec, steps: int, out: Path) -> Path:
    """The demo's prompt-tuning recipe, ``steps`` steps on ``base``; the saved adapter's directory."""
    method = build_method(base, "prompt", spec, seed=0)
    config = sp.TrainConfig(steps=steps, lr=method_class("prompt").default_lr, batch_size=8, eval_every=steps,
                            eval_limit=50, checkpoint_every=0, seed=0)
    sp.train(base, method, data["train"], spec, config, dev_examples=data["dev"], out_dir=out, overwrite=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompts", type=int, default=50)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rows", type=int, default=300)
    p.add_argument("--steps", type=int, default=60, help="prompt adapter training steps (0: skip)")
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    bases = {name: sp.load_base(args.model, dtype=name) for name in DTYPES}
    template = Template(*TEMPLATE)
    data = {s: load_task_data(bundled_path("uci_sentiment", s), template, "classify", LABELS)[0]
            for s in ("train", "dev", "test")}
    spec = sp.TaskSpec("classify", template.prompt, template.target, LABELS, max_prompt_tokens=256)
    test = data["test"][:args.rows]
    ref = bases["float32"]
    prompts = [ref.tokenize(ex.prompt) for ex in data["test"][:args.prompts]]
    result = {"model": args.model, "threads": torch.get_num_threads(), "commit": _commit(), "torch": torch.__version__,
              "greedy": greedy(bases, prompts, args.new_tokens), "bare": accuracy(bases, {}, test, spec)}
    print(json.dumps(result), flush=True)
    if args.steps:
        path = train_prompt(ref, data, spec, args.steps, Path(tempfile.mkdtemp(prefix="dtype-quality-")) / "prompt")
        adapters = {name: sp.load_adapter(path, base) for name, base in bases.items()}
        result["prompt_adapter"] = {"steps": args.steps, **accuracy(bases, adapters, test, spec)}
    print(table(result))
    print(json.dumps(result))
    write_result(result, args.json)
    return 0


def table(result: dict) -> str:
    g = result["greedy"]
    lines = [f"greedy: {g['identical']:.0%} of {g['prompts']} prompts identical over {g['new_tokens']} tokens; "
             f"first differing token at {g['first_diff']}", "",
             "| adapter | rows | float32 acc | bfloat16 acc | rows predicted differently |", "|---|---|---|---|---|"]
    for key in ("bare", "prompt_adapter"):
        if key in result:
            r = result[key]
            lines.append(f"| {key} | {r['n']} | {r['float32']['accuracy']:.3f} ± {r['float32']['se']:.3f} | "
                         f"{r['bfloat16']['accuracy']:.3f} ± {r['bfloat16']['se']:.3f} | {r['differ']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
