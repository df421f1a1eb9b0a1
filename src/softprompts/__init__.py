"""softprompts: adapt a frozen language model with learned continuous prompts.

    import softprompts as sp
    base = sp.load_base("smollm2-135m")                      # embedded default, an HF id or a local directory
    method = sp.create_method(base, "prefix", num_virtual_tokens=10, init_text="Sentiment of the review:")
    adapter = sp.Adapter.from_method(method, base)           # materialized: MLP folded in, dropped
    sp.save_adapter(adapter, "my-adapter")                  # adapter.json + adapter.safetensors, atomic
    adapter = sp.load_adapter("my-adapter", base)            # refuses an adapter made for another model
    print(sp.generate(base, "Review: great film\\nSentiment:", adapter, max_new_tokens=3))

    method = sp.build_method(base, "prompt", spec)         # the measured defaults for a task (a TaskSpec)
    result = sp.train(base, method, examples, spec, sp.TrainConfig(steps=100, lr=method.default_lr))

    result = sp.train_cartridge(base, ["manual.md"], sp.TrainConfig(steps=200, lr=2e-2), out_dir="manual-cartridge")

    model = sp.wrap("smollm2-135m", "prompt", num_virtual_tokens=20)  # an nn.Module for transformers.Trainer / TRL

The layers, ground up, and what each owns: docs/ARCHITECTURE.md.
"""

import softprompts.third_party_logs  # noqa: F401  (first: before transformers imports torchao)
from softprompts.adapter import Adapter, AdapterError, AdapterMismatchError, BaseWeightsWarning
from softprompts.adapter_io import load_adapter, save_adapter
from softprompts.api import generate, next_token_logits
from softprompts.errors import SoftpromptsError
from softprompts.interop.hf_model import PromptModel, wrap
from softprompts.methods import METHODS, build_method, create_method
from softprompts.model.artifacts import KVPrefix, SoftPrompt
from softprompts.model.base import BaseModel
from softprompts.model.decode import generate_ids
from softprompts.model.encoder_decoder_base import EncoderDecoderBase
from softprompts.model.frozen import FrozenBase
from softprompts.model.generation import Sampling
from softprompts.model.inject import VirtualContext, forward
from softprompts.model.load import DEFAULT_MODEL, load_base
from softprompts.tasks import TaskSpec
from softprompts.training import SelfStudyConfig, TrainConfig, TrainResult, train, train_cartridge

__version__ = "0.1.0"

__all__ = [
    "Adapter", "AdapterError", "AdapterMismatchError", "BaseModel", "BaseWeightsWarning", "DEFAULT_MODEL",
    "EncoderDecoderBase", "FrozenBase", "KVPrefix", "METHODS", "PromptModel", "Sampling", "SelfStudyConfig",
    "SoftPrompt", "SoftpromptsError", "TaskSpec", "TrainConfig", "TrainResult", "VirtualContext",
    "build_method", "create_method", "forward", "generate", "generate_ids", "load_adapter", "load_base",
    "next_token_logits", "save_adapter", "train", "train_cartridge", "wrap",
]
