"""A quantized frozen base against the full-precision one, side by side in one run: weight memory, peak process
memory, training step time and test accuracy, and what an adapter costs when it crosses precisions.

Every figure comes from the real commands, each in its own process (``os.wait4`` gives that process's peak resident
set): ``softprompts train --quantize Q`` (prompt tuning with its defaults), ``softprompts eval --quantize Q`` of the
bare model and of the adapter, then every adapter on every other precision. Weight memory is the model's tensors as
stored (a quantized weight's packed values and scales), measured in-process by ``--weights``.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/quantized.py [--dataset uci-sentiment|mr] [--steps 100]
        [--test-limit 300] [--out DIR]

``--dataset`` names a classification set of the catalog (``softprompts data list``), run with its prompt and target
templates; ``mr``, ``bbc-topics`` (5 classes) are prepared (fetched from their pinned archive) on first use. The
table also gives each run's training loss at its first step and over its last five.

Prints a markdown table (docs/RESULTS.md, docs/BENCHMARKS.md "Quantized base") and writes ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PRECISIONS = ["fp32", "nf4", "int8"]


def template_flags(dataset: str) -> list[str]:
    """The catalog entry's prompt and target as command-line flags (a newline written as the CLI's ``\\n``)."""
    from softprompts.data.catalog import get_dataset

    entry = get_dataset(dataset)
    return ["--template", entry.prompt.replace("\n", "\\n"), "--target", entry.target]


def tensor_bytes(tensor) -> int:
    """Bytes a weight holds as stored: a torchao tensor's inner tensors, a bitsandbytes 4-bit weight's packed values
    and its quantization state (absmax, nested absmax, codebooks), else the plain tensor."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, n)) for n in names)
    total = tensor.numel() * tensor.element_size()
    state = getattr(tensor, "quant_state", None)
    if state is not None:
        total += state.absmax.numel() * state.absmax.element_size() + state.code.numel() * state.code.element_size()
        if getattr(state, "nested", False):
            total += sum(t.numel() * t.element_size() for t in (state.state2.absmax, state.state2.code))
    return total


def weights(precision: str) -> None:
    """Print the loaded model's weight bytes (in this process)."""
    import softprompts as sp

    base = sp.load_base(quantize=None if precision == "fp32" else precision)
    seen, total = set(), 0
    for tensor in [*base.model.parameters(), *base.model.buffers()]:
        if id(tensor) not in seen:  # tied embeddings and head count once
            seen.add(id(tensor))
            total += tensor_bytes(tensor)
    print(json.dumps({"weight_bytes": total}))


def cli(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("softprompts")), *args]


def quantize_flag(precision: str) -> list[str]:
    return [] if precision == "fp32" else ["--quantize", precision]


def accuracy(out: str) -> float:
    return json.loads(out.strip().splitlines()[-1])["accuracy"]


def peak_rss(command: list[str]) -> tuple[str, float]:
    """``(stdout, peak resident MiB)`` of one command in its own process (``os.wait4``: that child's own peak);
    a failure stops the benchmark."""
    with tempfile.TemporaryFile("w+") as out_file, tempfile.TemporaryFile("w+") as err_file:  # no pipe to fill
        child = subprocess.Popen(command, stdout=out_file, stderr=err_file, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        out_file.seek(0), err_file.seek(0)
        out, err = out_file.read(), err_file.read()
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"failed: {' '.join(command)}\n{err[-2000:]}")
    return out, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="uci-sentiment", help="a classification dataset of the catalog")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--test-limit", type=int, default=300, help="test rows scored (the first N)")
    parser.add_argument("--out", default=None, help="keep adapters and results here (default: a temporary dir)")
    parser.add_argument("--weights", default=None, help=argparse.SUPPRESS)  # internal: one precision's weight bytes
    args = parser.parse_args()
    if args.weights:
        return weights(args.weights)
    work = Path(args.out or tempfile.mkdtemp(prefix="quantized-"))
    work.mkdir(parents=True, exist_ok=True)
    from softprompts.data.prepare import prepared_paths

    splits = prepared_paths(args.dataset, progress=True)
    template = template_flags(args.dataset)
    test = work / "test.jsonl"
    test.write_text("".join(line + "\n" for line in splits["test"].read_text().split("\n")[: args.test_limit]
                            if line))
    rows = {}
    for precision in PRECISIONS:
        row = rows[precision] = {}
        out, row["load_peak_mib"] = peak_rss([sys.executable, __file__, "--weights", precision])
        row["weight_mib"] = json.loads(out.strip().splitlines()[-1])["weight_bytes"] / 2**20
        adapter = work / f"prompt-{precision}"
        shutil.rmtree(adapter, ignore_errors=True)
        _, row["train_peak_mib"] = peak_rss(cli(
            "train", *quantize_flag(precision), "--method", "prompt", "--data", str(splits["train"]),
            "--eval-data", str(splits["dev"]), "--eval-limit", "100", *template, "--steps", str(args.steps),
            "--out", str(adapter), "--no-progress"))
        record = json.loads((adapter / "training.json").read_text())
        row["step_s"] = record["timings"]["train_seconds"] / args.steps
        row["losses"] = [point["loss"] for point in record["curve"] if point["loss"] is not None]
        out, _ = peak_rss(cli("eval", *quantize_flag(precision), "--data", str(test), *template, "--json"))
        row["bare_accuracy"] = accuracy(out)
        print(f"{precision}: {row}", flush=True)
    for precision in PRECISIONS:  # every adapter on every precision (its own: the diagonal)
        rows[precision]["accuracy_on"] = {}
        for trained in PRECISIONS:
            out, _ = peak_rss(cli("eval", "--adapter", str(work / f"prompt-{trained}"), *quantize_flag(precision),
                                  "--data", str(test), "--json"))
            rows[precision]["accuracy_on"][trained] = accuracy(out)
    (work / "results.json").write_text(json.dumps(rows, indent=2))
    print(table(rows, args))


def table(rows: dict, args) -> str:
    full = rows["fp32"]
    lines = [f"steps {args.steps} (prompt tuning, defaults), test: first {args.test_limit} rows of {args.dataset}",
             "", "| base | weights MiB | x fp32 | load peak MiB | train peak MiB | step s | x fp32 | bare acc | "
             "adapter acc | fp32 adapter on it | its adapter on fp32 | loss first / last 5 steps |", "|" + "---|" * 12]
    for precision, row in rows.items():
        lines.append(
            f"| {precision} | {row['weight_mib']:.0f} | {row['weight_mib'] / full['weight_mib']:.2f} | "
            f"{row['load_peak_mib']:.0f} | {row['train_peak_mib']:.0f} | {row['step_s']:.2f} | "
            f"{row['step_s'] / full['step_s']:.2f} | {row['bare_accuracy']:.3f} | "
            f"{row['accuracy_on'][precision]:.3f} | {row['accuracy_on']['fp32']:.3f} | "
            f"{full['accuracy_on'][precision]:.3f} | {losses_summary(row['losses'])} |")
    return "\n".join(lines)


def losses_summary(losses: list[float]) -> str:
    """The first step's training loss and the mean of the last five: ``6.52 / 1.18``."""
    tail = losses[-5:]
    return f"{losses[0]:.2f} / {sum(tail) / len(tail):.2f}"


if __name__ == "__main__":
    main()
