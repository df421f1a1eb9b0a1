"""``softprompts train``: train one method on a task file and save the best adapter (+ training.json)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from softprompts.cli.arguments import add_quantize_flag, add_report_flag, finite
from softprompts.cli.cartridge import add_corpus_flags, run_cartridge
from softprompts.cli.task_inputs import add_chat_flags, task_labels
from softprompts.errors import SoftpromptsError


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
    add_report_flag(p)
    add_corpus_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from softprompts.adapter_io import load_adapter
    from softprompts.codec import read_adapter_record
    from softprompts.files import check_output
    from softprompts.methods import build_method, method_class
    from softprompts.model.load import DEFAULT_MODEL, load_base
    from softprompts.training import RECORD_FILE, TrainConfig, checkpoint_path, setup_distributed, train
    from softprompts.training.trackers import only_logs
    from softprompts.workflow import TaskFlags, load_task

    if bool(args.data) == bool(args.corpus):
        raise SoftpromptsError("give the training data with --data FILE, or a corpus for a cartridge with --corpus "
                               "FILE (not both)")
    if args.corpus and args.init_from:
        raise SoftpromptsError("--init-from continues an adapter on --data; a cartridge starts from its corpus")
    cls = method_class(args.method or ("cartridge" if args.corpus else "prompt"))
    config = TrainConfig(
        steps=args.steps, lr=args.lr if args.lr is not None else cls.default_lr, batch_size=args.batch_size,
        grad_accum=args.grad_accum, weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
        schedule=args.schedule, eval_every=args.eval_every, eval_limit=args.eval_limit, patience=args.patience,
        checkpoint_every=args.checkpoint_every, seed=args.seed, progress=not args.no_progress,
        gradient_checkpointing=args.gradient_checkpointing, autocast_bf16=args.bf16,
        compile=args.compile, report_to=args.report_to,
    ).validate()
    out = Path(args.out)
    if args.resume and (out / RECORD_FILE).is_file() and not checkpoint_path(out).is_file():
        print(f"{out} is already finished (nothing to resume)", file=sys.stderr)
        return 0
    check_output(out, overwrite=args.overwrite or (args.resume and checkpoint_path(out).is_file()) or only_logs(out))

    previous = read_adapter_record(args.init_from) if args.init_from else None
    task = previous.task if previous is not None else None
    labels = task_labels(args.labels, args.task, task)
    model_name = args.model or (previous.base.name if previous is not None else DEFAULT_MODEL)
    dist = setup_distributed()  # before loading: under torchrun each rank puts the base on its own GPU
    if args.device_map and dist.enabled and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        raise SoftpromptsError("--device-map spreads the base over all of a node's GPUs: run one process per node "
                               "(torchrun --nproc_per_node 1)")
    device = None if args.device_map else args.device if args.device != "auto" else dist.device or "auto"
    loaded = []

    def base_model():
        if not loaded:
            loaded.append(load_base(model_name, device=device, device_map=args.device_map, quantize=args.quantize))
        return loaded[0]

    if args.corpus:  # the training rows are generated: only --eval-data (chat rows) is read
        base = base_model()
        dev = None
        if args.eval_data:
            dev_spec, dev, _ = load_task(TaskFlags("generate"), args.eval_data, [], lambda: base.tokenizer)
            if dev_spec.chat is None:
                raise SoftpromptsError("--eval-data for a cartridge holds chat rows ('messages': a question about "
                                       "the corpus, then its answer)")
        code = run_cartridge(args, cls, config, base, dist, dev)
        dist.close()
        return code
    # a template's data is checked before the model loads; chat rows need its tokenizer (its chat template)
    flags = TaskFlags(args.task, args.template, args.target, labels, args.placement, args.system,
                      args.max_prompt_tokens, args.max_target_tokens)
    spec, examples, devs = load_task(flags, args.data, [args.eval_data] if args.eval_data else [],
                                     lambda: base_model().tokenizer, previous=task)
    dev = devs[0] if devs else None
    base = base_model()
    init_artifact = load_adapter(args.init_from, base).artifact if args.init_from else None
    method = build_method(base, cls.name, spec, seed=args.seed, num_virtual_tokens=args.virtual_tokens,
                          init=args.init, init_text=args.init_text, init_artifact=init_artifact)
    result = train(base, method, examples, spec, config, dev_examples=dev, out_dir=out, resume=args.resume,
                   overwrite=args.overwrite, dist=dist)
    if dist.is_main:
        rec = result.record
        best = f", best {rec['metric']} {rec['best_dev']:.4f} at step {rec['best_step']}" if dev else ""
        print(f"saved {cls.name} adapter to {out} ({rec['trainable_parameters']:,} trainable parameters, "
              f"{rec['timings']['train_seconds']:.1f}s{best})", file=sys.stderr)
    dist.close()
    return 0
