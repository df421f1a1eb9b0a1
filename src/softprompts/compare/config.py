"""What a compare shares across its runs (``CompareConfig``, ``CompareData``), where it was measured
(``machine_info``), and the names of the JSON files a resumable compare is made of (written with
``files.atomic_json``).

Dev rows when none are given (``carve_dev``): a compare needs them twice, to keep each run's best step (the adapter
is never worse than the bare model at step 0) and to choose the few-shot baseline's k. So with no dev rows and at
least ``CARVE_MIN_TRAIN`` training rows, ``n = min(CARVE_MAX, max(1, round(CARVE_FRACTION * N)))`` of the ``N``
training rows are moved to dev: a seeded shuffle (``CARVE_SEED``) picks them, the rest keep their order, so a resumed
compare carves the same rows. Every run (ours, PEFT's, few-shot) then trains on the same ``N - n`` rows; demonstrations
never come from the carved rows. Fewer training rows: nothing is carved (runs keep their last step, and few-shot
needs ``--shots K``)."""

from __future__ import annotations

import os
import platform
import random
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import transformers

from softprompts.training.trackers import report_problems

RESULT_FILE = "result.json"
SETTINGS_FILE = "compare.json"
BASELINES = ("peft", "lora", "fewshot")  # what --baseline may name, comma-separated
SHOT_CANDIDATES = (0, 1, 2, 4, 8)  # the k few-shot chooses among on dev (those that fit the context and the data)
CARVE_FRACTION, CARVE_MAX, CARVE_MIN_TRAIN, CARVE_SEED = 0.1, 200, 10, "compare-dev"  # carve_dev (module docstring)


@dataclass
class CompareConfig:
    """What every run shares. ``steps`` or ``minutes`` (per run; converted to steps per method by timing 2 steps).

    lr / virtual_tokens: None = each method's measured default (its class's ``default_lr``, its config's
    ``num_virtual_tokens``), used for PEFT too.
    eval_limit / test_limit: first N dev / test examples. latency_*: decode length and repeats of the timing.
    baseline: comma-separated ``peft`` (each method through HF PEFT, + LoRA) and / or ``fewshot`` (k demonstrations
    from the training data in the prompt, no training: ``compare/fewshot.py``); shots: fixes that k (None: chosen
    on dev among ``SHOT_CANDIDATES``).
    tune: N trials of search on dev per method, and for LoRA, before the compared runs, which then use the best
    configuration (``compare/tuning.py``); None: the defaults (or ``lr`` / ``virtual_tokens``).
    report_to: trackers that watch our runs (``training/trackers.py``), one tracker run per method and seed, grouped
    under this compare (``OUT/tensorboard/<run>/``, ``OUT/mlflow.db`` experiment ``compare-<OUT>``).
    """

    model: str
    methods: list[str]
    quantize: str | None = None  # the frozen base loaded quantized (model/quantize.py); the PEFT runs share it
    dtype: str | None = None  # the frozen base's dtype (model/load.resolve_dtype; None: float32); PEFT shares it
    seeds: int = 1
    baseline: str | None = None
    lora: bool = True  # with baseline "peft": also PEFT LoRA, the weight-adapter ceiling
    shots: int | None = None  # with baseline "fewshot": k demonstrations (None: chosen on dev)
    tune: int | None = None  # trials per method (and LoRA) searched on dev before the compared runs
    explain: int | None = None  # rows each method's adapter is explained on (softprompts explain); None: not
    steps: int | None = 100
    minutes: float | None = None
    batch_size: int = 8
    lr: float | None = None
    virtual_tokens: int | None = None
    eval_every: int = 25
    eval_limit: int | None = None
    test_limit: int | None = None
    latency_tokens: int = 8
    latency_repeats: int = 3
    progress: bool = True
    report_to: str = "none"

    def errors(self) -> list[str]:
        problems = []
        if (self.steps is None) == (self.minutes is None):
            problems.append("give exactly one budget: --steps N or --minutes M")
        if self.steps is not None and self.steps < 1:
            problems.append(f"--steps must be positive, got {self.steps}")
        if self.minutes is not None and self.minutes <= 0:
            problems.append(f"--minutes must be positive, got {self.minutes}")
        if self.seeds < 1:
            problems.append(f"--seeds must be at least 1, got {self.seeds}")
        if not self.methods:
            problems.append("--methods is empty")
        unknown = [b for b in self.baselines if b not in BASELINES]
        if unknown:
            problems.append(f"--baseline takes {' and/or '.join(BASELINES)} (comma-separated), got {self.baseline!r}")
        if self.shots is not None and self.shots < 0:
            problems.append(f"--shots must be 0 or more, got {self.shots}")
        if self.shots is not None and "fewshot" not in self.baselines:
            problems.append("--shots sets the few-shot baseline's k: add --baseline fewshot")
        if self.tune is not None and (isinstance(self.tune, bool) or not isinstance(self.tune, int) or self.tune < 1):
            problems.append(f"--tune takes the number of trials each method (and LoRA) is tuned with, a positive "
                            f"integer; got {self.tune!r}")
        if self.tune is not None and self.lr is not None:
            problems.append("--lr fixes the learning rate that --tune searches: give one of them")
        if self.explain is not None and (isinstance(self.explain, bool) or not isinstance(self.explain, int)
                                         or self.explain < 1):
            problems.append(f"--explain takes the number of rows each method is explained on, a positive integer; "
                            f"got {self.explain!r}")
        if self.latency_tokens < 1 or self.latency_repeats < 1:
            problems.append(f"--latency-tokens and latency_repeats must be at least 1, got {self.latency_tokens} and "
                            f"{self.latency_repeats}")
        for flag, limit in (("--eval-limit", self.eval_limit), ("--test-limit", self.test_limit)):
            if limit is not None and limit < 1:
                problems.append(f"{flag} must be at least 1 (or left out for every row), got {limit}")
        return problems + report_problems(self.report_to)

    @property
    def baselines(self) -> tuple[str, ...]:
        """The baselines asked for: ``"peft,fewshot"`` -> ``("peft", "fewshot")``."""
        return tuple(b.strip() for b in (self.baseline or "").split(",") if b.strip())

    @property
    def runs_lora(self) -> bool:
        """Whether PEFT LoRA (the weight-adapter ceiling) runs: ``--baseline lora``, or ``peft`` unless
        ``--no-lora``."""
        return "lora" in self.baselines or ("peft" in self.baselines and self.lora)

    @property
    def uses_peft(self) -> bool:
        """Whether any run goes through PEFT (each method's counterpart, or LoRA)."""
        return "peft" in self.baselines or self.runs_lora


@dataclass
class CompareData:
    """The task and its three splits (test may be empty: the report then uses dev numbers). ``rows``: the raw rows
    of each split, row i of a split being example i (chat few-shot renders demonstrations as turns from them)."""

    spec: object  # TaskSpec
    train: list
    dev: list
    test: list
    description: dict = field(default_factory=dict)  # dataset name / paths, for the report
    rows: dict | None = None  # chat tasks with --baseline fewshot: {"train"|"dev"|"test": the rows, as the examples}


def carve_dev(data: CompareData) -> CompareData:
    """``data`` with dev rows carved from its training rows when it has none (module docstring); else ``data``.
    ``description["dev"]`` says so (the report and a resumed compare read it)."""
    if data.dev or len(data.train) < CARVE_MIN_TRAIN:
        return data
    n = min(CARVE_MAX, max(1, round(CARVE_FRACTION * len(data.train))))
    order = list(range(len(data.train)))
    random.Random(CARVE_SEED).shuffle(order)
    dev, carved = order[:n], set(order[:n])
    train = [i for i in range(len(data.train)) if i not in carved]
    rows = data.rows
    if rows is not None and rows.get("train"):
        rows = {**rows, "train": [rows["train"][i] for i in train], "dev": [rows["train"][i] for i in dev]}
    description = {**data.description, "dev": f"{n} rows carved from the training rows (seeded)"}
    return replace(data, train=[data.train[i] for i in train], dev=[data.train[i] for i in dev],
                   description=description, rows=rows)


def machine_info(device: torch.device) -> dict:
    """Where the numbers were measured: CPU/GPU, core count, library versions, git commit."""
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import peft

        info["peft"] = peft.__version__
    except ModuleNotFoundError:
        info["peft"] = None
    try:
        here = Path(__file__).resolve().parent
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                                        text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info


__all__ = ["BASELINES", "CARVE_FRACTION", "CARVE_MAX", "CARVE_MIN_TRAIN", "CARVE_SEED", "RESULT_FILE",
           "SETTINGS_FILE", "SHOT_CANDIDATES", "CompareConfig", "CompareData", "carve_dev", "machine_info"]
