"""``softprompts generate``: decode continuations with a saved adapter, or with the bare model.

Each TEXT is rendered through the adapter's prompt template when the template has exactly one field: the TEXT is
that field's value (``"great film"`` becomes ``"Review: great film\\nSentiment:"``). A TEXT that is a JSON object
fills a template with several fields. For a chat adapter TEXT is the user's message (or a JSON list of messages),
rendered with the model's chat template and the adapter's placement, and the answer ends with the assistant's turn.
``--raw`` sends TEXT to the model as is.

``--template`` renders TEXT through another template, ``--chat`` (or ``--placement`` / ``--system``) through the
model's chat template; either replaces the adapter's own. Without ``--adapter`` the bare model (``--model``, default
smollm2-135m) reads TEXT as is, or rendered by ``--template`` / ``--chat``. ``sp.generate`` in Python answers the
same (``softprompts.workflow.generate``).
"""

from __future__ import annotations

from softprompts.cli.arguments import add_dtype_flag, add_quantize_flag, finite, say_dtype
from softprompts.cli.task_inputs import add_chat_flags


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text with an adapter or the bare model", description=__doc__)
    p.add_argument("--adapter", default=None, help="adapter directory, TABLE_DIR#NAME, or table:NAME with --table "
                   "(default: none, the bare model)")
    p.add_argument("--table", default=None, help="prompt table directory for --adapter table:NAME")
    p.add_argument("--model", default=None, help="base model (default: the adapter's own base model, without "
                   "--adapter smollm2-135m)")
    p.add_argument("--template", default=None, help=r'render TEXT through this prompt template, e.g. "Review: '
                   r'{text}\nSentiment:" (instead of the adapter'"'s)")
    p.add_argument("--chat", action="store_true", help="render TEXT (the user's message, or a JSON list of "
                   "messages) with the model's chat template")
    add_chat_flags(p)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=finite, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=finite, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--raw", action="store_true", help="send TEXT to the model as is (no template, no chat "
                   "template)")
    p.add_argument("text", nargs="+", metavar="TEXT")
    add_quantize_flag(p)
    add_dtype_flag(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from softprompts.model.generation import Sampling
    from softprompts.workflow import Rendering, Source, generate_from

    say_dtype(args.dtype)
    for out in generate_from(Source(args.adapter, args.model, args.table, args.quantize, args.dtype), args.text,
                             Rendering(args.raw, args.template, args.chat, args.placement, args.system),
                             args.max_new_tokens, Sampling(temperature=args.temperature, top_p=args.top_p,
                                                           seed=args.seed)):
        print(out)
    return 0
