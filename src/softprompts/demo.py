"""``softprompts demo``: prompt tuning and prefix tuning on the bundled UCI sentiment data with the embedded SmolLM2.

Trains both methods with their measured defaults (``methods.build_method``), evaluates them and the bare model on the
test
split by rank classification, and prints: method, trainable parameters, adapter file size, test accuracy, training
time and greedy generation latency (ms per generated token), then a few generations. Sized to finish within
10 minutes on 2 CPU cores (``steps`` and ``dev_limit`` are the knobs).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from softprompts.adapter_io import WEIGHTS_FILE
from softprompts.data.datasets import bundled_path, label_targets
from softprompts.data.sources import load_task_data
from softprompts.data.templates import Template
from softprompts.evaluate import evaluate, generate_texts
from softprompts.methods import build_method, method_class
from softprompts.model.decode_loop import generate_ids
from softprompts.model.load import load_base
from softprompts.tasks import TaskSpec
from softprompts.training import TrainConfig, train

TEMPLATE = ("Review: {text}\nSentiment:", " {label}")
LABELS = ["negative", "positive"]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def latency_ms_per_token(base, artifact, prompts: list[list[int]], new_tokens: int = 16) -> float:
    """Greedy decoding wall time per generated token (batch of ``prompts``, no early stop)."""
    artifact = base.serving_artifact(artifact)
    started = time.perf_counter()
    out = generate_ids(base, prompts, artifact, max_new_tokens=new_tokens, stop_ids=set())
    return 1000 * (time.perf_counter() - started) / max(1, sum(len(o) for o in out))


def run_demo(model: str = "smollm2-135m", methods=("prompt", "prefix"), steps: int = 60, batch_size: int = 8,
             dev_limit: int = 100, test_limit: int | None = None, out_dir: str | Path | None = None,
             seed: int = 0) -> list[dict]:
    """Train, evaluate and time each method; returns one row per method (plus the bare model first)."""
    started = time.perf_counter()
    base = load_base(model, device="auto")
    _log(f"loaded {model} in {time.perf_counter() - started:.1f}s")
    template = Template(*TEMPLATE)
    data = {s: load_task_data(bundled_path("uci_sentiment", s), template, "classify", LABELS)[0]
            for s in ("train", "dev", "test")}
    test = data["test"][:test_limit]
    # prompts keep their last 256 tokens, or fewer where the model's context would not hold them with the largest
    # method's virtual tokens and the longest label (a small test model)
    virtual = max(method_class(name).config_class().num_virtual_tokens for name in methods)
    answer = max(len(base.tokenize(t)) for t in label_targets(template, LABELS))
    spec = TaskSpec("classify", template.prompt, template.target, LABELS,
                    max_prompt_tokens=min(256, base.context_limit - virtual - answer))
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="softprompts-demo-"))
    probe = [base.tokenize(ex.prompt) for ex in test[:4]]

    bare = evaluate(base, None, test, spec)
    rows = [{"method": "none (bare model)", "params": 0, "bytes": 0, "accuracy": bare["accuracy"], "train_s": 0.0,
             "ms_per_token": latency_ms_per_token(base, None, probe), "adapter": None}]
    _log(f"bare model test accuracy {bare['accuracy']:.3f}")
    bare_dev = evaluate(base, None, data["dev"][:dev_limit], spec)  # shared by every method's training record
    for name in methods:
        method = build_method(base, name, spec, seed=seed)
        lr = method_class(name).default_lr
        config = TrainConfig(steps=steps, lr=lr, batch_size=batch_size, eval_every=max(1, steps // 2),
                             eval_limit=dev_limit, checkpoint_every=0, seed=seed)
        _log(f"training {name} (lr {lr}, {method.config.num_virtual_tokens} virtual tokens, {steps} steps of "
             f"{batch_size})")
        result = train(base, method, data["train"], spec, config, dev_examples=data["dev"],
                       out_dir=out_dir / name, overwrite=True, base_dev=bare_dev)
        metrics = evaluate(base, result.adapter, test, spec)
        rows.append({
            "method": name, "params": method.num_trainable(), "bytes": (out_dir / name / WEIGHTS_FILE).stat().st_size,
            "accuracy": metrics["accuracy"], "train_s": result.record["timings"]["train_seconds"],
            "ms_per_token": latency_ms_per_token(base, result.adapter, probe), "adapter": result.adapter,
        })
        _log(f"{name}: test accuracy {metrics['accuracy']:.3f}")
    print(format_table(rows, len(test)))
    print(f"\nadapters saved under {out_dir}\n\nA few generations (greedy, 4 tokens):")
    for ex in test[:3]:
        print(f"  {ex.prompt!r} (gold: {ex.label})")
        for row in rows:
            text = generate_texts(base, row["adapter"], [ex.prompt], spec, max_new_tokens=4)[0]
            print(f"    {row['method']:<18} -> {text!r}")
    print(f"\ndemo finished in {time.perf_counter() - started:.0f}s")
    return rows


def format_table(rows: list[dict], n_test: int) -> str:
    header = (f"{'method':<18} {'trainable params':>16} {'adapter file':>13} {'test acc':>9} {'train time':>11} "
              f"{'ms/token':>9}")
    lines = [f"\nUCI sentiment test split ({n_test} sentences), rank classification", header, "-" * len(header)]
    for r in rows:
        size = f"{r['bytes'] / 1024:.1f} KiB" if r["bytes"] else "-"
        lines.append(f"{r['method']:<18} {r['params']:>16,} {size:>13} {r['accuracy']:>9.3f} {r['train_s']:>10.0f}s "
                     f"{r['ms_per_token']:>9.1f}")
    return "\n".join(lines)
