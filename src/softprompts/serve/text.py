"""Text-side helpers of the server: stop strings (a body's, where a text ends, when a generation stops), streaming
hold-back, classification prompts and label targets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from softprompts.data.chat import ChatFormat
from softprompts.data.datasets import check_labels, label_targets
from softprompts.data.templates import parse_fields
from softprompts.errors import SoftpromptsError
from softprompts.task_spec import TaskSpec


@dataclass(frozen=True)
class StopStrings:
    """A body's stop strings (the non-empty ones): the answer's text ends before the earliest one. With
    ``min_tokens``, only a stop string that ends after the text of the first ``min_tokens`` tokens counts."""

    stops: tuple[str, ...] = ()
    min_tokens: int = 0

    @classmethod
    def of(cls, stop: str | list[str] | None, min_tokens: int = 0) -> StopStrings:
        given = [stop] if isinstance(stop, str) else list(stop or [])
        return cls(tuple(s for s in given if s), min_tokens)

    def cut(self, tokenizer, tokens: list[int]) -> tuple[str, bool]:
        """The text of ``tokens`` up to the earliest stop string that counts (excluded), and whether one did."""
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if not self.stops or len(tokens) < self.min_tokens:
            return text, False
        held = len(tokenizer.decode(tokens[: self.min_tokens], skip_special_tokens=True)) if self.min_tokens else 0
        found = [i for i in (text.find(s, max(0, held - len(s) + 1)) for s in self.stops) if i >= 0]
        return (text[: min(found)], True) if found else (text, False)

    def check(self, tokenizer) -> Callable[[list[int]], bool] | None:
        """What ends a generation early: whether its tokens' text holds a stop string that counts (``None``
        without stops)."""
        if not self.stops:
            return None
        return lambda ids: self.cut(tokenizer, ids)[1]


def stream_safe_length(text: str, stops: tuple[str, ...]) -> int:
    """How much of ``text`` can be streamed now: hold back a tail that may start a stop string, or an
    incomplete UTF-8 character (decoded as U+FFFD)."""
    safe = len(text)
    while safe and text[safe - 1] == "\ufffd":
        safe -= 1
    for stop in stops:
        for k in range(min(len(stop) - 1, safe), 0, -1):
            if text[:safe].endswith(stop[:k]):
                safe = min(safe, len(text[:safe]) - k)
                break
    return safe


def _fill(template: str, value: str) -> str:
    fields = sorted(set(parse_fields(template)))
    if len(fields) != 1:
        raise SoftpromptsError(f"template {template!r} needs exactly one field to fill with a text, has {fields}")
    return template.format(**{fields[0]: value})


def label_texts(task: TaskSpec | None, labels: list[str], chat: ChatFormat | None = None) -> list[str]:
    """Each label's verbalization: the adapter's target template rendered with it (``TaskSpec.label_format``:
    ``" {label}"`` if none); a chat task's labels are the assistant's answers themselves."""
    return label_targets(chat or (task or TaskSpec()).label_format(), labels)


def classify_prompts(
    task: TaskSpec | None, texts: list, labels: list[str] | None, name: str, chat: ChatFormat | None = None,
) -> tuple[list[str], list[str], list[str]]:
    """``(labels, prompts, label targets)`` for rank classification with an adapter's task metadata.

    A text string fills the prompt template's single field; a dict fills its fields by name; without a prompt
    template the text is the prompt. With ``chat`` (a chat adapter) a text is the user's message, rendered with the
    model's chat template and the adapter's placement. Labels come from the request or else from ``adapter.json``,
    under the label rule training applies (``data.datasets.check_labels``: two or more, unique, distinct non-blank
    targets).
    """
    task = task or TaskSpec()
    given = labels is not None
    labels = list(labels if given else task.labels or [])
    if not labels:
        raise SoftpromptsError(
            f"adapter {name!r} has no labels (task {task.task!r}); pass 'labels' or use a classification adapter"
        )
    fmt = chat or task.label_format()
    labels = check_labels(fmt, labels, "the request's labels" if given else f"adapter {name!r}")
    if chat is not None:
        if not all(isinstance(text, str) for text in texts):
            raise SoftpromptsError(f"adapter {name!r} is a chat adapter: send each text as the user's message string")
        prompts = [chat.render_prompt({"messages": [{"role": "user", "content": text}]}) for text in texts]
        return labels, prompts, label_texts(task, labels, chat)
    template = task.prompt
    prompts = []
    for text in texts:
        if isinstance(text, dict):
            if not template:
                raise SoftpromptsError(f"adapter {name!r} has no prompt template: send texts as strings")
            try:
                prompts.append(template.format(**text))
            except KeyError as exc:
                raise SoftpromptsError(f"text is missing template field {exc.args[0]!r}") from None
        else:
            prompts.append(_fill(template, text) if template else text)
    return labels, prompts, label_texts(task, labels)
