"""Per-method training defaults, chosen by measurement (docs/DEFAULTS.md: the sweep, its numbers and commit).

Measured on SmolLM2-135M-Instruct with the bundled UCI sentiment data (DATA.md: learning rate and init dominate
prompt-based methods; PEFT's prefix default of lr 1e-3 from a random start ended below the bare model).
Every default can be overridden on the command line (``--lr``, ``--virtual-tokens``, ``--init``).
"""

from __future__ import annotations

from dataclasses import dataclass

from softprompts.tasks import TaskSpec


@dataclass(frozen=True)
class MethodDefaults:
    lr: float
    num_virtual_tokens: int = 20
    init: str = "text"


# lr per method from the sweep in docs/DEFAULTS.md
METHOD_DEFAULTS: dict[str, MethodDefaults] = {
    "prompt": MethodDefaults(lr=3e-2),
    "ptuning": MethodDefaults(lr=3e-3),  # 1e-2 ends below the bare model on mr (docs/DEFAULTS.md rows 8-10)
    "prefix": MethodDefaults(lr=3e-4, num_virtual_tokens=10),
    "deep": MethodDefaults(lr=3e-3, num_virtual_tokens=10),
}


def method_defaults(name: str) -> MethodDefaults:
    from softprompts.methods import method_class

    return METHOD_DEFAULTS[method_class(name).name]


def default_init_text(spec: TaskSpec) -> str:
    """A task instruction to initialize virtual tokens from (their embeddings, or their KV for prefixes)."""
    if spec.task == "classify" and spec.labels:
        return f"Classify the text. Answer with one of: {', '.join(spec.labels)}.\n"
    return "Read the input and write the expected output.\n"
