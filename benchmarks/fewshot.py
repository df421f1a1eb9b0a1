"""Do I need to train at all? The few-shot baseline next to prompt tuning on the bundled task and the catalog's tasks.

Each task is one ``softprompts compare --methods prompt --baseline fewshot`` run with the flags of docs/RESULTS.md
(the same train / dev / test slices and budgets as the methods' numbers there; one seed), run one after another (two
torch processes on two cores thrash). k is chosen on dev among 0, 1, 2, 4, 8 (those that fit the context). Then one
table: the bare model, prompt tuning, k-shot (demonstrations from the training slice only), the demonstrations'
tokens per request, and the first-token latency of the bare model, of the demonstrations in the prompt and cached as
a KV prefix (ours, batch 1, timed beside each other in the same run).

    OMP_NUM_THREADS=1 python benchmarks/fewshot.py --out runs/fewshot                      # every task below
    OMP_NUM_THREADS=1 python benchmarks/fewshot.py --out runs/fewshot --tasks mr,uci-chat  # some of them

A finished task is skipped (compare resumes), so the table can be printed again at no cost.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from chat_placement import SYSTEM, chat_splits

from softprompts.data.datasets import bundled_path

BUDGET = ["--methods", "prompt", "--baseline", "fewshot", "--batch-size", "8", "--no-progress"]
TASKS = {  # docs/RESULTS.md: section 4 (uci), 1 (mr), 2 (tatoeba), 3 (bbc)
    "uci-raw": ["--template", "Review: {text}\\nSentiment:", "--target", " {label}", "--labels", "negative,positive",
                "--steps", "60", "--eval-every", "30", "--train-limit", "480", "--eval-limit", "100",
                "--test-limit", "300"],
    "uci-chat": ["--placement", "start", "--system", SYSTEM, "--labels", "negative,positive", "--steps", "60",
                 "--eval-every", "30", "--train-limit", "480", "--eval-limit", "100", "--test-limit", "300"],
    "mr": ["--dataset", "mr", "--steps", "60", "--eval-every", "30", "--train-limit", "480", "--eval-limit", "100",
           "--test-limit", "300"],
    "tatoeba": ["--dataset", "tatoeba-en-es", "--steps", "40", "--eval-every", "20", "--train-limit", "400",
                "--eval-limit", "40", "--test-limit", "100", "--max-target-tokens", "24"],
    "bbc": ["--dataset", "bbc-headlines", "--steps", "20", "--eval-every", "10", "--train-limit", "160",
            "--eval-limit", "20", "--test-limit", "40", "--max-prompt-tokens", "128", "--max-target-tokens", "24"],
}


def data_flags(task: str, out: Path) -> list[str]:
    """The bundled UCI splits as files (raw rows, or chat rows as in benchmarks/chat_placement.py)."""
    if not task.startswith("uci"):
        return []
    splits = chat_splits(out / "chat-data") if task == "uci-chat" else {
        s: bundled_path("uci_sentiment", s) for s in ("train", "dev", "test")}
    return ["--data", str(splits["train"]), "--eval-data", str(splits["dev"]), "--test-data", str(splits["test"])]


def row(task: str, results: dict) -> str:
    """One table row from a compare's results.json."""
    primary, scale = results["primary_metric"], 100.0 if results["primary_metric"] == "accuracy" else 1.0
    base, methods = results["base_model"], results["methods"]
    few, prompt = methods["fewshot"], methods["prompt"]
    f = few["fewshot"]

    def q(entry: dict) -> str:
        stat = entry["test"].get(primary)
        return f"{stat['mean'] * scale:.1f}" if stat else "n/a"

    def ms(stat: dict | None) -> str:
        return f"{stat['mean']:.0f}" if stat else "n/a"

    dev = "; ".join(f"{k}: {v * scale:.1f}" for k, v in f["dev_by_shots"][0].items() if v is not None)
    return (f"| {task}, {results['sizes']['test']}, {primary} | {base['test'][primary] * scale:.1f} | {q(prompt)} | "
            f"{f['shots_text']} ({dev}) | **{q(few)}** | {ms(f['demo_tokens'])} | {ms(f['prompt_tokens'])} "
            f"({ms(f['bare_prompt_tokens'])}) | {base['latency']['ttft_ms']:.0f} / {ms(few['ttft_ms'])} / "
            f"{ms(f['cached_ttft_ms'])} | {f['check_max_abs_logprob_diff']:.0e} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tasks", default=",".join(TASKS))
    args = parser.parse_args(argv)
    out = Path(args.out)
    lines = ["| task, test n, metric | no adapter | prompt | k (dev per k) | k-shot | demo tokens | prompt tokens "
             "(bare) | TTFT ms bare / in prompt / cached | check |", "|---|---|---|---|---|---|---|---|---|"]
    for task in args.tasks.split(","):
        run_dir = out / task
        command = [sys.executable, "-m", "softprompts", "compare", *data_flags(task, out), *TASKS[task], *BUDGET,
                   "--out", str(run_dir)]
        print(f"== {task}: softprompts {' '.join(command[3:])}", file=sys.stderr, flush=True)
        subprocess.run(command, check=True)
        lines.append(row(task, json.loads((run_dir / "results.json").read_text())))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
