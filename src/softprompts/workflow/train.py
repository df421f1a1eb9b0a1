"""Training from files, below the command line: ``softprompts train`` is its flags plus one call (``train_files``),
and ``sp.train_files`` is the same call, so a run from Python and from the shell are the same run.

A ``TrainFiles`` request names the data (``data`` + ``eval_data`` rows, or a ``corpus`` a cartridge stands in for),
the task (``TaskFlags``), how the method starts (``Start``: a method, its virtual tokens and initialization, or a
saved adapter to continue, whose base, task and artifact are then the defaults), the ``TrainConfig``, the output
directory and where the frozen base runs (``Hardware``). The rules a run follows before its first step live here,
once:

    data or corpus      exactly one; a cartridge (``--corpus``) starts from its corpus, never ``init_from``
    finished            ``resume`` of a directory holding ``training.json`` and no checkpoint: nothing to do
    output              refused when it exists, unless ``overwrite``, a checkpoint to resume, or trackers' logs only
    device              ``device_map`` (accelerate places the layers) > a named ``device`` > under ``torchrun`` the
                        rank's own GPU (``Distributed.device``) > ``auto``; the process group is joined first
    device_map          one process per node under ``torchrun`` (each process spreads the base over its GPUs)
    base                ``model``, else ``init_from``'s base, else the embedded default; loaded only after a
                        template's rows are checked (chat rows need its tokenizer first)
    labels              the given ones, else ``init_from``'s when the task is the same kind (``task_labels``)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from softprompts.adapter_io import load_adapter
from softprompts.codec import read_adapter_record
from softprompts.errors import SoftpromptsError
from softprompts.files import check_output
from softprompts.methods import build_method, method_class
from softprompts.methods.base import PromptMethod
from softprompts.model.frozen import FrozenBase
from softprompts.model.load import DEFAULT_MODEL
from softprompts.task_spec import TaskSpec
from softprompts.training.cartridge import train_cartridge
from softprompts.training.config import SelfStudyConfig, TrainConfig
from softprompts.training.distributed import Distributed, setup_distributed
from softprompts.training.loop import RECORD_FILE, TrainResult, train
from softprompts.training.preflight import checkpoint_path
from softprompts.training.trackers import only_logs
from softprompts.workflow.inputs import TaskFlags, lazy_base, load_task, task_labels


@dataclass(frozen=True)
class Hardware:
    """Where the frozen base runs: ``device`` (``auto``: the first CUDA GPU when one is visible, else cpu; under
    ``torchrun`` each rank's own GPU), ``device_map`` (spread over this process's GPUs, e.g. ``auto``; needs
    accelerate), ``quantize`` (``model/quantize.py``), ``dtype`` (the frozen base's: float32 by default; ``auto``
    is bfloat16 where the hardware is fast at it, ``model/load.auto_dtype``; the method's parameters train in
    float32 either way, the saved adapter is materialized in the base's dtype)."""

    device: str = "auto"
    device_map: str | None = None
    quantize: str | None = None
    dtype: str | None = None

    def device_for(self, dist: Distributed):
        """The device ``load_base`` gets in this process (module docstring: ``device``, ``device_map``)."""
        if self.device_map and dist.enabled and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
            raise SoftpromptsError("--device-map spreads the base over all of a node's GPUs: run one process per "
                                   "node (torchrun --nproc_per_node 1)")
        return None if self.device_map else self.device if self.device != "auto" else dist.device or "auto"


@dataclass(frozen=True)
class Start:
    """How the method starts: ``method`` (``None``: prompt tuning, or cartridge with a corpus), ``virtual_tokens``,
    ``init`` / ``init_text`` (``None``: the method's defaults), or ``init_from``: a saved adapter directory whose
    artifact the method continues (its base and task are then the defaults)."""

    method: str | None = None
    virtual_tokens: int | None = None
    init: str | None = None
    init_text: str | None = None
    init_from: str | None = None


@dataclass(frozen=True)
class Corpus:
    """A cartridge's corpus (``training/cartridge.py``): text ``files``, the self-study recipe, an earlier run's
    conversations to reuse (``self_study_data``), and the leading virtual tokens kept at their initial KV
    (``frozen_tokens``; ``None``: the method's default)."""

    files: list[str]
    study: SelfStudyConfig = field(default_factory=SelfStudyConfig)
    self_study_data: str | None = None
    frozen_tokens: int | None = None


@dataclass(frozen=True)
class TrainFiles:
    """One training run from files (module docstring). ``config.lr`` is the learning rate as given: the command
    line puts the method's default there (``TrainFiles.method_class().default_lr``) when ``--lr`` is not given."""

    out: str | Path
    config: TrainConfig = field(default_factory=TrainConfig)
    task: TaskFlags = TaskFlags()
    data: str | None = None
    eval_data: str | None = None
    corpus: Corpus | None = None
    start: Start = Start()
    model: str | None = None
    hardware: Hardware = Hardware()
    resume: bool = False
    overwrite: bool = False

    def method_class(self) -> type[PromptMethod]:
        """The method's class, after the data rules (one of data and corpus; a corpus without ``init_from``)."""
        if (self.data is None) == (self.corpus is None):
            raise SoftpromptsError("give the training data with --data FILE, or a corpus for a cartridge with "
                                   "--corpus FILE (not both)")
        if self.corpus is not None and self.start.init_from:
            raise SoftpromptsError("--init-from continues an adapter on --data; a cartridge starts from its corpus")
        return method_class(self.start.method or ("cartridge" if self.corpus is not None else "prompt"))


@dataclass(frozen=True)
class Trained:
    """What ``train_files`` did: ``result`` (``None``: the run was already finished), the method's name, the output
    directory, whether this process is rank 0 (the one that reports), whether dev data chose the best adapter, a
    cartridge's distillation or not."""

    result: TrainResult | None
    method: str
    out: Path
    main: bool = True
    dev: bool = False
    distilled: bool = False

    def summary(self) -> str:
        """The one line ``softprompts train`` prints: where the adapter is, its size, time and best dev metric."""
        if self.result is None:
            return f"{self.out} is already finished (nothing to resume)"
        rec = self.result.record
        seconds = f"{rec['timings']['train_seconds']:.1f}s"
        if self.distilled:
            seconds += " of distillation"
        elif self.dev:
            seconds += f", best {rec['metric']} {rec['best_dev']:.4f} at step {rec['best_step']}"
        return (f"saved {self.method} adapter to {self.out} ({rec['trainable_parameters']:,} trainable parameters, "
                f"{seconds})")


def train_files(request: TrainFiles) -> Trained:
    """Train the method ``request`` names on its files and save the best adapter (+ training.json) in
    ``request.out``, by the rules of the module docstring; ``training.train`` (or ``train_cartridge``) runs it."""
    cls = request.method_class()
    config = request.config.validate()
    out = Path(request.out)
    if request.resume and (out / RECORD_FILE).is_file() and not checkpoint_path(out).is_file():
        return Trained(None, cls.name, out)
    resuming = request.resume and checkpoint_path(out).is_file()
    check_output(out, overwrite=request.overwrite or resuming or only_logs(out))
    previous = read_adapter_record(request.start.init_from) if request.start.init_from else None
    task = previous.task if previous is not None else None
    kind = request.task.kind(task)
    flags = replace(request.task, task=kind, labels=task_labels(request.task.labels, kind, task))
    dist = setup_distributed()  # before loading: under torchrun each rank puts the base on its own GPU
    hardware = request.hardware
    base = lazy_base(request.model or (previous.base.name if previous is not None else DEFAULT_MODEL),
                     hardware.quantize, hardware.device_for(dist), hardware.device_map, hardware.dtype)
    if request.corpus is not None:
        result = _distill(replace(request, config=config), cls, base(), dist)
    else:
        result = _train_rows(replace(request, config=config, task=flags), cls, task, base, dist)
    dist.close()
    return Trained(result, cls.name, out, dist.is_main, bool(request.eval_data), request.corpus is not None)


def _train_rows(request: TrainFiles, cls: type[PromptMethod], previous: TaskSpec | None, base,
                dist: Distributed) -> TrainResult:
    """The run on ``request.data`` rows: a template's rows are checked before ``base()`` loads the model; chat rows
    need its tokenizer (its chat template)."""
    devs = [request.eval_data] if request.eval_data else []
    spec, examples, devs = load_task(request.task, request.data, devs, lambda: base().tokenizer, previous=previous)
    start = request.start
    init_artifact = load_adapter(start.init_from, base()).artifact if start.init_from else None
    method = build_method(base(), cls.name, spec, seed=request.config.seed, num_virtual_tokens=start.virtual_tokens,
                          init=start.init, init_text=start.init_text, init_artifact=init_artifact)
    return train(base(), method, examples, spec, request.config, dev_examples=devs[0] if devs else None,
                 out_dir=request.out, resume=request.resume, overwrite=request.overwrite, dist=dist)


def _distill(request: TrainFiles, cls: type[PromptMethod], base: FrozenBase, dist: Distributed) -> TrainResult:
    """A cartridge trained by self-study on ``request.corpus`` (``training/cartridge.py``): the training rows are
    generated; only ``eval_data`` (chat rows: a question about the corpus, then its answer) is read."""
    dev = None
    if request.eval_data:
        dev_spec, dev, _ = load_task(TaskFlags("generate"), request.eval_data, [], lambda: base.tokenizer)
        if dev_spec.chat is None:
            raise SoftpromptsError("--eval-data for a cartridge holds chat rows ('messages': a question about the "
                                   "corpus, then its answer)")
    corpus = request.corpus
    options = {"num_virtual_tokens": request.start.virtual_tokens, "init": request.start.init}
    if corpus.frozen_tokens is not None:
        options["frozen_tokens"] = corpus.frozen_tokens
    if request.task.max_prompt_tokens is not None:
        options["max_prompt_tokens"] = request.task.max_prompt_tokens
    return train_cartridge(base, corpus.files, request.config, corpus.study, method=cls.name, out_dir=request.out,
                           resume=request.resume, overwrite=request.overwrite, eval_examples=dev,
                           self_study_data=corpus.self_study_data, dist=dist, **options)


__all__ = ["Corpus", "Hardware", "Start", "TrainFiles", "Trained", "train_files"]
