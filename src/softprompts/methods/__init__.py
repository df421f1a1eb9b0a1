"""The four methods, one file each, and a registry from name to class."""

from __future__ import annotations

from softprompts.methods.base import MethodConfig, PromptMethod
from softprompts.methods.deep_prompt import DeepPrompt, DeepPromptConfig
from softprompts.methods.p_tuning import PTuning, PTuningConfig
from softprompts.methods.prefix_tuning import PrefixTuning, PrefixTuningConfig
from softprompts.methods.prompt_tuning import PromptTuning, PromptTuningConfig

METHODS: dict[str, type[PromptMethod]] = {cls.name: cls for cls in (PromptTuning, PTuning, PrefixTuning, DeepPrompt)}
ALIASES = {"prompt_tuning": "prompt", "p_tuning": "ptuning", "p-tuning": "ptuning", "prefix_tuning": "prefix",
           "deep_prompt": "deep", "ptuning_v2": "deep", "p-tuning-v2": "deep"}


def method_class(name: str) -> type[PromptMethod]:
    key = ALIASES.get(name, name)
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[key]


def create_method(
    base, name: str, labels: list[str] | None = None, init_text: str | None = None, init_artifact=None, **options
) -> PromptMethod:
    """Build method ``name`` on ``base`` with config ``options`` (validated all at once).

    ``init_artifact``: start from a saved artifact (continue training): its length sets ``num_virtual_tokens``; with
    a reparameterized method the encoder starts at zero on top of it, so step 0 reproduces the saved adapter.
    """
    cls = method_class(name)
    if init_artifact is not None:
        options["num_virtual_tokens"] = init_artifact.length
    config = cls.config_class.from_options(**options)
    return cls(base, config, labels=labels, init_text=init_text, init_artifact=init_artifact).to(base.device)


__all__ = ["METHODS", "MethodConfig", "PromptMethod", "create_method", "method_class",
           "PromptTuningConfig", "PTuningConfig", "PrefixTuningConfig", "DeepPromptConfig"]
