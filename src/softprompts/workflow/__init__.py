"""What a command does, below the command line. Each ``softprompts`` command is its flags plus one call here, and
the Python face (``sp.generate``, ``sp.train_files``, ``sp.evaluate_files``, ``sp.tune_files``,
``sp.compare_files``) calls the same functions, so a command and its Python call cannot drift apart:

    inputs.py      what a command reads: a task from files and flags (``TaskFlags``, ``load_task``), an adapter
                   reference with its overrides or the bare model (``Source``, ``open_adapter``, ``lazy_base``)
    train.py       ``train_files(TrainFiles)``: the data or corpus rules, resume and output checks, the device /
                   ``torchrun`` / ``device_map`` rules, a cartridge's self-study, then ``training.train``
    evaluate.py    ``evaluate_files(EvalFiles)``: an adapter's task with the flags in its place, or the bare model;
                   ``evaluate_table``: several tasks of a prompt table in shared batches; ``explain_files``:
                   where an adapter acts in its base, on rows of its own task
    compare.py     ``compare_files(CompareFiles)``: every method on one task (or a catalog dataset's), reported
    tune.py        ``tune_files(TuneFiles)``: a study's checks before the model loads, then ``training.tune.tune``
    generation.py  ``generate`` / ``generate_from``: TEXT rendered through the adapter's task, then decoded

The workflow stands above ``training/`` and below ``cli/`` (docs/ARCHITECTURE.md).
"""

from softprompts.workflow.compare import CompareFiles, compare_files
from softprompts.workflow.evaluate import EvalFiles, ExplainFiles, evaluate_files, evaluate_table, explain_files
from softprompts.workflow.generation import (
           AS_RECORDED,
           Rendering,
           check_decoding,
           generate,
           generate_from,
           recorded_task,
)
from softprompts.workflow.inputs import Source, TaskFlags, lazy_base, load_task, open_adapter, task_labels
from softprompts.workflow.train import Corpus, Hardware, Start, Trained, TrainFiles, train_files
from softprompts.workflow.tune import TuneFiles, tune_files, tune_summary

__all__ = ["AS_RECORDED", "CompareFiles", "Corpus", "EvalFiles", "ExplainFiles", "Hardware", "Rendering", "Source",
           "Start", "TaskFlags", "TrainFiles", "Trained", "TuneFiles", "check_decoding", "compare_files",
           "evaluate_files", "evaluate_table", "explain_files", "generate", "generate_from", "lazy_base", "load_task",
           "open_adapter", "recorded_task", "task_labels", "train_files", "tune_files", "tune_summary"]
