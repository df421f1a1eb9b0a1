"""Train a cartridge: self-study on a corpus, then context distillation through the one training loop.

    chunks        = chunk_documents(corpus)                               data/corpus.py
    method        = cartridge, its KV started at the corpus's first P tokens (as the teacher reads them)
    conversations = self-study (generated, or reused from OUT.self_study.jsonl / --self-study-data)
    rows          = student rows with the teacher's top-k targets         training/distill.py
    adapter       = loop.train(method, rows)                              checkpoints, resume, keep-best as always

The output directory holds the adapter, ``training.json``, ``self_study.jsonl`` (the conversations: inspect them,
or reuse them with ``--self-study-data``) and ``cartridge.json`` (the corpus, its size in tokens and KV bytes next
to the cartridge's). While training runs the conversations wait next to the checkpoint (``OUT.self_study.jsonl``),
so ``--resume`` after an interruption does not generate them again.
"""

from __future__ import annotations

import json
from pathlib import Path

from softprompts.data.corpus import chunk_documents, corpus_digest, read_corpus
from softprompts.errors import DataError, SoftpromptsError
from softprompts.methods import build_method
from softprompts.model.generation import ContextLengthError
from softprompts.tasks import TaskSpec
from softprompts.training import self_study
from softprompts.training.config import SelfStudyConfig, TrainConfig
from softprompts.training.distill import student_rows, teacher_targets
from softprompts.training.distributed import Distributed
from softprompts.training.loop import TrainResult, train
from softprompts.training.preflight import log, output_paths
from softprompts.training.self_study import ChunkContexts, ContextFormat

SELF_STUDY_FILE = "self_study.jsonl"
SUMMARY_FILE = "cartridge.json"


def self_study_path(out_dir: str | Path) -> Path:
    """``OUT.self_study.jsonl`` next to the output directory (the conversations of a run in progress)."""
    out_dir = Path(out_dir)
    return out_dir.parent / f"{out_dir.name}.self_study.jsonl"


def train_cartridge(base, corpus: list[str | Path], config: TrainConfig, study: SelfStudyConfig | None = None, *,
                    method: str = "cartridge", out_dir: str | Path | None = None, resume: bool = False,
                    overwrite: bool = False, eval_examples=None, self_study_data: str | Path | None = None,
                    max_prompt_tokens: int = 256, dist: Distributed | None = None, **method_options) -> TrainResult:
    """Self-study on ``corpus`` (text or markdown files) and distill it into ``method`` (module docstring).

    ``study``: the self-study options; ``eval_examples``: optional chat rows (questions with answers) that pick the
    best adapter on dev; ``self_study_data``: reuse the conversations of an earlier run (its ``self_study.jsonl``);
    ``method_options``: the method's config (``num_virtual_tokens``, ``frozen_tokens``, ...).
    """
    study = study or SelfStudyConfig()
    problems = study.errors()
    if problems:
        raise SoftpromptsError("; ".join(problems))
    base.require("distillation")
    dist = dist or Distributed()
    out_path, _, resuming = output_paths(out_dir, resume, overwrite, dist)  # refused now, not after self-study
    documents = read_corpus(corpus)
    digest = corpus_digest(documents)
    fmt = ContextFormat(base.tokenizer)
    chunks = chunk_documents(documents, base.tokenize, base.tokenizer.decode, study.chunk_tokens)
    whole = fmt.context_text("\n\n".join(text for _, text in documents))
    corpus_tokens = len(base.tokenize(whole))
    spec = TaskSpec.for_chat("generate", None, max_prompt_tokens=max_prompt_tokens,
                             max_target_tokens=study.answer_tokens + 1)
    cartridge = build_method(base, method, spec, seed=config.seed, init_text=whole, **method_options)
    virtual = cartridge.config.num_virtual_tokens
    if virtual >= corpus_tokens:
        raise DataError(f"the corpus is {corpus_tokens} tokens as the model reads it, and a cartridge of {virtual} "
                        "virtual tokens is not smaller: put the text in the prompt, or use far fewer "
                        "--virtual-tokens")
    _check_context(base, fmt, chunks, study, virtual)

    contexts = ChunkContexts(base, chunks, fmt)  # each chunk's KV computed once, for self-study and the teacher
    conversations = _conversations(base, chunks, fmt, study, digest, out_path, resuming, self_study_data, config,
                                   dist, contexts)
    targets = teacher_targets(base, chunks, conversations, fmt, study.top_k, study.batch_size, config.progress,
                              contexts)
    rows = student_rows(base, conversations, fmt, targets)
    artifact = cartridge.materialize()
    bytes_per_position = sum(t.numel() * t.element_size() for t in artifact.tensors().values()) / virtual
    summary = {"corpus": [path for path, _ in documents], "corpus_sha256": digest, "corpus_tokens": corpus_tokens,
               "chunks": len(chunks), "conversations": len(conversations), "self_study": study.recipe(),
               "teacher_top_k": study.top_k, "virtual_tokens": virtual,
               "kv_bytes": {"cartridge": int(bytes_per_position * virtual),
                            "corpus_in_context": int(bytes_per_position * corpus_tokens)}}
    log(dist, f"cartridge: {virtual} virtual tokens for a corpus of {corpus_tokens} tokens "
              f"({virtual / corpus_tokens:.2f}x its KV), {len(conversations)} conversations over {len(chunks)} chunks")
    saved = self_study_path(out_path) if out_path is not None else None
    extra = {SUMMARY_FILE: json.dumps(summary, indent=2) + "\n",
             SELF_STUDY_FILE: self_study.rows_text(conversations, digest, study)}
    result = train(base, cartridge, rows, spec, config, dev_examples=eval_examples, out_dir=out_path,
                   resume=resuming, overwrite=overwrite, dist=dist, extra_files=extra)
    if saved is not None and dist.is_main:
        saved.unlink(missing_ok=True)
    return result


def _conversations(base, chunks, fmt, study, digest, out_path, resuming, self_study_data, config, dist, contexts):
    """Reuse ``self_study_data``, or this run's own conversations when resuming; else generate and keep them."""
    saved = self_study_path(out_path) if out_path is not None else None
    source = Path(self_study_data) if self_study_data else saved if resuming and saved.is_file() else None
    if source is not None:
        if not source.is_file():
            raise DataError(f"--self-study-data {source} does not exist")
        conversations = self_study.load(source, digest, study, len(chunks))
        log(dist, f"self-study: {len(conversations)} conversations reused from {source}")
        return conversations
    conversations = self_study.generate_conversations(base, chunks, fmt, study, config.progress, contexts)
    if saved is not None and dist.is_main:
        self_study.save(saved, conversations, digest, study)
    return conversations


def _check_context(base, fmt: ContextFormat, chunks, study: SelfStudyConfig, virtual: int) -> None:
    """Before any generation: the longest chunk's context with a long question and answer (the teacher), and the
    cartridge with them (the student), must fit the model's context."""
    longest = max(chunks, key=lambda c: len(base.tokenize(fmt.context_text(c.text))))
    context = fmt.context_text(longest.text)
    question = "x" * (4 * study.question_tokens)  # ~question_tokens tokens, more for a byte-level tokenizer
    prompt = fmt.teacher_prompt(context, longest.text, question)
    try:
        base.check_fits(len(base.tokenize(prompt)), len(base.tokenize(context)), study.answer_tokens + 1)
    except ContextLengthError as error:
        raise DataError(f"a chunk of the corpus with a conversation does not fit the model's context ({error}); "
                        "use a smaller --chunk-tokens or --answer-tokens") from None
    try:
        base.check_fits(len(base.tokenize(fmt.student_prompt(question))), virtual, study.answer_tokens + 1)
    except ContextLengthError as error:
        raise DataError(f"{virtual} virtual tokens with a conversation do not fit the model's context ({error}); "
                        "use fewer --virtual-tokens or a smaller --answer-tokens") from None


__all__ = ["SELF_STUDY_FILE", "SUMMARY_FILE", "self_study_path", "train_cartridge"]
