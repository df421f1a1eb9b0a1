"""The task flags every command shares (``--placement``, ``--system``, ``--labels``); the task they describe is
loaded below the command line, by ``workflow.load_task``."""

from __future__ import annotations

from softprompts.data.chat import DEFAULT_PLACEMENT, PLACEMENTS
from softprompts.data.templates import VIRTUAL
from softprompts.task_spec import TaskSpec


def add_chat_flags(p) -> None:
    p.add_argument("--placement", default=None, choices=PLACEMENTS,
                   help=f"chat data: where the virtual tokens go (default {DEFAULT_PLACEMENT}); a template places "
                        f"them with the marker {VIRTUAL} instead")
    p.add_argument("--system", default=None, help="chat data: a system message for rows that have none")


def label_list(text: str | None) -> list[str] | None:
    """``--labels`` as a list (comma-separated, blanks dropped); ``None`` when not given."""
    return [x.strip() for x in text.split(",") if x.strip()] or None if text else None


def task_labels(text: str | None, task: str, previous: TaskSpec | None = None) -> list[str] | None:
    """The label set of a task from ``--labels`` (``workflow.task_labels``: else the ``previous`` task's when it is
    the same kind of task; ``None``: the labels found in the data; labels with a generate task are an error)."""
    from softprompts.workflow.inputs import task_labels as labels_of

    return labels_of(label_list(text), task, previous)


__all__ = ["add_chat_flags", "label_list", "task_labels"]
