"""The decoder-only family (``AutoModelForCausalLM``): ``BaseModel`` and, inside this package, how an artifact enters
its forward (``inject``), its decode loop (``decode``, ``chunked_prefill``, ``kv_cache``) and its teacher-forced
scores (``score``). Code outside ``model/`` asks the family (``BaseModel``'s methods, ``frozen.FrozenBase``'s
interface); only this face is imported from above.

``forward`` is re-exported for the package face (``sp.forward``: logits of a batch with an artifact injected)."""

from softprompts.model.decoder.base import BaseModel
from softprompts.model.decoder.inject import forward

__all__ = ["BaseModel", "forward"]
