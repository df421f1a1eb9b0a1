"""softprompts: adapt a frozen language model with learned continuous prompts.

    import softprompts as sp
    base = sp.load_base("smollm2-135m")                      # embedded default, an HF id or a local directory
    spec = sp.TaskSpec("classify", "Review: {text}\\nSentiment:", " {label}", ["negative", "positive"])
    method = sp.create_method(base, "prefix", num_virtual_tokens=10, init_text="Sentiment of the review:")
    adapter = sp.Adapter.from_method(method, base, task=spec)  # materialized: MLP folded in, dropped
    sp.save_adapter(adapter, "my-adapter")                  # adapter.json + adapter.safetensors, atomic
    adapter = sp.load_adapter("my-adapter", base)            # refuses an adapter made for another model
    print(sp.generate(base, "great film", adapter, max_new_tokens=3))  # as `softprompts generate`: TEXT through
    # the adapter's task (template, or chat template + placement, ending with the turn); raw=True: as is

    method = sp.build_method(base, "prompt", spec)         # the measured defaults for a task (a TaskSpec)
    result = sp.train(base, method, examples, spec, sp.TrainConfig(steps=100, lr=method.default_lr))

    result = sp.train_cartridge(base, ["manual.md"], sp.TrainConfig(steps=200, lr=2e-2), out_dir="manual-cartridge")

    best = sp.tune(sp.TuneTask(base, "prompt", spec, examples, dev), sp.TrainConfig(steps=100),
                   sp.TuneConfig(trials=20), "tuned")      # Optuna: tuned/best/, best.json, tune.md, trials.png

    model = sp.wrap("smollm2-135m", "prompt", num_virtual_tokens=20)  # an nn.Module for transformers.Trainer / TRL

    # what the commands do, from files (the same functions `softprompts train` / `eval` call):
    task = sp.TaskFlags("classify", "Review: {text}\\nSentiment:", " {label}")
    done = sp.train_files(sp.TrainFiles("out", sp.TrainConfig(steps=100), task, data="train.jsonl",
                                        eval_data="dev.jsonl"))      # done.summary(): the line the CLI prints
    metrics = sp.evaluate_files(sp.EvalFiles("test.jsonl", sp.Source("out")))

The layers, ground up, and what each owns: docs/ARCHITECTURE.md.
"""

import importlib
from typing import TYPE_CHECKING

import softprompts.third_party_logs  # noqa: F401  (first: before transformers imports torchao)

# name -> the module that defines it. Resolved on first use (PEP 562), so `import softprompts` and the command line's
# `--help` do not load torch and transformers; `sp.NAME` and `from softprompts import NAME` work as usual.
_EXPORTS = {
    "Adapter": "adapter", "AdapterError": "adapter", "AdapterMismatchError": "adapter",
    "BaseWeightsWarning": "adapter", "load_adapter": "adapter_io", "save_adapter": "adapter_io",
    "generate": "api", "next_token_logits": "api", "SoftpromptsError": "errors",
    "PromptModel": "interop.hf_model", "wrap": "interop.hf_model",
    "METHODS": "methods", "build_method": "methods", "create_method": "methods",
    "KVPrefix": "model.artifacts", "SoftPrompt": "model.artifacts", "BaseModel": "model.decoder",
    "generate_ids": "model.decode_loop", "EncoderDecoderBase": "model.encoder_decoder", "FrozenBase": "model.frozen",
    "Sampling": "model.generation", "VirtualContext": "model.artifacts", "forward": "model.decoder",
    "DEFAULT_MODEL": "model.load", "load_base": "model.load", "TaskSpec": "task_spec",
    "SelfStudyConfig": "training", "TrainConfig": "training", "TrainResult": "training", "train": "training",
    "train_cartridge": "training", "TuneConfig": "training.tune", "TuneTask": "training.tune", "tune": "training.tune",
    "EvalFiles": "workflow", "Source": "workflow", "TaskFlags": "workflow", "TrainFiles": "workflow",
    "evaluate_files": "workflow", "train_files": "workflow", "TuneFiles": "workflow", "tune_files": "workflow",
    "CompareFiles": "workflow", "compare_files": "workflow", "ExplainFiles": "workflow", "explain_files": "workflow",
}

__version__ = "0.1.0"

__all__ = ["Adapter", "AdapterError", "AdapterMismatchError", "BaseModel", "BaseWeightsWarning", "CompareFiles",
           "DEFAULT_MODEL", "EncoderDecoderBase", "EvalFiles", "ExplainFiles", "FrozenBase", "KVPrefix", "METHODS",
           "PromptModel", "Sampling", "SelfStudyConfig", "SoftPrompt", "SoftpromptsError", "Source", "TaskFlags",
           "TaskSpec", "TrainConfig", "TrainFiles", "TrainResult", "TuneConfig", "TuneFiles", "TuneTask",
           "VirtualContext", "build_method", "compare_files", "create_method", "evaluate_files", "explain_files",
           "forward", "generate", "generate_ids", "load_adapter", "load_base", "next_token_logits", "save_adapter",
           "train", "train_cartridge", "train_files", "tune", "tune_files", "wrap"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'softprompts' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"softprompts.{_EXPORTS[name]}"), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what static tools see: the same names, imported
    from softprompts.adapter import Adapter, AdapterError, AdapterMismatchError, BaseWeightsWarning
    from softprompts.adapter_io import load_adapter, save_adapter
    from softprompts.api import generate, next_token_logits
    from softprompts.errors import SoftpromptsError
    from softprompts.interop.hf_model import PromptModel, wrap
    from softprompts.methods import METHODS, build_method, create_method
    from softprompts.model.artifacts import KVPrefix, SoftPrompt, VirtualContext
    from softprompts.model.decode_loop import generate_ids
    from softprompts.model.decoder import BaseModel, forward
    from softprompts.model.encoder_decoder import EncoderDecoderBase
    from softprompts.model.frozen import FrozenBase
    from softprompts.model.generation import Sampling
    from softprompts.model.load import DEFAULT_MODEL, load_base
    from softprompts.task_spec import TaskSpec
    from softprompts.training import SelfStudyConfig, TrainConfig, TrainResult, train, train_cartridge
    from softprompts.training.tune import TuneConfig, TuneTask, tune
    from softprompts.workflow import (
        CompareFiles,
        EvalFiles,
        ExplainFiles,
        Source,
        TaskFlags,
        TrainFiles,
        TuneFiles,
        compare_files,
        evaluate_files,
        explain_files,
        train_files,
        tune_files,
    )
