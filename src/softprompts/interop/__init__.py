"""Interoperability with other libraries: Hugging Face PEFT both ways, vLLM (``vllm.py``: soft prompts as
``prompt_embeds``).

* ``export_peft(adapter, out)``: write ``adapter_config.json`` + ``adapter_model.safetensors`` that
  ``peft.PeftModel.from_pretrained(hf_model, out)`` loads (soft prompts as ``PROMPT_TUNING``, KV prefixes as
  ``PREFIX_TUNING`` without projection).
* ``import_peft(directory, base)``: read a PEFT ``PROMPT_TUNING`` / ``P_TUNING`` / ``PREFIX_TUNING`` adapter (the
  collapsed ``prompt_embeddings`` PEFT saves) into an ``Adapter``.

PEFT itself is never imported: both directions read and write its file format (JSON + safetensors) directly, so
interop works without PEFT installed; the tests check the files against PEFT's own loader and forward.
"""

from softprompts.interop.peft_export import export_peft, to_peft
from softprompts.interop.peft_import import PeftImportError, import_peft, read_peft

__all__ = ["PeftImportError", "export_peft", "import_peft", "read_peft", "to_peft"]
