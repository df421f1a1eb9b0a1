"""OpenAI's two shapes of token log-probabilities, from ``TokenLogprob`` (``model/generation.py``).

Completions (``logprobs: k``)::

    {"tokens": [str], "token_logprobs": [float | None], "top_logprobs": [{str: float} | None], "text_offset": [int]}

one entry per token; with ``echo`` the prompt's tokens come first and the first one has no log-probability (``None``:
nothing before it is scored). ``text_offset[i]`` is where token ``i``'s text starts in the choice's text.

Chat (``logprobs: true, top_logprobs: k``)::

    {"content": [{"token": str, "logprob": float, "bytes": [int], "top_logprobs": [{"token", "logprob", "bytes"}]}]}

A token's string is its own decoding (``tokenizer.decode([id])``), except for a token that is part of a UTF-8
character (it decodes to U+FFFD): that one is ``"bytes:\\xe2\\x80"``, its raw bytes, as OpenAI writes it, so distinct
tokens keep distinct strings. ``bytes`` (chat) are the token's raw bytes (byte-level BPE tokens through GPT-2's byte
table, ``<0xNN>`` byte-fallback tokens as their byte). Offsets count the decoded text.
"""

from __future__ import annotations

import functools
import re

from softprompts.model.generation import TokenLogprob

BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte-fallback tokens


@functools.cache
def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet back to bytes (``{}`` if transformers no longer ships the table)."""
    try:
        from transformers.convert_slow_tokenizer import bytes_to_unicode
    except ImportError:
        return {}
    return {char: byte for byte, char in bytes_to_unicode().items()}


def token_bytes(tokenizer, token: int) -> bytes:
    """The raw bytes of one token."""
    text = tokenizer.decode([token])
    if "\ufffd" not in text:
        return text.encode("utf-8")
    raw = tokenizer.convert_ids_to_tokens(token)
    fallback = BYTE_FALLBACK.fullmatch(raw or "")
    if fallback:
        return bytes([int(fallback.group(1), 16)])
    table = _byte_level_table()
    if raw and all(char in table for char in raw):
        return bytes(table[char] for char in raw)
    return text.encode("utf-8")


def token_string(tokenizer, token: int) -> str:
    """A token's string in logprobs: its decoding, or ``bytes:\\x..`` for part of a character."""
    text = tokenizer.decode([token])
    if "\ufffd" not in text:
        return text
    return "bytes:" + "".join(f"\\x{b:02x}" for b in token_bytes(tokenizer, token))


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Each token's decoded text (what offsets count)."""
    return [tokenizer.decode([i]) for i in ids]


def offsets(pieces: list[str], start: int = 0) -> list[int]:
    """Where each piece starts when the pieces are written one after the other from ``start``."""
    out, at = [], start
    for piece in pieces:
        out.append(at)
        at += len(piece)
    return out


def within(pieces: list[str], length: int) -> int:
    """How many of ``pieces`` start inside the first ``length`` characters (a completion cut at a stop string keeps
    the log-probabilities of the tokens it kept)."""
    return sum(1 for at in offsets(pieces) if at < length)


def completion_logprobs(tokenizer, ids: list[int], logprobs: list[TokenLogprob | None], start: int = 0) -> dict:
    """The completions shape for tokens ``ids`` (their ``logprobs`` aligned, ``None`` where unscored), the first
    starting at character ``start`` of the choice's text."""
    return {
        "tokens": [token_string(tokenizer, i) for i in ids],
        "token_logprobs": [lp.logprob if lp is not None else None for lp in logprobs],
        "top_logprobs": [{token_string(tokenizer, t): v for t, v in lp.top} if lp is not None else None
                         for lp in logprobs],
        "text_offset": offsets(token_texts(tokenizer, ids), start),
    }


def join_completion_logprobs(parts: list[dict]) -> dict:
    """Concatenate completions-shaped logprobs (the echoed prompt's, then the generated tokens')."""
    return {key: [v for part in parts for v in part[key]] for key in
            ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


def _entry(tokenizer, token: int, logprob: float) -> dict:
    return {"token": token_string(tokenizer, token), "logprob": logprob, "bytes": list(token_bytes(tokenizer, token))}


def chat_logprobs(tokenizer, logprobs: list[TokenLogprob]) -> dict:
    """The chat shape for the answer's tokens."""
    return {"content": [{**_entry(tokenizer, lp.token, lp.logprob),
                         "top_logprobs": [_entry(tokenizer, t, v) for t, v in lp.top]} for lp in logprobs]}


__all__ = ["chat_logprobs", "completion_logprobs", "join_completion_logprobs", "offsets", "token_bytes", "token_string",
           "token_texts", "within"]
