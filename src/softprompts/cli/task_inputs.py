"""The task flags every command shares (``--placement``, ``--system``, ``--labels``); the task they describe is
loaded below the command line, by ``workflow.load_task``."""

from __future__ import annotations

from softprompts.data.chat import DEFAULT_PLACEMENT, PLACEMENTS
from softprompts.data.templates import VIRTUAL
from softprompts.errors import SoftpromptsError
from softprompts.task_spec import TaskSpec


def add_chat_flags(p) -> None:
    p.add_argument("--placement", default=None, choices=PLACEMENTS,
                   help=f"chat data: where the virtual tokens go (default {DEFAULT_PLACEMENT}); a template places "
                        f"them with the marker {VIRTUAL} instead")
    p.add_argument("--system", default=None, help="chat data: a system message for rows that have none")


def task_labels(text: str | None, task: str, previous: TaskSpec | None = None) -> list[str] | None:
    """The label set of a task: ``--labels`` (comma-separated), else the ``previous`` task's when it is the same
    kind of task; ``None``: the labels found in the data. ``--labels`` with a generate task is an error."""
    labels = [x.strip() for x in text.split(",") if x.strip()] if text else None
    if labels and task != "classify":
        raise SoftpromptsError(f"--labels is for --task classify: a {task} task has no label set")
    return labels or (previous.labels if previous is not None and previous.task == task else None)


__all__ = ["add_chat_flags", "task_labels"]
