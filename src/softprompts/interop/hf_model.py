"""``sp.wrap``: a prompt method on a frozen model as one ``torch.nn.Module``, for ``transformers.Trainer`` and TRL.

    model = sp.wrap("smollm2-135m", "prompt", num_virtual_tokens=20, init_text="Classify the review.")
    Trainer(model=model, args=TrainingArguments(...), train_dataset=tokenized).train()
    model.save_adapter("my-adapter", task={"task": "generate"})     # our format: the CLI and the server load it
    model = sp.wrap("smollm2-135m", adapter="my-adapter")          # and back, to train on or evaluate

``model``: an embedded name, an HF id or directory, a loaded ``PreTrainedModel`` or a ``BaseModel``; the method
options are ``create_method``'s. Only the method's parameters train; the base stays frozen in eval mode whatever
``train()`` says (no dropout in the frozen model, as in our own loop).

``forward(input_ids [B, T], attention_mask=None, labels=None, num_items_in_batch=None)`` -> ``CausalLMOutputWithPast``:

    logits [B, T, V]   the real positions only, aligned with input_ids (PEFT's prompt methods return [B, P + T, V],
                       which breaks TRL and evaluation code: huggingface/trl #3812, #4168)
    loss               HF's convention: cross-entropy of logits[:, t] against labels[:, t + 1] over labels != -100,
                       summed and divided by their count, or by ``num_items_in_batch`` when Trainer passes it (so
                       gradient accumulation averages over the whole batch, as one big batch would)

``generate(input_ids, attention_mask=None, max_new_tokens=20, do_sample=False, ...)`` -> ids like HF's: the prompt,
then the new tokens, a row that stopped at EOS keeps its EOS and is padded after it. Rows may be left- or
right-padded (their real tokens are taken by the mask). ``gradient_checkpointing_enable()`` (Trainer calls it)
recomputes the decoder layers in the backward pass for every method, KV prefixes included
(``training/grad_checkpoint.py``). ``state_dict()`` holds the method's parameters only, so Trainer's checkpoints are
the adapter's size, not the model's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutputWithPast

from softprompts.adapter import Adapter
from softprompts.adapter_io import load_adapter, save_adapter
from softprompts.errors import SoftpromptsError
from softprompts.methods import create_method
from softprompts.methods.base import PromptMethod
from softprompts.model.decode_loop import decode_batch
from softprompts.model.frozen import FrozenBase
from softprompts.model.generation import GenerationRequest, Sampling, eos_ids
from softprompts.model.load import frozen_base, load_base
from softprompts.model.padding import pad_rows
from softprompts.task_spec import TaskSpec
from softprompts.training.grad_checkpoint import checkpointing

# keyword arguments Trainer / TRL may pass that change nothing here; anything else is refused by name
HARMLESS = {"use_cache", "return_dict", "output_attentions", "output_hidden_states"}


class PromptModel(nn.Module):
    """A frozen base model with a trainable prompt method in front (see the module docstring)."""

    def __init__(self, base: FrozenBase, method: PromptMethod) -> None:
        super().__init__()
        self.base = base
        self.method = method
        self.frozen = base.model  # a submodule so that .to(device) / Trainer's placement move it along
        self._checkpointing = None

    # -- what Trainer and TRL read --------------------------------------------------------------------------------
    @property
    def config(self):
        return self.base.model.config

    @property
    def generation_config(self):
        return self.base.model.generation_config

    @property
    def device(self) -> torch.device:
        return self.base.device

    def get_input_embeddings(self) -> nn.Module:
        return self.base.model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.base.model.get_output_embeddings()

    @property
    def base_model(self) -> Backbone:
        """The decoder without its LM head, as HF models expose it: what TRL's fused LM head
        (``trl.trainer.utils.add_fused_lm_head``, which ``SFTTrainer`` installs) projects in chunks itself."""
        return Backbone(self)

    def add_model_tags(self, tags: list[str] | str) -> None:
        """Trainer and TRL tag the model card with these."""
        self.model_tags = sorted({*getattr(self, "model_tags", []), *([tags] if isinstance(tags, str) else tags)})

    def train(self, mode: bool = True) -> PromptModel:
        self.training = mode
        self.method.train(mode)
        self.base.model.eval()  # frozen: never dropout
        return self

    def state_dict(self, *args, **kwargs):
        """The method's parameters only (``method.*``): checkpoints of the adapter's size."""
        kwargs.pop("prefix", None)
        return self.method.state_dict(*args, prefix="method.", **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        inner = {k.removeprefix("method."): v for k, v in state_dict.items() if k.startswith("method.")}
        if strict and len(inner) != len(state_dict):
            raise SoftpromptsError(f"unexpected keys {sorted(set(state_dict) - {'method.' + k for k in inner})}: a "
                                   "PromptModel state holds the method's parameters only (method.*)")
        return self.method.load_state_dict(inner, strict=strict, assign=assign)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """Recompute every decoder layer in the backward pass (Trainer's ``activation_checkpointing`` /
        ``gradient_checkpointing``); the other layers selections and offloading are refused, not ignored."""
        if every_n_layers != 1 or offload:
            raise SoftpromptsError("PromptModel checkpoints every decoder layer, kept on the device: every_n_layers "
                                   f"must be 1 and offload False (got {every_n_layers}, {offload})")
        if self._checkpointing is None:
            self._checkpointing = checkpointing(self.base)
            self._checkpointing.__enter__()

    def activation_checkpointing_disable(self) -> None:
        if self._checkpointing is not None:
            self._checkpointing.__exit__(None, None, None)
            self._checkpointing = None

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.activation_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self._checkpointing is not None

    # -- the model ----------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, num_items_in_batch: int | torch.Tensor | None = None,
                **kwargs) -> CausalLMOutputWithPast:
        _refuse(kwargs, "forward")
        lengths = None if labels is None else _prompt_lengths(labels.to(input_ids.device), attention_mask)
        logits = self.base.token_logits(self.method(), input_ids, attention_mask,
                                        prompt_lengths=lengths)  # [B, T, V]
        loss = None
        if labels is not None:
            target = labels[:, 1:].to(logits.device)
            total = nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), target.flatten(),
                                                ignore_index=-100, reduction="sum")
            count = num_items_in_batch if num_items_in_batch is not None else (target != -100).sum()
            if isinstance(count, torch.Tensor):
                count = count.to(total.device)
            loss = total / count
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The final hidden states ``[B, T, hidden]`` of the real positions, the method injected."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.base.hidden_at(self.method(), input_ids, attention_mask, positions)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 20,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                 **kwargs) -> torch.Tensor:
        """``[B, T + n]``: each row's prompt then its new tokens (EOS kept, padding after it)."""
        _refuse(kwargs, "generate")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        stops = set(eos_ids(self.base)) if eos_token_id is None else (
            {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id))
        pad = self.base.pad_id if pad_token_id is None else pad_token_id
        sampling = Sampling(temperature=temperature if do_sample else 0.0, top_k=top_k, top_p=top_p)
        artifact = self.method.materialize()
        rows = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask, strict=True)]
        results = decode_batch(self.base, [GenerationRequest(r, artifact, max_new_tokens, sampling, frozenset(stops))
                                           for r in rows])
        new = [r.tokens + ([min(stops)] if r.finish_reason == "stop" and stops else []) for r in results]
        tails, _ = pad_rows(new, pad, input_ids.device, side="right")  # [B, n]
        return torch.cat([input_ids, tails.to(input_ids.dtype)], dim=1)

    # -- our format ---------------------------------------------------------------------------------------------
    def to_adapter(self, task: TaskSpec | dict | None = None) -> Adapter:
        return Adapter.from_method(self.method, self.base, task=task)

    def save_adapter(self, directory: str | Path, task: TaskSpec | dict | None = None,
                     overwrite: bool = False) -> Path:
        """Save the trained method as an adapter (``adapter.json`` + ``adapter.safetensors``)."""
        return save_adapter(self.to_adapter(task), directory, overwrite=overwrite)


class Backbone:
    """``PromptModel.base_model``: called like an HF backbone, it returns the real positions' final hidden states."""

    def __init__(self, owner: PromptModel) -> None:
        self.owner = owner

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 **kwargs) -> BaseModelOutput:
        _refuse(kwargs, "base_model")
        return BaseModelOutput(last_hidden_state=self.owner.hidden_states(input_ids, attention_mask))


def _prompt_lengths(labels: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``[B]`` real tokens before each row's first labelled one (HF labels: ``labels[:, t]`` is token ``t``, -100
    where it is not learned): the prompt, where embedding offsets (DePT) stop; a row without labels is all prompt."""
    mask = torch.ones_like(labels) if attention_mask is None else attention_mask.long()
    labelled = labels != -100  # [B, T]
    first = labelled.long().argmax(1)  # [B]: the first labelled column (0 when none)
    before = (mask.cumsum(1) - mask).gather(1, first[:, None]).squeeze(1)  # real tokens left of that column
    return torch.where(labelled.any(1), before, mask.sum(1))


def _refuse(kwargs: dict, where: str) -> None:
    unknown = sorted(set(kwargs) - HARMLESS)
    if unknown:
        raise TypeError(f"PromptModel.{where} does not take {', '.join(unknown)} (ignoring it would change what you "
                        "get without telling you)")


def _base(model) -> FrozenBase:
    """``model`` as a frozen base of its family; refused unless the family supports ``sp.wrap``."""
    if isinstance(model, FrozenBase):
        base = model
    elif isinstance(model, str | Path):
        base = load_base(str(model))
    elif isinstance(model, PreTrainedModel):
        base = frozen_base(model)
    else:
        raise SoftpromptsError(f"sp.wrap takes a model name or directory, a PreTrainedModel or a BaseModel, not a "
                               f"{type(model).__name__}")
    base.require("wrap")
    return base


def wrap(model, method: str | None = None, adapter: str | Path | Adapter | None = None, **options) -> PromptModel:
    """A ``PromptModel`` of ``method`` (with ``create_method`` options) on ``model``; or, with ``adapter`` (a saved
    adapter directory or an ``Adapter``), of that adapter's method starting from its artifact."""
    base = _base(model)
    if adapter is not None:
        saved = adapter if isinstance(adapter, Adapter) else load_adapter(adapter, base)
        if method is not None and method != saved.method:
            raise SoftpromptsError(f"the adapter is a {saved.method!r} adapter, not {method!r}; drop method=")
        prompt = create_method(base, saved.method, init_artifact=saved.artifact.to(base.device), **options)
    elif method is None:
        raise SoftpromptsError("sp.wrap needs a method (prompt, ptuning, prefix, deep) or a saved adapter=")
    else:
        prompt = create_method(base, method, **options)
    return PromptModel(base, prompt)


__all__ = ["PromptModel", "wrap"]
