"""Generation from TEXT, below the command line: ``softprompts generate`` is its flags plus one call
(``generate_from``), and ``sp.generate`` calls ``generate``, so both answer the same for the same TEXT.

Each TEXT is rendered through the task the adapter recorded (``Rendering``):

    template task, one field      TEXT is that field's value: "great film" -> "Review: great film\\nSentiment:"
    template task, several        TEXT is a JSON object of the fields: '{"q": "...", "context": "..."}'
    chat task                     TEXT is the user's message (or a JSON list of messages), rendered with the model's
                                  chat template, the soft prompt at the adapter's placement (``data/chat.py``)
    no task (or an artifact)      TEXT as is

``raw`` sends TEXT as is; ``template`` renders it through another template and ``chat`` (or ``placement`` /
``system``) through the model's chat template, in place of the adapter's own. The prompt is then cut to the task's
``max_prompt_tokens`` and decoded until ``max_new_tokens``, the model's end of sequence or, for a chat task, the
end of the assistant's turn (``tasks.turn_stop_ids``): ``evaluate.generate_texts``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from softprompts.adapter import Adapter
from softprompts.data.templates import Template, from_shell
from softprompts.errors import SoftpromptsError
from softprompts.evaluate import generate_texts
from softprompts.model.artifacts import Artifact
from softprompts.model.frozen import FrozenBase
from softprompts.model.generation import GREEDY, Sampling
from softprompts.task_spec import DEFAULT_TARGET, ChatSpec, TaskSpec
from softprompts.workflow.inputs import Source


@dataclass(frozen=True)
class Rendering:
    """How each TEXT becomes the prompt the model reads (the module docstring): the adapter's recorded task unless

    raw        TEXT as is (the task's prompt truncation and stop tokens still apply; ``--raw``)
    template   another prompt template over TEXT, e.g. ``"Review: {text}\\nSentiment:"`` (``--template``; a typed
               backslash-n is a newline)
    chat       the model's chat template (``--chat``); ``placement`` / ``system`` imply it and replace the
               adapter's placement and system message (``--placement``, ``--system``)
    """

    raw: bool = False
    template: str | None = None
    chat: bool = False
    placement: str | None = None
    system: str | None = None

    @property
    def via_chat(self) -> bool:
        """Whether TEXT goes through the model's chat template in place of the adapter's own rendering."""
        return self.chat or self.placement is not None or self.system is not None

    def check(self) -> None:
        """One way to render TEXT: ``raw``, ``template`` or the chat options (checked before a model loads)."""
        chat = [f for f, on in (("--chat", self.chat), ("--placement", self.placement is not None),
                                ("--system", self.system is not None)) if on]
        if self.template is not None and chat:
            raise SoftpromptsError(f"--template and {', '.join(chat)}: TEXT is rendered by a template or by the "
                                   "chat template, not both")
        given = (["--template"] if self.template is not None else []) + chat
        if self.raw and given:
            raise SoftpromptsError(f"--raw sends TEXT as is: not with {', '.join(given)}")

    def spec(self, recorded: TaskSpec | None) -> TaskSpec | None:
        """The task TEXT is rendered with: ``recorded`` (the adapter's task, or None) with its prompt template
        replaced by ``template``, or with the model's chat template (placement and system message from the options,
        else from the recorded chat task). Its truncation limits and labels stay."""
        if self.template is None and not self.via_chat:
            return recorded
        now = recorded if recorded is not None else TaskSpec("generate", "", "{target}")  # no task of its own
        if self.template is not None:  # the target is unused here (TEXT is the prompt): any valid one
            return replace(now, prompt=Template(from_shell(self.template), now.target or DEFAULT_TARGET).prompt,
                           chat=None)
        before = now.chat or ChatSpec()
        return TaskSpec.for_chat(now.task, now.labels, self.placement or before.placement,
                                 self.system if self.system is not None else before.system,
                                 max_prompt_tokens=now.max_prompt_tokens, max_target_tokens=now.max_target_tokens)

    def prompt(self, spec: TaskSpec | None, text: str, tokenizer) -> str:
        """The prompt the model reads for ``text`` rendered with ``spec`` (``spec(recorded)``)."""
        if self.raw or spec is None:
            return text
        if spec.chat is not None:
            return spec.prompt_format(tokenizer).render_prompt({"messages": _messages(text)})
        template = spec.template
        if text.lstrip().startswith("{"):
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                raise SoftpromptsError(f"TEXT looks like JSON but is not valid ({exc.msg}); pass --raw (raw=True) "
                                       "to send it as is") from None
            return template.render_prompt(row)
        fields = sorted(template.prompt_fields)
        if len(fields) != 1:
            raise SoftpromptsError(f"the template {spec.prompt!r} has fields {', '.join(fields) or '(none)'}: "
                                   'pass each TEXT as a JSON object such as \'{"field": "..."}\', or --raw')
        return template.render_prompt({fields[0]: text})


AS_RECORDED = Rendering()  # TEXT through the adapter's own task


def _messages(text: str) -> list[dict]:
    """A chat TEXT as messages: the user's message, or a JSON list of messages."""
    if not text.lstrip().startswith("["):
        return [{"role": "user", "content": text}]
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SoftpromptsError(f"TEXT looks like a JSON list of messages but is not valid ({exc.msg}); pass --raw "
                               "(raw=True) to send it as is") from None


def recorded_task(adapter: Adapter | Artifact | None) -> TaskSpec | None:
    """The task an adapter recorded; ``None`` for an artifact, no adapter, or a task without a prompt template
    or chat placement (``{"task": "generate"}``): TEXT is then sent as is."""
    task = adapter.task if isinstance(adapter, Adapter) else None
    return task if task is not None and task.renders_text else None


def check_decoding(max_new_tokens: int, sampling: Sampling) -> None:
    """``SoftpromptsError`` listing every invalid decoding option of a command (at least one new token)."""
    problems = sampling.errors() + (["--max-new-tokens must be >= 1"] if max_new_tokens < 1 else [])
    if problems:
        raise SoftpromptsError("; ".join(problems))


def generate(base: FrozenBase, texts: list[str], adapter: Adapter | Artifact | None = None,
             rendering: Rendering = AS_RECORDED, max_new_tokens: int = 32,
             sampling: Sampling = GREEDY) -> list[str]:
    """The continuation of each TEXT, rendered by ``rendering`` (module docstring): ``softprompts generate`` and
    ``sp.generate``. The decoding options are checked by the decode loop (``check_decoding``: the CLI's stricter
    rule, before its model loads)."""
    rendering.check()
    spec = rendering.spec(recorded_task(adapter))
    prompts = [rendering.prompt(spec, text, base.tokenizer) for text in texts]
    return generate_texts(base, adapter, prompts, spec, max_new_tokens, sampling)



def generate_from(source: Source, texts: list[str], rendering: Rendering = AS_RECORDED, max_new_tokens: int = 32,
                  sampling: Sampling = GREEDY) -> list[str]:
    """``generate`` on what ``source`` names, its options checked before any model loads."""
    check_decoding(max_new_tokens, sampling)
    rendering.check()
    adapter, base = source.open()
    return generate(base(), texts, adapter, rendering, max_new_tokens, sampling)


__all__ = ["AS_RECORDED", "Rendering", "check_decoding", "generate", "generate_from", "recorded_task"]
