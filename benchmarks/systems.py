"""The two systems the training benchmarks time, built the same way for every method: our method and its PEFT
counterpart (the same config ``softprompts compare`` runs: ``peft_type`` / ``peft_options`` on the method class).

Encoder widths (the prefix MLP, the P-tuning MLP) are ``width`` in both systems; inits are random in both (PEFT's
default), so neither system starts from a text.
"""

from __future__ import annotations

import warnings
from dataclasses import fields

from softprompts.compare.peft_baseline import PeftSpec, import_peft, peft_config
from softprompts.methods import MethodConfig, PromptMethod, create_method, method_class
from softprompts.model.decoder.base import BaseModel

WIDTH_OPTIONS = ("projection_dim", "projection_hidden", "encoder_hidden")  # whichever a method's config has


def method_options(name: str, virtual: int, width: int) -> dict:
    """Config options of method ``name``: ``virtual`` tokens, random init, every encoder width set to ``width``."""
    known = {f.name for f in fields(method_class(name).config_class)}
    return {"num_virtual_tokens": virtual, "init": "random", **{k: width for k in WIDTH_OPTIONS if k in known}}


def our_method(base: BaseModel, name: str, virtual: int, width: int) -> PromptMethod:
    return create_method(base, name, **method_options(name, virtual, width))


def peft_model(base: BaseModel, name: str, virtual: int, width: int):
    """``peft.get_peft_model(base.model, config)`` for the PEFT counterpart of ``name`` at the same sizes."""
    peft = import_peft()
    config: MethodConfig = method_class(name).config_class.from_options(**method_options(name, virtual, width))
    spec = PeftSpec(method=name, method_config=config, config=None, hidden_size=base.shapes.hidden_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(base.model, peft_config(peft, spec, None))
