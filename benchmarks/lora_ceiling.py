"""PEFT LoRA beside prompt tuning on the docs/RESULTS.md tasks, with the same budgets (``compare --baseline peft``).

    python benchmarks/lora_ceiling.py --task mr --out /tmp/cmp/mr-lora
    python benchmarks/lora_ceiling.py --task mr --lora-lr 3e-4 --reuse /tmp/cmp/mr-lora --out /tmp/cmp/mr-lora-3e-4

Runs ``softprompts compare --dataset NAME --methods prompt --baseline peft`` with the flags of the task's section in
docs/RESULTS.md (so the prompt-tuning runs reproduce its numbers, and LoRA is trained on the same data, budget and
batches). ``--lora-lr`` overrides LoRA's learning rate (``compare.peft_baseline.LORA_LR``) for a sweep;
``--reuse DIR`` copies DIR's finished runs other than LoRA's first, so a sweep trains only LoRA again. Prints the
report's LoRA lines; the full report is ``OUT/report.md``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import softprompts.compare.runner as runner  # noqa: E402
from softprompts.cli import main as cli  # noqa: E402

TASKS = {  # docs/RESULTS.md sections 1, 2 and 3
    "mr": ["--dataset", "mr", "--steps", "60", "--eval-every", "30", "--train-limit", "480", "--eval-limit", "100",
           "--test-limit", "300", "--batch-size", "8"],
    "tatoeba": ["--dataset", "tatoeba-en-es", "--steps", "40", "--eval-every", "20", "--train-limit", "400",
                "--eval-limit", "40", "--test-limit", "100", "--batch-size", "8", "--max-target-tokens", "24"],
    "bbc": ["--dataset", "bbc-headlines", "--steps", "20", "--eval-every", "10", "--train-limit", "160",
            "--eval-limit", "20", "--test-limit", "40", "--batch-size", "4", "--max-prompt-tokens", "128",
            "--max-target-tokens", "24"],
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=sorted(TASKS), required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--lora-lr", type=float, default=None, help="LoRA's learning rate (default: LORA_LR)")
    p.add_argument("--reuse", default=None, help="a finished run of the same task to take the other runs from")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.lora_lr is not None:
        runner.LORA_LR = args.lora_lr
    if args.reuse:
        out.mkdir(parents=True, exist_ok=True)
        for item in Path(args.reuse).iterdir():
            if item.name in ("compare.json", "runs"):
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, out / item.name, **(
                    {"dirs_exist_ok": True} if item.is_dir() else {}))
        shutil.rmtree(out / "runs" / "peft-lora-seed0", ignore_errors=True)
    rc = cli(["compare", *TASKS[args.task], "--methods", "prompt", "--baseline", "peft", "--no-progress",
              "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    print(f"LoRA lr {runner.LORA_LR:g}:")
    print("\n".join(results.get("lora_ceiling", [])))
    lora = results["methods"].get("peft:lora", {})
    print(json.dumps({"task": args.task, "lora_lr": runner.LORA_LR, "lora_best_dev": lora.get("best_dev"),
                      "lora_test": lora.get("test")}))
    return rc


if __name__ == "__main__":
    sys.exit(main())
