"""Raw template vs chat, and the chat placements, on one real task with the embedded SmolLM2-135M-Instruct.

The bundled UCI sentiment splits in two forms:

* raw: ``"Review: {text}\\nSentiment:"`` -> ``" {label}"`` (the template every earlier result used);
* chat: ``messages = [user: "Review: {text}\\nSentiment (positive or negative)?", assistant: label]``, rendered by the
  model's own chat template with SmolLM2's default system message given explicitly (so all placements read the same
  conversation), the virtual tokens at ``start``, ``after-system`` or ``user-start``.

Each configuration is one ``softprompts compare`` run (prompt tuning with its defaults, the same budget, batches,
seeds, dev and test slices), run one after another (two torch processes on two cores thrash). Then a table: test
accuracy (mean ± std over seeds), the bare model in that form, best dev, and the serving latency compare measured
(time to first token / per token, ours, batch 1).

    python benchmarks/chat_placement.py --out runs/chat-placement            # 1 seed, ~20 min on 2 cores
    python benchmarks/chat_placement.py --out runs/chat-placement --seeds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from softprompts.data.datasets import bundled_path, load_records

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"  # SmolLM2's own default
CONFIGS = {
    "raw": ["--template", "Review: {text}\\nSentiment:", "--target", " {label}"],
    "chat-start": ["--placement", "start", "--system", SYSTEM],
    "chat-after-system": ["--placement", "after-system", "--system", SYSTEM],
    "chat-user-start": ["--placement", "user-start", "--system", SYSTEM],
}


def chat_splits(folder: Path) -> dict[str, Path]:
    """The bundled splits as chat rows."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split in ("train", "dev", "test"):
        path = folder / f"{split}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for row in load_records(bundled_path("uci_sentiment", split)):
                user = f"Review: {row['text']}\nSentiment (positive or negative)?"
                f.write(json.dumps({"messages": [{"role": "user", "content": user},
                                                 {"role": "assistant", "content": row["label"]}]}) + "\n")
        paths[split] = path
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--train-limit", type=int, default=480)
    parser.add_argument("--eval-limit", type=int, default=100)
    parser.add_argument("--test-limit", type=int, default=300)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    args = parser.parse_args(argv)
    out = Path(args.out)
    chat = chat_splits(out / "chat-data")
    raw = {s: bundled_path("uci_sentiment", s) for s in ("train", "dev", "test")}
    budget = ["--methods", "prompt", "--steps", str(args.steps), "--eval-every", str(args.steps // 2),
              "--batch-size", "8", "--train-limit", str(args.train_limit), "--eval-limit", str(args.eval_limit),
              "--test-limit", str(args.test_limit), "--seeds", str(args.seeds), "--labels", "negative,positive",
              "--no-progress"]
    rows = []
    for name in args.configs.split(","):
        splits = raw if name == "raw" else chat
        run_dir = out / name
        command = [sys.executable, "-m", "softprompts", "compare", "--data", str(splits["train"]),
                   "--eval-data", str(splits["dev"]), "--test-data", str(splits["test"]), *CONFIGS[name], *budget,
                   "--out", str(run_dir)]
        print(f"== {name}: {' '.join(command[3:])}", file=sys.stderr, flush=True)
        subprocess.run(command, check=True)
        results = json.loads((run_dir / "results.json").read_text())
        method = results["methods"]["prompt"]
        runs = [r for r in results["runs"] if r["impl"] == "softprompts"]
        rows.append({
            "config": name, "bare_test": results["base_model"]["test"]["accuracy"],
            "test": method["test"]["accuracy"], "best_dev": method["best_dev"],
            "curves": [[(p["step"], p.get("dev_accuracy")) for p in r["curve"] if "dev_accuracy" in p] for r in runs],
            "ttft_ms": statistics.median(r["latency"]["ttft_ms"] for r in runs),
            "per_token_ms": statistics.median(r["latency"]["per_token_ms"] for r in runs),
            "bare_ttft_ms": statistics.median(r["latency_bare"]["ttft_ms"] for r in runs),
            "commit": results["machine"].get("commit"), "load": results["machine"].get("load_average_1m"),
        })
    (out / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("| form / placement | bare model test | prompt tuning test (mean ± std) | best dev | dev curve (step: acc) "
          "| TTFT ms (bare) | ms/token |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        t, d = r["test"], r["best_dev"]
        curve = "; ".join(", ".join(f"{s}: {100 * a:.0f}" for s, a in c) for c in r["curves"])
        print(f"| {r['config']} | {100 * r['bare_test']:.1f} | {100 * t['mean']:.1f} ± {100 * t['std']:.1f} "
              f"(n={t['n']}) | {100 * d['mean']:.1f} | {curve} | {r['ttft_ms']:.1f} ({r['bare_ttft_ms']:.1f}) | "
              f"{r['per_token_ms']:.1f} |")


if __name__ == "__main__":
    main()
