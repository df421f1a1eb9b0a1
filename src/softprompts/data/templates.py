"""Prompt/target templates: Python format strings over a row's fields, e.g. ``"Review: {text}\\nSentiment:"``.

Only plain ``{field}`` placeholders are allowed (no ``{0}``, ``{a.b}``, ``{a[0]}``, ``{x!r}`` or ``{x:>5}``);
write ``{{`` and ``}}`` for literal braces. A row's value is inserted with ``str(value)``.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

from softprompts.errors import DataError


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

    @classmethod
    def from_cli(cls, prompt: str, target: str) -> Template:
        """Build from shell arguments, where a newline is typically typed as the two characters backslash-n."""
        return cls(prompt.replace("\\n", "\n"), target.replace("\\n", "\n"))

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

    def render(self, row: dict[str, Any]) -> tuple[str, str]:
        """(prompt, target) for one row; DataError naming a missing field and the fields the row has."""
        missing = self.missing(row)
        if missing:
            raise DataError(
                f"template field {missing[0]!r} is missing from the row; available fields: "
                f"{', '.join(sorted(map(str, row))) or '(none)'}"
            )
        values = {f: str(row[f]) for f in self.fields()}
        return self.prompt.format(**values), self.target.format(**values)

    def render_prompt(self, row: dict[str, Any]) -> str:
        """Only the prompt (e.g. at inference, where the row has no target)."""
        missing = sorted(f for f in self.prompt_fields if row.get(f) is None)
        if missing:
            raise DataError(
                f"prompt field {missing[0]!r} is missing; available fields: "
                f"{', '.join(sorted(map(str, row))) or '(none)'}"
            )
        return self.prompt.format(**{f: str(row[f]) for f in self.prompt_fields})

    def to_dict(self) -> dict[str, str]:
        return {"prompt": self.prompt, "target": self.target}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Template:
        try:
            return cls(data["prompt"], data["target"])
        except (KeyError, TypeError):
            raise DataError(f"a template needs 'prompt' and 'target' strings, got {data!r}") from None
