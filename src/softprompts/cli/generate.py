"""``softprompts generate``: decode continuations with a saved adapter, or with the bare model.

Each TEXT is rendered through the adapter's prompt template when the template has exactly one field: the TEXT is
that field's value (``"great film"`` becomes ``"Review: great film\\nSentiment:"``). A TEXT that is a JSON object
fills a template with several fields. For a chat adapter TEXT is the user's message (or a JSON list of messages),
rendered with the model's chat template and the adapter's placement. ``--raw`` sends TEXT to the model as is.

``--template`` renders TEXT through another template, ``--chat`` (or ``--placement`` / ``--system``) through the
model's chat template; either replaces the adapter's own. Without ``--adapter`` the bare model (``--model``, default
smollm2-135m) reads TEXT as is, or rendered by ``--template`` / ``--chat``.
"""

from __future__ import annotations

import json

from softprompts.cli.arguments import add_quantize_flag, finite
from softprompts.cli.task_inputs import add_chat_flags
from softprompts.errors import SoftpromptsError


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
        raise SoftpromptsError(f"the template {spec.prompt!r} has fields {', '.join(fields) or '(none)'}: "
                               'pass each TEXT as a JSON object such as \'{"field": "..."}\', or --raw')
    return template.render_prompt({fields[0]: text})


def run(args) -> int:
    from softprompts.cli.evaluate import bare_base, load_adapter_and_base
    from softprompts.evaluate import generate_texts
    from softprompts.model.generation import Sampling

    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    if sampling.errors() or args.max_new_tokens < 1:
        tokens = ["--max-new-tokens must be >= 1"] if args.max_new_tokens < 1 else []
        raise SoftpromptsError("; ".join(sampling.errors() + tokens))
    _check_rendering(args)
    if args.adapter is None:
        adapter, base, spec = None, bare_base(args.model, args.quantize)(), None
    else:
        adapter, base, spec = load_adapter_and_base(args.adapter, args.model, args.table, args.quantize)
    spec = rendering(spec, args.template, args.chat or args.placement is not None or args.system is not None,
                     args.placement, args.system)
    prompts = [render(spec, t, args.raw, base.tokenizer) for t in args.text]
    for out in generate_texts(base, adapter, prompts, spec, args.max_new_tokens, sampling):
        print(out)
    return 0


def _check_rendering(args) -> None:
    """One way to render TEXT: ``--raw``, ``--template`` or the chat flags (checked before a model loads)."""
    chat = [f for f, on in (("--chat", args.chat), ("--placement", args.placement is not None),
                            ("--system", args.system is not None)) if on]
    if args.template is not None and chat:
        raise SoftpromptsError(f"--template and {', '.join(chat)}: TEXT is rendered by a template or by the chat "
                               "template, not both")
    given = (["--template"] if args.template is not None else []) + chat
    if args.raw and given:
        raise SoftpromptsError(f"--raw sends TEXT as is: not with {', '.join(given)}")


def rendering(spec, template: str | None, chat: bool, placement: str | None = None, system: str | None = None):
    """The spec TEXT is rendered with: ``spec`` (the adapter's task, or None for the bare model) with its prompt
    template replaced by ``template``, or with the model's chat template (``chat``; placement and system message from
    the flags, else the adapter's chat task). Its truncation limits and labels stay."""
    from dataclasses import replace

    from softprompts.data.chat import DEFAULT_PLACEMENT
    from softprompts.data.templates import Template, from_shell
    from softprompts.tasks import TaskSpec

    if template is None and not chat:
        return spec
    now = spec if spec is not None else TaskSpec("generate", "", "{target}")  # the bare model: no task of its own
    if template is not None:  # the target is unused here (TEXT is the prompt): any valid one
        return replace(now, prompt=Template(from_shell(template), now.target).prompt, chat=None)
    before = now.chat or {}
    return TaskSpec.for_chat(now.task, now.labels, placement or before.get("placement") or DEFAULT_PLACEMENT,
                             system if system is not None else before.get("system"),
                             max_prompt_tokens=now.max_prompt_tokens, max_target_tokens=now.max_target_tokens)
