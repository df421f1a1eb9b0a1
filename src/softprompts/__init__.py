"""softprompts: adapt a frozen language model with learned continuous prompts.

    import softprompts as sp
    base = sp.load_base("smollm2-135m")                      # embedded default, an HF id or a local directory
    method = sp.create_method(base, "prefix", num_virtual_tokens=10, init_text="Sentiment of the review:")
    adapter = sp.Adapter.from_method(method, base)           # materialized: MLP folded in, dropped
    sp.save_adapter(adapter, "my-adapter")                  # adapter.json + adapter.safetensors, atomic
    adapter = sp.load_adapter("my-adapter", base)            # refuses an adapter made for another model
    print(sp.generate(base, "Review: great film\\nSentiment:", adapter, max_new_tokens=3))
"""

from softprompts.adapter import Adapter, AdapterError, AdapterMismatchError
from softprompts.adapter_io import load_adapter, save_adapter
from softprompts.api import generate, next_token_logits
from softprompts.errors import SoftpromptsError
from softprompts.methods import METHODS, create_method
from softprompts.model.artifacts import KVPrefix, SoftPrompt
from softprompts.model.base import BaseModel
from softprompts.model.decode import Sampling, generate_ids
from softprompts.model.inject import VirtualContext, forward
from softprompts.model.load import DEFAULT_MODEL, load_base

__version__ = "0.1.0"

__all__ = [
    "Adapter", "AdapterError", "AdapterMismatchError", "BaseModel", "DEFAULT_MODEL", "KVPrefix", "METHODS",
    "Sampling", "SoftPrompt", "SoftpromptsError", "VirtualContext", "create_method", "forward", "generate",
    "generate_ids", "load_adapter", "load_base", "next_token_logits", "save_adapter",
]
