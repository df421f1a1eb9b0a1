"""``softprompts generate``: decode continuations with a saved adapter.

Each TEXT is rendered through the adapter's prompt template when the template has exactly one field: the TEXT is
that field's value (``"great film"`` becomes ``"Review: great film\\nSentiment:"``). A TEXT that is a JSON object
fills a template with several fields. For a chat adapter TEXT is the user's message (or a JSON list of messages),
rendered with the model's chat template and the adapter's placement. ``--raw`` sends TEXT to the model as is.
"""

from __future__ import annotations

import json

from softprompts.cli.arguments import finite
from softprompts.errors import SoftpromptsError


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text with an adapter", description=__doc__)
    p.add_argument("--adapter", required=True, help="adapter directory, TABLE_DIR#NAME, or table:NAME with --table")
    p.add_argument("--table", default=None, help="prompt table directory for --adapter table:NAME")
    p.add_argument("--model", default=None, help="base model (default: the adapter's own base model)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=finite, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=finite, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--raw", action="store_true", help="do not render TEXT through the adapter's template")
    p.add_argument("text", nargs="+", metavar="TEXT")
    p.set_defaults(func=run)


def render(spec, text: str, raw: bool = False, tokenizer=None) -> str:
    """The prompt the model reads for a command-line TEXT (see the module docstring)."""
    if raw or spec is None:
        return text
    if spec.chat is not None:  # a chat adapter: TEXT is the user's message (or a JSON list of messages)
        messages = [{"role": "user", "content": text}]
        if text.lstrip().startswith("["):
            try:
                messages = json.loads(text)
            except json.JSONDecodeError as exc:
                raise SoftpromptsError(f"TEXT looks like a JSON list of messages but is not valid ({exc.msg}); "
                                       "pass --raw to send it as is") from None
        return spec.prompt_format(tokenizer).render_prompt({"messages": messages})
    template = spec.template
    if text.lstrip().startswith("{"):
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SoftpromptsError(
                f"TEXT looks like JSON but is not valid ({exc.msg}); pass --raw to send it as is") from None
        return template.render_prompt(row)
    fields = sorted(template.prompt_fields)
    if len(fields) != 1:
        raise SoftpromptsError(f"the adapter's template {spec.prompt!r} has fields {', '.join(fields) or '(none)'}: "
                               'pass each TEXT as a JSON object such as \'{"field": "..."}\', or --raw')
    return template.render_prompt({fields[0]: text})


def run(args) -> int:
    from softprompts.cli.evaluate import load_adapter_and_base
    from softprompts.evaluate import generate_texts
    from softprompts.model.generation import Sampling

    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    if sampling.errors() or args.max_new_tokens < 1:
        tokens = ["--max-new-tokens must be >= 1"] if args.max_new_tokens < 1 else []
        raise SoftpromptsError("; ".join(sampling.errors() + tokens))
    adapter, base, spec = load_adapter_and_base(args.adapter, args.model, args.table)
    prompts = [render(spec, t, args.raw, base.tokenizer) for t in args.text]
    for out in generate_texts(base, adapter, prompts, spec, args.max_new_tokens, sampling):
        print(out)
    return 0
