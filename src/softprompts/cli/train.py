"""``softprompts train``: train one method on a task file and save the best adapter (+ training.json). Its flags
become one ``workflow.TrainFiles`` request, run by ``workflow.train_files`` (``sp.train_files`` in Python)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from softprompts.cli.arguments import add_dtype_flag, add_quantize_flag, add_report_flag, finite, say_dtype
from softprompts.cli.cartridge import add_corpus_flags
from softprompts.cli.task_inputs import add_chat_flags, label_list


def register(sub) -> None:
    p = sub.add_parser("train", help="train a soft prompt / prefix on a task", description=__doc__,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="embedded name, HF id or directory (default: smollm2-135m, or the "
                   "base of --init-from)")
    p.add_argument("--method", default=None, help="prompt (prompt tuning, the default), ptuning (P-tuning), residual "
                   "(residual prompt tuning), dept (DePT: a soft prompt + low-rank embedding offsets), prefix "
                   "(prefix tuning), deep (deep prompts / P-tuning v2) or cartridge (the default with --corpus); an "
                   "unknown name lists the methods installed")
    p.add_argument("--task", default="classify", choices=("classify", "generate"))
    p.add_argument("--data", default=None, help="training data (or --corpus): .jsonl, .json, .csv or .tsv; rows "
                   "holding 'messages' (OpenAI/TRL chat form, the assistant's last message the target) are rendered "
                   "with the model's chat template, no --template needed")
    p.add_argument("--eval-data", default=None, help="dev data for evaluation during training and best-adapter keeping")
    p.add_argument("--template", default=None,
                   help=r'prompt template over row fields, e.g. "Review: {text}\nSentiment:"')
    p.add_argument("--target", default=None, help='target template, e.g. " {label}"')
    add_chat_flags(p)
    p.add_argument("--labels", default=None, help="comma-separated label set (default: the labels found in --data)")
    p.add_argument("--virtual-tokens", type=int, default=None, help="number of virtual tokens (default: per method)")
    p.add_argument("--init", default=None, help="random, vocab, text or labels (default: per method)")
    p.add_argument("--init-text", default=None, help="text for --init text (default: derived from the task)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=finite, default=None, help="learning rate (default: per method, see docs/DEFAULTS.md)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per optimizer step")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--schedule", default="linear", help="linear, cosine or constant (after warmup)")
    p.add_argument("--warmup-ratio", type=finite, default=0.1)
    p.add_argument("--weight-decay", type=finite, default=0.0)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N dev examples only")
    p.add_argument("--patience", type=int, default=0, help="early stop after N evaluations without improvement")
    p.add_argument("--checkpoint-every", type=int, default=25)
    p.add_argument("--max-prompt-tokens", type=int, default=256)
    p.add_argument("--max-target-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output adapter directory")
    p.add_argument("--resume", action="store_true", help="continue from OUT.checkpoint.pt if present")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--init-from", default=None, help="continue training a saved adapter directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute the base's decoder layers in "
                   "the backward pass: less activation memory, more time, same gradients (every method)")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step's model forward and "
                   "loss (faster steps after a one-time compilation; not with --gradient-checkpointing; the "
                   "compiled step uses "
                   "HF's LM head, not the eager step's fused chunked head, so it holds the [labels, vocab] logits)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward/backward passes (CUDA only; "
                   "for an fp32 base model)")
    p.add_argument("--device", default="auto", help="torch device for the base model and adapter (default auto: "
                   "the first CUDA GPU when one is visible, else cpu; under torchrun each rank's own GPU)")
    p.add_argument("--device-map", default=None, help="spread the frozen base over this process's GPUs "
                   "(e.g. auto; needs accelerate; one process per node under torchrun, see docs/DISTRIBUTED.md)")
    add_quantize_flag(p)
    add_dtype_flag(p)
    add_report_flag(p)
    add_corpus_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from softprompts.training import SelfStudyConfig, TrainConfig
    from softprompts.workflow import Corpus, Hardware, Start, TaskFlags, TrainFiles, train_files

    say_dtype(args.dtype, args.device)
    corpus = None
    if args.corpus:
        corpus = Corpus(args.corpus, SelfStudyConfig(
            conversations=args.conversations, chunk_tokens=args.chunk_tokens, question_tokens=args.question_tokens,
            answer_tokens=args.answer_tokens, temperature=args.self_study_temperature, top_k=args.teacher_top_k,
            batch_size=args.self_study_batch, seed=args.seed), args.self_study_data, args.frozen_tokens)
    flags = TaskFlags(args.task, args.template, args.target, label_list(args.labels), args.placement, args.system,
                      args.max_prompt_tokens, args.max_target_tokens)
    request = TrainFiles(args.out, task=flags, data=args.data, eval_data=args.eval_data, corpus=corpus,
                         start=Start(args.method, args.virtual_tokens, args.init, args.init_text, args.init_from),
                         model=args.model, hardware=Hardware(args.device, args.device_map, args.quantize, args.dtype),
                         resume=args.resume, overwrite=args.overwrite)
    config = TrainConfig(
        steps=args.steps, lr=args.lr if args.lr is not None else request.method_class().default_lr,
        batch_size=args.batch_size, grad_accum=args.grad_accum, weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio, schedule=args.schedule, eval_every=args.eval_every,
        eval_limit=args.eval_limit, patience=args.patience, checkpoint_every=args.checkpoint_every, seed=args.seed,
        progress=not args.no_progress, gradient_checkpointing=args.gradient_checkpointing, autocast_bf16=args.bf16,
        compile=args.compile, report_to=args.report_to)
    done = train_files(replace(request, config=config))
    if done.main:
        print(done.summary(), file=sys.stderr)
    return 0
