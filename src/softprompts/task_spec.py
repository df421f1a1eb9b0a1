"""The task record: what an adapter was made for, as a typed, torch-free value (``TaskSpec``, ``ChatSpec``).

It sits below the adapter (``adapter.Adapter.task`` holds one) and above the data layer it names (``Template``,
``ChatFormat``): tokenization, truncation and batching by it live in ``tasks.py``. On disk it is the ``task`` object
of ``adapter.json`` and of each entry of ``table.json`` (``codec.py`` reads and writes it)::

    {"task": "classify", "prompt": "Review: {text}\\nSentiment:", "target": " {label}", "labels": ["neg", "pos"],
     "max_prompt_tokens": 256, "max_target_tokens": 64, "chat": null}

A record may be partial (an adapter saved with ``task={"task": "generate"}`` or ``{"labels": [...]}``): a field not
recorded is ``None`` (``task``, ``prompt``, ``target``, ``labels``, ``chat``) or the default limit. The defaults a
reader needs for a missing part are here, once: a missing prompt template sends the text as is (``DEFAULT_PROMPT``),
a missing target verbalizes a label as ``" {label}"`` (``DEFAULT_TARGET``), a missing chat placement is
``data.chat.DEFAULT_PLACEMENT``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from softprompts.data.chat import DEFAULT_PLACEMENT, PLACEMENTS, ChatFormat
from softprompts.data.datasets import PromptFormat
from softprompts.data.templates import Template
from softprompts.errors import SoftpromptsError

TASKS = ("classify", "generate")
DEFAULT_PROMPT = "{text}"  # no prompt template recorded: the text is the prompt
DEFAULT_TARGET = " {label}"  # no target template recorded: a label's verbalization


@dataclass(frozen=True)
class ChatSpec:
    """How a chat task's prompts are built: where the soft prompt goes (``data.chat.PLACEMENTS``) and a system
    message for rows without one (``None``: the chat template's own behaviour)."""

    placement: str = DEFAULT_PLACEMENT
    system: str | None = None

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise SoftpromptsError(f"unknown chat placement {self.placement!r}; choose one of: {', '.join(PLACEMENTS)}")

    def format(self, tokenizer, task: str | None = None) -> ChatFormat:
        """The ``ChatFormat`` that renders this chat task's rows with ``tokenizer``'s chat template."""
        return ChatFormat(tokenizer, self.placement, self.system, task or "generate")

    def to_json(self) -> dict:
        return {"placement": self.placement, "system": self.system}

    @classmethod
    def from_json(cls, data: dict | ChatSpec | None) -> ChatSpec | None:
        if data is None or isinstance(data, ChatSpec):
            return data
        return cls(data.get("placement") or DEFAULT_PLACEMENT, data.get("system"))


@dataclass(frozen=True)
class TaskSpec:
    """What an adapter was trained for; saved as ``adapter.task`` so eval/generate/serve need no flags.

    task: ``classify`` (rank classification over ``labels``) or ``generate`` (``None``: not recorded).
    prompt / target: the template's format strings, e.g. ``"Review: {text}\\nSentiment:"`` and ``" {label}"``
        (``None``: not recorded).
    labels: class labels (classify only), in order.
    max_prompt_tokens / max_target_tokens: truncation limits (``tasks.py``): a prompt keeps its last
        ``max_prompt_tokens`` tokens, a target its first ``max_target_tokens``.
    chat: for chat data, a ``ChatSpec`` (placement, system; a ``{"placement", "system"}`` dict is converted); prompt
        and target are then unused (the base model's chat template renders the rows).
    """

    task: str | None = None
    prompt: str | None = None
    target: str | None = None
    labels: list[str] | None = None
    max_prompt_tokens: int = 256
    max_target_tokens: int = 64
    chat: ChatSpec | None = None

    def __post_init__(self) -> None:
        problems = [f"{name} must be a positive integer, got {value!r}"
                    for name, value in (("--max-prompt-tokens", self.max_prompt_tokens),
                                        ("--max-target-tokens", self.max_target_tokens))
                    if not isinstance(value, int) or isinstance(value, bool) or value < 1]
        if self.task is not None and self.task not in TASKS:
            problems.append(f"unknown task {self.task!r}; choose one of: {', '.join(TASKS)}")
        if problems:
            raise SoftpromptsError("; ".join(problems))
        if isinstance(self.chat, dict):
            object.__setattr__(self, "chat", ChatSpec.from_json(self.chat))
        if self.labels is not None:
            object.__setattr__(self, "labels", list(self.labels))

    @property
    def template(self) -> Template:
        """The prompt template of a template task (a chat task has none: use ``prompt_format``)."""
        if self.chat is not None:
            raise SoftpromptsError("this is a chat task: its prompts come from the model's chat template")
        if self.prompt is None:
            raise SoftpromptsError("this task records no prompt template (pass --template and --target)")
        return Template(self.prompt, self.target if self.target is not None else DEFAULT_TARGET)

    def prompt_format(self, tokenizer) -> PromptFormat:
        """What renders this task's rows: its ``Template``, or a ``ChatFormat`` over ``tokenizer``."""
        if self.chat is None:
            return self.template
        return self.chat.format(tokenizer, self.task)

    def label_format(self, tokenizer=None) -> PromptFormat:
        """What verbalizes this task's labels: its chat format (``tokenizer`` given), else its template with the
        defaults for a part not recorded (``DEFAULT_PROMPT``, ``DEFAULT_TARGET``)."""
        if self.chat is not None and tokenizer is not None:
            return self.chat.format(tokenizer, self.task)
        return Template(self.prompt or DEFAULT_PROMPT, self.target or DEFAULT_TARGET)

    @property
    def renders_text(self) -> bool:
        """Whether the record can render a text: it has a prompt template or a chat placement."""
        return bool(self.prompt) or self.chat is not None

    @classmethod
    def for_chat(cls, task: str, labels: list[str] | None, placement: str = DEFAULT_PLACEMENT,
                 system: str | None = None, **limits) -> TaskSpec:
        return cls(task, "", "{label}", labels, chat=ChatSpec(placement, system), **limits)

    def to_json(self) -> dict:
        """The record as saved (every field, in field order: ``adapter.json``'s ``task``)."""
        data: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        data["labels"] = None if self.labels is None else list(self.labels)
        data["chat"] = None if self.chat is None else self.chat.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict) -> TaskSpec:
        """A record from its saved form (unknown keys ignored, missing ones not recorded); ``SoftpromptsError``
        for a record with no task kind (nothing to evaluate or render with)."""
        if not data or not data.get("task"):
            raise SoftpromptsError("the adapter has no task metadata (template/labels); pass them explicitly")
        return cls.from_record(data)

    @classmethod
    def from_record(cls, data: dict) -> TaskSpec:
        """``from_json`` for a partial record (``codec.py``: a document's ``task``, already validated)."""
        known = {f.name for f in fields(cls)}
        given = {k: v for k, v in data.items() if k in known and v is not None}
        return cls(**{**given, "chat": ChatSpec.from_json(data.get("chat"))})


__all__ = ["DEFAULT_PROMPT", "DEFAULT_TARGET", "TASKS", "ChatSpec", "TaskSpec"]
