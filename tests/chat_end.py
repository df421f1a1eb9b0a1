"""A tiny Llama whose chat turns end with a special token of their own, ``<|end|>`` (not the model's end of
sequence), optionally after some text: what the chat stop rule and the Python face's generation are tested on."""

from __future__ import annotations

from tiny import CHAT_TEMPLATE, make_tokenizer, tiny_model

from softprompts.model.decoder.base import BaseModel

END = "<|end|>"


def end_template(before: str = "") -> str:
    """``tiny.CHAT_TEMPLATE`` with every turn ending ``before + <|end|>`` instead of ``<eos>``."""
    return CHAT_TEMPLATE.replace("'<eos>\\n'", f"'{before}{END}\\n'")


def end_tokenizer(before: str = ""):
    """The byte tokenizer with ``<|end|>`` (id 258) and ``end_template(before)``."""
    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [END]})
    tokenizer.chat_template = end_template(before)
    return tokenizer


def end_base(before: str = "", seed: int = 0) -> BaseModel:
    """Tiny Llama (``tiny.tiny_model``) with one more token row for ``<|end|>``; its end of sequence stays ``<eos>``."""
    tokenizer = end_tokenizer(before)
    model = tiny_model("llama", seed)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return BaseModel(model=model, tokenizer=tokenizer, name="tiny-llama-end")
