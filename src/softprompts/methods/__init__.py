"""The methods, one file each; importing a method's file registers it (``PromptMethod.__init_subclass__``).

Adding a method: one file here (config dataclass, module, declarations; see ``base.py``) plus its import line below.

    METHODS                                  # name -> class, in this order
    method_class("p-tuning")                 # a name or an alias -> the class
    create_method(base, "prefix", num_virtual_tokens=10, init_text="...")   # a method from config options
    build_method(base, "prefix", spec, seed=0, init=None)   # its measured defaults for a task (None = default)
"""

from __future__ import annotations

from softprompts.methods.base import ALIASES, REGISTRY, PromptMethod
from softprompts.methods.config import MethodConfig, MethodError
from softprompts.methods.init import task_init_text
from softprompts.model.artifacts import Artifact
from softprompts.model.frozen import FrozenBase

# One line per method; importing a method's file registers it, and the order of these lines is the order of METHODS.
# isort: off
from softprompts.methods.prompt_tuning import PromptTuning, PromptTuningConfig
from softprompts.methods.p_tuning import PTuning, PTuningConfig
from softprompts.methods.residual_prompt import ResidualPrompt, ResidualPromptConfig
from softprompts.methods.prefix_tuning import PrefixTuning, PrefixTuningConfig
from softprompts.methods.deep_prompt import DeepPrompt, DeepPromptConfig
from softprompts.methods.dept import Dept, DeptConfig
from softprompts.methods.cartridge import Cartridge, CartridgeConfig
# isort: on

METHODS: dict[str, type[PromptMethod]] = REGISTRY


def method_class(name: str) -> type[PromptMethod]:
    """The method class for a name or an alias; ``MethodError`` listing the choices otherwise."""
    key = ALIASES.get(name, name)
    if key not in METHODS:
        raise MethodError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[key]


def create_method(
    base: FrozenBase, name: str, labels: list[str] | None = None, init_text: str | None = None,
    init_artifact: Artifact | None = None, **options,
) -> PromptMethod:
    """Build method ``name`` on ``base`` with config ``options`` (validated all at once; unset ones take the
    method's defaults).

    ``init_artifact``: start from a saved artifact (continue training): its length sets ``num_virtual_tokens``; with
    a reparameterized method the encoder starts at zero on top of it, so step 0 reproduces the saved adapter.
    """
    cls = method_class(name)
    if init_artifact is not None:
        options["num_virtual_tokens"] = init_artifact.length
    config = cls.config_class.from_options(**options)
    return cls(base, config, labels=labels, init_text=init_text, init_artifact=init_artifact).to(base.device)


def build_method(base: FrozenBase, name: str, spec=None, seed: int = 0, **overrides) -> PromptMethod:
    """Method ``name`` with its defaults for a task, what the command line, ``compare`` and the demo train.

    ``spec`` (a ``tasks.TaskSpec``, or anything with ``task`` and ``labels``): its labels serve ``init="labels"``
    and its task instruction (``task_init_text``) is the ``init_text`` virtual tokens start from. ``overrides``:
    config options and ``init_text`` / ``init_artifact``; ``None`` means "the default", so command-line flags can
    be passed as they are (an explicit value, even ``0``, is validated, never replaced).
    """
    options = {key: value for key, value in overrides.items() if value is not None}
    labels = getattr(spec, "labels", None)
    if not options.get("init_text") and spec is not None:
        options["init_text"] = task_init_text(spec.task, labels)
    init_text = options.pop("init_text", None)
    init_artifact = options.pop("init_artifact", None)
    return create_method(base, name, labels=labels, init_text=init_text, init_artifact=init_artifact, seed=seed,
                         **options)


__all__ = ["METHODS", "Cartridge", "CartridgeConfig", "DeepPrompt", "DeepPromptConfig", "Dept", "DeptConfig",
           "MethodConfig", "MethodError", "PTuning", "PTuningConfig", "PrefixTuning", "PrefixTuningConfig",
           "PromptMethod", "PromptTuning", "PromptTuningConfig", "ResidualPrompt", "ResidualPromptConfig",
           "build_method", "create_method", "method_class", "task_init_text"]
