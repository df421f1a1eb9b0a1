"""Chat rows: the OpenAI / TRL ``messages`` form, rendered with the base model's own chat template.

A row ``{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}`` whose last message is the
assistant's is an example: the prompt is ``tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True)``
(as text; its special tokens are tokenized back to themselves) and the target is the last assistant content, for
generation followed by the template's end-of-turn token (so generation stops where the model's turn ends). For
classification each label's verbalization is the assistant content itself.

Placement (``PLACEMENTS``): where the soft prompt goes in the rendered conversation, marked with
``templates.VIRTUAL`` for the tokenizer to split at::

    start         before everything (the template's first token included): the virtual tokens come first
    after-system  right after the system turn (the row's, or ``system`` when the row has none)
    user-start    at the start of the last user message's content, after its role header

The text before the marker is fixed when the system turn is (and, for ``user-start``, when the conversation has a
single user turn): the serving engine then computes the KV of [that text + soft prompt] once per adapter. The
placement points are found from the template's own renderings (turn by turn, which must extend each other), never
from a template's source text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from softprompts.data.templates import VIRTUAL, check_marker_free
from softprompts.errors import DataError

PLACEMENTS = ("start", "after-system", "user-start")
# docs/RESULTS.md, section 4: on SmolLM2 chat rows the three placements tie within noise (92.8-94.0 test accuracy,
# 3 seeds); "start" is the one every method supports (KV prefixes sit before everything)
DEFAULT_PLACEMENT = "start"
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatFormat:
    """Renders ``messages`` rows with ``tokenizer``'s chat template, the soft prompt at ``placement``.

    ``system``: a system message for rows that have none (``None``: the template's own behaviour). ``task``:
    ``classify`` or ``generate`` (a generation target ends with the end-of-turn token).
    """

    tokenizer: Any
    placement: str = "start"
    system: str | None = None
    task: str = "generate"

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise DataError(f"unknown chat placement {self.placement!r}; choose one of: {', '.join(PLACEMENTS)}")
        if not getattr(self.tokenizer, "chat_template", None):
            raise DataError("this model's tokenizer has no chat template, so chat rows (messages) cannot be "
                            "rendered; use --template/--target, or a model with a chat template")

    # -- rows ---------------------------------------------------------------------------------------------------
    def check_row(self, row: dict[str, Any], where: str, needs_answer: bool = True) -> None:
        """``DataError`` naming ``where`` for anything but a conversation ending with the assistant's answer."""
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where} has no 'messages' list of {{\"role\", \"content\"}} objects")
        for k, message in enumerate(messages, start=1):
            if not isinstance(message, dict) or set(message) - {"role", "content", "name"} or "role" not in message:
                raise DataError(f"message {k} of {where} must be an object with 'role' and 'content'")
            if message["role"] not in ROLES:
                raise DataError(f"message {k} of {where} has role {message['role']!r}; roles are {', '.join(ROLES)}")
            if not isinstance(message.get("content"), str):
                raise DataError(f"message {k} of {where}: 'content' must be a string, got "
                                f"{type(message.get('content')).__name__}")
            check_marker_free(message["content"], f"message {k} of {where}")
        if needs_answer and (messages[-1]["role"] != "assistant" or len(messages) < 2):
            raise DataError(f"the last message of {where} must be the assistant's answer (the target), after at "
                            "least one user message")
        if not needs_answer and messages[-1]["role"] == "assistant":
            raise DataError(f"{where} ends with an assistant message; send the conversation up to the user's turn")

    def render(self, row: dict[str, Any]) -> tuple[str, str]:
        """(prompt with the placement marker, target) of a checked row."""
        messages = row["messages"]
        answer = messages[-1]["content"]
        target = answer + self.end_of_turn if self.task == "generate" else answer
        return self.prompt_text(messages[:-1]), target

    def render_prompt(self, row: dict[str, Any]) -> str:
        """The prompt of a conversation that ends with the user's turn (inference)."""
        self.check_row(row, "the conversation", needs_answer=False)
        return self.prompt_text(row["messages"])

    def label_of(self, row: dict[str, Any]) -> str:
        return row["messages"][-1]["content"]

    def reference(self, row: dict[str, Any]) -> str:
        """What a generation is scored against: the answer, without the end-of-turn token the target ends with."""
        return row["messages"][-1]["content"]

    def verbalize(self, label: str) -> str:
        return label

    # -- rendering ----------------------------------------------------------------------------------------------
    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)

    def conversation(self, messages: list[dict]) -> list[dict]:
        """``messages`` with ``system`` in front when they have no system message."""
        if self.system is not None and messages[0]["role"] != "system":
            return [{"role": "system", "content": self.system}, *messages]
        return list(messages)

    def prompt_text(self, messages: list[dict]) -> str:
        """The chat template's rendering of ``messages`` with the generation prompt, the marker at the placement."""
        messages = self.conversation(messages)
        full = self._render(messages, generation_prompt=True)
        lead = self._lead(messages, full)
        return lead + VIRTUAL + full[len(lead):] if lead else full  # no marker: virtual tokens first, as always

    def _lead(self, messages: list[dict], full: str) -> str:
        """The rendered text in front of the soft prompt."""
        if self.placement == "start":
            return ""
        if self.placement == "after-system":
            if messages[0]["role"] != "system":
                raise DataError("placement 'after-system' needs a system message: give the rows one, or a system "
                                "text (--system)")
            lead = self._render(messages[:1], generation_prompt=False)
        else:  # user-start: after the last user message's role header
            last = max(k for k, m in enumerate(messages) if m["role"] == "user")
            before = self._render(messages[:last], generation_prompt=False) if last else ""
            turn = self._render(messages[: last + 1], generation_prompt=False)
            content = messages[last]["content"]
            if not turn.startswith(before) or content not in turn[len(before):]:
                raise DataError("this chat template does not render turns one after another, so placement "
                                "'user-start' cannot be located; use 'start'")
            lead = turn[: len(before) + turn[len(before):].index(content)]
        if not full.startswith(lead):
            raise DataError(f"this chat template does not render turns one after another, so placement "
                            f"{self.placement!r} cannot be located; use 'start'")
        return lead

    @property
    def end_of_turn(self) -> str:
        """What the template writes right after an assistant message's content, up to its first special token
        included (``<|im_end|>`` for ChatML); ``""`` when the turn ends without one."""
        return "".join(self.end_of_turn_parts())

    def end_of_turn_parts(self) -> tuple[str, str]:
        """``(text, special)``: ``end_of_turn`` cut into the text the template writes before the special token
        that closes the assistant's turn, and that token (``("", "")`` when the turn ends without one)."""
        messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
        after = self._render(messages, False)[len(self._render(messages[:1], True)):]
        after = after[after.index("A") + 1 :] if "A" in after else after
        specials = sorted(getattr(self.tokenizer, "all_special_tokens", []) or [], key=len, reverse=True)
        for k in range(len(after)):
            for token in specials:
                if token and after.startswith(token, k):
                    return after[:k], token
        return "", ""

    def to_json(self) -> dict:
        """What ``TaskSpec.chat`` records (the template itself comes from the base model)."""
        return {"placement": self.placement, "system": self.system}


__all__ = ["DEFAULT_PLACEMENT", "PLACEMENTS", "ROLES", "ChatFormat"]
