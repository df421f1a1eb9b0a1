"""A comparison from files, below the command line: ``softprompts compare`` is its flags plus one call
(``compare_files``), and ``sp.compare_files`` is the same call.

The task and its splits come from the request, each part not given filled in from a catalog ``dataset``'s presets
(its task, template and target when neither is given, labels, and the prepared train / dev / test files when a
split is not given); the task defaults to classify. Rows holding ``messages`` need the model's chat template: the
model then loads while the rows are read (after the options are checked, ``compare.preflight``), and the
comparison reuses it. With the few-shot baseline a chat task also keeps each split's raw rows (its demonstrations
are turns).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from softprompts.compare import CompareConfig, CompareData, run_compare
from softprompts.compare.preflight import option_problems, refuse
from softprompts.data.catalog import get_dataset
from softprompts.data.prepare import prepared_paths
from softprompts.data.sources import read_rows
from softprompts.errors import SoftpromptsError
from softprompts.files import check_output
from softprompts.model.load import load_base
from softprompts.workflow.inputs import TaskFlags, load_task

SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class CompareFiles:
    """Every method of ``config`` on one task (``task`` flags, the ``data`` / ``eval_data`` / ``test_data`` files, or
    a catalog ``dataset`` for what is not given), the first ``train_limit`` training rows; written under ``out``
    (``report.md``, ``results.json``, plots; a rerun skips finished runs)."""

    out: str | Path
    config: CompareConfig
    task: TaskFlags = TaskFlags()
    data: str | None = None
    eval_data: str | None = None
    test_data: str | None = None
    dataset: str | None = None
    train_limit: int | None = None

    def inputs(self) -> tuple[TaskFlags, dict]:
        """``(task flags, {split: path or None})`` with the dataset's presets in the parts not given."""
        flags, paths = self.task, {"train": self.data, "dev": self.eval_data, "test": self.test_data}
        if self.dataset:
            presets = get_dataset(self.dataset).presets()
            if flags.template is None and flags.target is None:
                flags = replace(flags, template=presets["prompt"], target=presets["target"])
            flags = replace(flags, task=flags.task or presets["task"], labels=flags.labels or presets["labels"])
            if not all(paths.values()):
                prepared = prepared_paths(self.dataset, progress=self.config.progress)
                paths = {split: paths[split] or prepared.get(split) for split in SPLITS}
        if not paths["train"]:
            raise SoftpromptsError("--data required (or --dataset NAME for catalog presets)")
        return replace(flags, task=flags.task or "classify"), paths


def compare_files(request: CompareFiles) -> dict:
    """``results.json``'s content for ``request`` (module docstring): ``run_compare`` on the task and splits it
    names; ``results["resume"]["skipped"]``: the finished runs a rerun skipped."""
    check_output(request.out, overwrite=True)  # an existing compare is resumed; a path under a file fails now
    flags, paths = request.inputs()
    config, loaded = request.config, []

    def tokenizer():  # chat rows need the model's chat template: the model loads now and the compare reuses it
        refuse(option_problems(config))  # the options first, then (run_compare) every problem of the rows at once
        loaded.append(load_base(config.model, device="auto", quantize=config.quantize, dtype=config.dtype))
        return loaded[0].tokenizer

    spec, train, (dev, test) = load_task(flags, paths["train"], [paths["dev"], paths["test"]], tokenizer,
                                         optional_devs=True)
    limit = request.train_limit
    rows = None
    if "fewshot" in (config.baseline or "").split(",") and spec.chat is not None:  # demonstrations as turns
        rows = {split: read_rows(paths[split]) if paths[split] else [] for split in SPLITS}
        rows["train"] = rows["train"][:limit] if limit else rows["train"]
    description = {"dataset": request.dataset, "train": str(paths["train"]), "dev": str(paths["dev"]),
                   "test": str(paths["test"]), "train_limit": limit}
    data = CompareData(spec, train[:limit] if limit else train, dev, test, description, rows)
    return run_compare(config, data, request.out, base=loaded[0] if loaded else None)


__all__ = ["CompareFiles", "compare_files"]
