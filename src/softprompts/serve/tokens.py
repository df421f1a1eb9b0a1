"""The tokenizer routes vLLM serves and evaluation clients probe: ``GET /tokenizer_info``, ``POST /tokenize``,
``POST /detokenize`` (module-level functions on ``router``; ``http.py`` includes it).

Every adapter runs on the one base model, so one tokenizer answers for all of them (``model`` is accepted and not
needed). ``/tokenize`` gives the ids ``/v1/completions`` uses for the same text (no special tokens unless
``add_special_tokens``), so a client that tokenizes here and sends ids gets exactly the answer it would get for the
text; virtual tokens are not tokens and never appear. lm-evaluation-harness's ``local-completions`` detects these
routes and tokenizes through them (its ``remote`` tokenizer backend), so it needs no ``tokenizer=`` argument.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from softprompts.serve.errors import ERROR_RESPONSES
from softprompts.serve.routes import served
from softprompts.serve.schemas import DetokenizeBody, TokenizeBody

router = APIRouter()

_SPECIAL = ("bos_token", "eos_token", "pad_token", "unk_token")


def _token_text(tokenizer, name: str) -> str | None:
    value = getattr(tokenizer, name, None)
    return value if isinstance(value, str) else None


@router.get("/tokenizer_info", responses=ERROR_RESPONSES)
async def tokenizer_info(http: Request) -> dict:
    """The tokenizer's class, special tokens, chat template and the model's context length."""
    base = served(http).base
    tokenizer = base.tokenizer
    return {"tokenizer_class": type(tokenizer).__name__,
            **{name: _token_text(tokenizer, name) for name in _SPECIAL},
            "chat_template": getattr(tokenizer, "chat_template", None),
            "model_max_length": base.context_limit, "vocab_size": base.vocab_size}


@router.post("/tokenize", responses=ERROR_RESPONSES)
async def tokenize(body: TokenizeBody, http: Request) -> dict:
    """``{"tokens", "count", "max_model_len", "token_strs"}`` of ``prompt``, as vLLM answers."""
    base = served(http).base
    tokens = base.tokenize(body.prompt, add_special_tokens=body.add_special_tokens)
    return {"tokens": tokens, "count": len(tokens), "max_model_len": base.context_limit,
            "token_strs": base.tokenizer.convert_ids_to_tokens(tokens)}


@router.post("/detokenize", responses=ERROR_RESPONSES)
async def detokenize(body: DetokenizeBody, http: Request) -> dict:
    """``{"prompt"}``: the text of ``tokens`` (special tokens kept, as the model saw them)."""
    base = served(http).base
    base.check_token_ids(body.tokens, "tokens")
    return {"prompt": base.tokenizer.decode(body.tokens)}


__all__ = ["router"]
