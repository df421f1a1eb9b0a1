"""Prompt/target templates: Python format strings over a row's fields, e.g. ``"Review: {text}\\nSentiment:"``.

Only plain ``{field}`` placeholders are allowed (no ``{0}``, ``{a.b}``, ``{a[0]}``, ``{x!r}`` or ``{x:>5}``);
write ``{{`` and ``}}`` for literal braces. A row's value is inserted with ``str(value)``.

Placement: the marker ``<|virtual|>`` (``VIRTUAL``), at most once in the prompt template, puts the soft prompt at
that point of the text, e.g. ``"Classify the review.\\n<|virtual|>Review: {text}\\nSentiment:"``: the model reads
the text before it, then the virtual tokens, then the rest. Without the marker the virtual tokens come first, as
always. A row value holding the marker is refused (data must not move the soft prompt).

A template and a chat format (``chat.ChatFormat``) are both "prompt formats": ``check_row``, ``render``,
``render_prompt``, ``label_of`` and ``verbalize`` are what the data layer asks of either.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

from softprompts.errors import DataError

VIRTUAL = "<|virtual|>"  # where the soft prompt goes in a rendered prompt (see the module docstring)


def check_marker_free(value: str, what: str) -> None:
    """``DataError`` when data (a field value, a message) holds the placement marker."""
    if VIRTUAL in value:
        raise DataError(f"{what} contains {VIRTUAL!r}, the soft-prompt placement marker; remove it from the data")


def parse_fields(text: str, what: str = "template") -> list[str]:
    """The field names of ``text`` in order of appearance (with repeats); DataError on anything but ``{name}``."""
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise DataError(
            f"{what} {text!r} is not a valid template ({exc}); write fields as {{name}} and literal braces as "
            "{{ and }}"
        ) from None
    names = []
    for _literal, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise DataError(
                f"{what} {text!r} has placeholder {shown}: only plain {{field}} placeholders naming a column "
                "are supported (e.g. {text}); write literal braces as {{ and }}"
            )
        names.append(name)
    return names


def from_shell(text: str) -> str:
    """A template part typed in a shell: the two characters backslash-n are a newline."""
    return text.replace("\\n", "\n")


@dataclass(frozen=True)
class Template:
    """How a row becomes an example: ``prompt`` is what the model reads, ``target`` what it must produce.

    For classification the target has exactly one field, the label, e.g. ``" {label}"``: each label's
    verbalization (the target rendered with that label) is what rank classification scores.
    """

    prompt: str  # e.g. "Review: {text}\nSentiment:"
    target: str  # e.g. " {label}"

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not isinstance(self.target, str):
            raise DataError("template prompt and target must be strings")
        parse_fields(self.prompt, "prompt template")
        if not parse_fields(self.target, "target template"):
            raise DataError(
                f"target template {self.target!r} has no field: it must name the column to predict, e.g. ' {{label}}'"
            )
        if self.prompt.count(VIRTUAL) > 1 or VIRTUAL in self.target:
            raise DataError(f"{VIRTUAL!r} places the soft prompt: at most once, in the prompt template only")

    @classmethod
    def from_cli(cls, prompt: str, target: str) -> Template:
        """Build from shell arguments, where a newline is typically typed as the two characters backslash-n."""
        return cls(from_shell(prompt), from_shell(target))

    @property
    def prompt_fields(self) -> set[str]:
        return set(parse_fields(self.prompt))

    @property
    def target_fields(self) -> set[str]:
        return set(parse_fields(self.target))

    def fields(self) -> set[str]:
        """Every field the template reads, prompt and target."""
        return self.prompt_fields | self.target_fields

    def missing(self, row: dict[str, Any]) -> list[str]:
        """The template fields absent from ``row`` (or null there), sorted."""
        return sorted(f for f in self.fields() if row.get(f) is None)

    def check_row(self, row: dict[str, Any], where: str) -> None:
        """``DataError`` naming ``where`` when ``row`` lacks (or has null) a field the template reads."""
        missing = self.missing(row)
        if missing:
            state = "is null" if missing[0] in row else "is missing"
            raise DataError(
                f"template field {missing[0]!r} {state} in {where}; available fields: "
                f"{', '.join(sorted(map(str, row))) or '(none)'} (edit the template or the data)"
            )

    def _values(self, row: dict[str, Any], names: set[str]) -> dict[str, str]:
        values = {f: str(row[f]) for f in names}
        if VIRTUAL in self.prompt:
            for name, value in values.items():
                check_marker_free(value, f"field {name!r}")
        return values

    def render(self, row: dict[str, Any]) -> tuple[str, str]:
        """(prompt, target) for one row; DataError naming a missing field and the fields the row has."""
        missing = self.missing(row)
        if missing:
            raise DataError(
                f"template field {missing[0]!r} is missing from the row; available fields: "
                f"{', '.join(sorted(map(str, row))) or '(none)'}"
            )
        values = self._values(row, self.fields())
        return self.prompt.format(**values), self.target.format(**values)

    def render_prompt(self, row: dict[str, Any]) -> str:
        """Only the prompt (e.g. at inference, where the row has no target)."""
        missing = sorted(f for f in self.prompt_fields if row.get(f) is None)
        if missing:
            raise DataError(
                f"prompt field {missing[0]!r} is missing; available fields: "
                f"{', '.join(sorted(map(str, row))) or '(none)'}"
            )
        return self.prompt.format(**self._values(row, self.prompt_fields))

    @property
    def label_field(self) -> str:
        """The target's one field, the label (classification)."""
        fields = self.target_fields
        if len(fields) != 1:
            raise DataError(
                f"for task 'classify' the target template must have exactly one field, the label (e.g. ' {{label}}'); "
                f"{self.target!r} has {len(fields)}: {', '.join(sorted(fields))}"
            )
        return next(iter(fields))

    def label_of(self, row: dict[str, Any]) -> str:
        return str(row[self.label_field])

    def reference(self, row: dict[str, Any]) -> str | None:
        """What a generation is scored against besides the rendered target: nothing (the target is it)."""
        return None

    def verbalize(self, label: str) -> str:
        """The target rendered with ``label``: what rank classification scores for it."""
        return self.target.format(**{self.label_field: label})

    def to_dict(self) -> dict[str, str]:
        return {"prompt": self.prompt, "target": self.target}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Template:
        try:
            return cls(data["prompt"], data["target"])
        except (KeyError, TypeError):
            raise DataError(f"a template needs 'prompt' and 'target' strings, got {data!r}") from None
