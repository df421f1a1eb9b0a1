"""Text-side helpers of the server: stop strings (a body's, where a text ends, when a generation stops: each row's
text decoded once, incrementally, as its tokens come), streaming hold-back, classification prompts and label
targets."""

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
        """The text of ``tokens`` up to the earliest stop string that counts (excluded), and whether one did: the
        whole sequence decoded once (a finished answer; a growing one: ``StopWatch``)."""
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if not self.stops or len(tokens) < self.min_tokens:
            return text, False
        held = len(tokenizer.decode(tokens[: self.min_tokens], skip_special_tokens=True)) if self.min_tokens else 0
        found = [i for i in (text.find(s, max(0, held - len(s) + 1)) for s in self.stops) if i >= 0]
        return (text[: min(found)], True) if found else (text, False)

    def check(self, tokenizer) -> Callable[[list[int]], bool] | None:
        """What ends a generation early: a new ``StopWatch`` over one row's tokens (``None`` without stops)."""
        if not self.stops:
            return None
        return StopWatch(self, tokenizer)


class IncrementalText:
    """The text of a growing token sequence, each token decoded once (with a short lookback), equal to decoding
    the whole sequence (``tokenizer.decode(tokens, skip_special_tokens=True)``) after every ``extend``.

    The decoded prefix is kept; a step decodes only the window ``tokens[start:]``, where ``start`` is the previous
    commit point, and appends what it adds beyond ``tokens[start:done]``'s own text (the lookback lets a tokenizer
    that drops a word's leading space at the start of a decode, or merges across tokens, give the same text as in
    the whole). New text is committed only when it does not end in U+FFFD: a multi-byte character split across
    tokens stays pending (shown as U+FFFD, as the whole decode shows it) until its last byte arrives; nor after a
    byte-fallback token (``<0xNN>``, SentencePiece), whose run of bytes decodes all or nothing: a later byte can
    still turn the whole run into U+FFFDs. A tokenizer that cleans up spaces across the whole text
    (``clean_up_tokenization_spaces``) is decoded whole every time."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self._whole = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
        self._special = frozenset(tokenizer.all_special_ids)
        self._done = ""  # the text of tokens[:self._read], final
        self._start = self._read = 0  # the lookback window's start; tokens whose text is final
        self._pending = ""  # the text of tokens[self._read:] as it reads now

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True) if tokens else ""

    @property
    def text(self) -> str:
        return self._done + self._pending

    def _in_byte_run(self) -> bool:
        """Whether the last token that is not a special one (those are skipped: the bytes on both sides join) is
        a byte-fallback token (``<0xNN>``)."""
        last = next((t for t in reversed(self.tokens) if t not in self._special), None)
        name = self.tokenizer.convert_ids_to_tokens(last) if last is not None else None
        return isinstance(name, str) and len(name) == 6 and name.startswith("<0x") and name.endswith(">")

    @property
    def stable(self) -> int:
        """How many leading characters of ``text`` no later token can change."""
        return len(self._done)

    def extend(self, tokens: list[int]) -> str:
        """Append ``tokens``; the whole text now."""
        if not tokens:
            return self.text
        self.tokens.extend(tokens)
        if self._whole:
            self._pending = self._decode(self.tokens)
            return self._pending
        window = self._decode(self.tokens[self._start:])
        seen = len(self._decode(self.tokens[self._start:self._read]))
        if len(window) > seen and not window.endswith("\ufffd") and not self._in_byte_run():
            self._done += window[seen:]
            self._start, self._read, self._pending = self._read, len(self.tokens), ""
        else:
            self._pending = window[seen:]
        return self.text


class StopWatch:
    """One row's stop strings over its growing tokens (a generation request's ``stop_check``, a stream's cut):
    the text decoded incrementally (``IncrementalText``) and only its new part searched, answering what
    ``StopStrings.cut`` answers on the whole sequence. The tokens it is given must only grow."""

    def __init__(self, stops: StopStrings, tokenizer) -> None:
        self.stops = stops
        self.text = IncrementalText(tokenizer)
        self._held: int | None = None  # characters of the first min_tokens tokens' text
        self._searched = 0  # characters of final text searched: no stop string lies wholly inside them

    def cut(self, tokens: list[int]) -> tuple[str, bool]:
        """``StopStrings.cut(tokenizer, tokens)``, from the tokens not seen before."""
        seen, upto = len(self.text.tokens), self.stops.min_tokens
        if self._held is None and len(tokens) >= upto:
            self.text.extend(tokens[seen:upto])
            self._held, seen = len(self.text.text) if upto else 0, max(seen, upto)
        text = self.text.extend(tokens[seen:])
        if not self.stops.stops or self._held is None:
            return text, False
        found = [i for i in (text.find(s, max(0, self._held - len(s) + 1, self._searched - len(s) + 1))
                             for s in self.stops.stops) if i >= 0]
        if not found:
            self._searched = self.text.stable
            return text, False
        return text[: min(found)], True

    def __call__(self, tokens: list[int]) -> bool:
        return self.cut(tokens)[1]


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
