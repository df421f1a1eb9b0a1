"""``softprompts explain``: where an adapter acts inside its base model, on rows of its own task.

On ``--limit`` rows of ``--data`` rendered with the task the adapter recorded (as ``softprompts eval`` renders
them), writes to ``--out``: ``explain.json`` (the metric, the attention share on the virtual positions per layer,
the layer ablation ``{"all", "none", "keep_first", "keep_last"}``, the prefix's key/value norms against real
tokens', a soft prompt's nearest vocabulary tokens, a summary), ``explain.md`` (the same as tables) and the plots
``attention_share.png``, ``layer_ablation.png``, ``kv_norms.png``. Both artifact kinds are measured as the KV prefix
they are served as (a soft prompt's KV is what it produces in every layer). The ablation runs the metric
``2 L + 2`` times (``L`` layers): ``--limit`` bounds its cost. Decoder-only bases only.
"""

from __future__ import annotations

import json

from softprompts.cli.arguments import add_dtype_flag, add_quantize_flag, say_dtype
from softprompts.errors import SoftpromptsError


def register(sub) -> None:
    p = sub.add_parser("explain", help="show where an adapter acts inside the model: attention per layer, which "
                       "layers carry the task, what a soft prompt is near", description=__doc__)
    p.add_argument("--adapter", required=True, help="adapter directory (or TABLE_DIR#NAME)")
    p.add_argument("--data", required=True, action="append", help="rows of the adapter's task: .jsonl, .json, .csv "
                   "or .tsv")
    p.add_argument("--limit", type=int, default=50, help="rows explained (default 50; each ablation run scores them)")
    p.add_argument("--out", required=True, help="output directory for explain.md, explain.json and the plots")
    p.add_argument("--top-k", type=int, default=5, help="nearest vocabulary tokens per virtual token (soft prompts)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=None, help="generation tasks: decoding limit")
    p.add_argument("--model", default=None, help="base model (default: the adapter's own)")
    p.add_argument("--json", action="store_true", help="print explain.json's summary as one JSON object")
    add_quantize_flag(p)
    add_dtype_flag(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from softprompts.explain import ExplainConfig
    from softprompts.workflow import ExplainFiles, Source, explain_files

    config = ExplainConfig(limit=args.limit, top_k=args.top_k, batch_size=args.batch_size,
                           max_new_tokens=args.max_new_tokens, progress=not args.json)
    if len(args.data) != 1:
        raise SoftpromptsError("--data is given once")
    say_dtype(args.dtype)
    source = Source(args.adapter, args.model, quantize=args.quantize, dtype=args.dtype)
    explanation, paths = explain_files(ExplainFiles(source, args.data[0], args.out, config))
    summary = explanation.summary()
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{explanation.metric}: all layers {explanation.ablation.all:.4f}, none {explanation.ablation.none:.4f}; "
              f"{summary['layers_for_90pct_gain']} of {explanation.layers} first layers carry 90% of the gain; "
              f"attention share first/middle/last {summary['share_first']:.3f}/{summary['share_middle']:.3f}/"
              f"{summary['share_last']:.3f}")
        print("wrote " + ", ".join(str(p) for p in paths))
    return 0
