"""vLLM's answer to a translated adapter request (``vllm_requests.py``), turned into what the client asked for.

Every answer reports the adapter's name as ``model`` and counts the prompt without the virtual tokens (as the default
engine does: ``usage.prompt_tokens`` = the prompt's real tokens, the lead's included). A chat request went to vLLM as a
completion, so its answer becomes a chat completion again::

    text_completion  {"choices": [{"index", "text", "logprobs", "finish_reason", "stop_reason"}]}
    chat.completion  {"choices": [{"index", "message": {"role": "assistant", "content": text}, "logprobs",
                                   "finish_reason", "stop_reason"}]}
    streamed         each event's choices get "delta": {"content": text} ("role": "assistant" in a choice's first)

and completion logprobs (``tokens``, ``token_logprobs``, ``top_logprobs``) become chat logprobs
(``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}``, the top ``k`` the client asked for).
A 5xx answer (or an error event in a stream) to an adapter request is rewritten to name the adapter and what to do
(``failure``): for a KV prefix, the front's KV file could not be loaded - the front writes it again, so a retry
succeeds; other error answers (4xx: vLLM's own validation) pass through unchanged.
"""

from __future__ import annotations

import json

from softprompts.interop.vllm_requests import VllmRequest


def _token(text: str, logprob: float | None) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(logprobs: dict | None, top: int | None) -> dict | None:
    """Completion logprobs -> chat logprobs with at most ``top`` alternatives per token (``None`` passes)."""
    if logprobs is None:
        return None
    content = []
    tops = logprobs.get("top_logprobs") or [None] * len(logprobs.get("tokens", []))
    for text, logprob, alternatives in zip(logprobs.get("tokens", []), logprobs.get("token_logprobs", []), tops,
                                           strict=True):
        ranked = sorted((alternatives or {}).items(), key=lambda kv: -kv[1])[: top or 0]
        content.append({**_token(text, logprob), "top_logprobs": [_token(t, lp) for t, lp in ranked]})
    return {"content": content}


def _usage(usage: dict | None, request: VllmRequest) -> dict | None:
    if not usage:
        return usage
    virtual = request.virtual_tokens * request.prompts
    return {**usage, "prompt_tokens": usage["prompt_tokens"] - virtual, "total_tokens": usage["total_tokens"] - virtual}


def _choice(choice: dict, request: VllmRequest, delta: bool, first: bool) -> dict:
    if not request.chat:
        return choice
    text = {"role": "assistant", "content": choice.get("text", "")} if not delta or first else \
        {"content": choice.get("text", "")}
    return {"index": choice["index"], ("delta" if delta else "message"): text,
            "logprobs": chat_logprobs(choice.get("logprobs"), request.top_logprobs),
            "finish_reason": choice.get("finish_reason"), "stop_reason": choice.get("stop_reason")}


def _envelope(answer: dict, request: VllmRequest, chunk: bool) -> dict:
    out = {**answer, "model": request.model}
    if request.chat:
        out["id"] = "chatcmpl-" + str(answer.get("id", "")).removeprefix("cmpl-")
        out["object"] = "chat.completion.chunk" if chunk else "chat.completion"
        for key in ("kv_transfer_params", "ec_transfer_params", "prompt_logprobs", "prompt_token_ids"):
            out.pop(key, None)
    if "usage" in out:
        out["usage"] = _usage(out["usage"], request)
    return out


ENGINE_DEAD = "EngineCore encountered an issue"  # vLLM's message once its engine process has died
KV_NOT_LOADED = 503  # the status of a KV-prefix request vLLM could not complete: its file is written again


def failure(answer: object, request: VllmRequest) -> tuple[int, dict]:
    """``(status, body)``: vLLM's error answer to an adapter request, in OpenAI's shape, naming the adapter and what
    to do. A dead engine is a 500 saying so; otherwise a KV-prefix request is a 503 (its KV file could not be loaded:
    retry, the front writes the file again) and any other a 500."""
    error = answer.get("error") if isinstance(answer, dict) else None
    theirs = (error.get("message") if isinstance(error, dict) else None) or "no message"
    if ENGINE_DEAD in theirs:  # not this request's fault: the server is going down (serve exits 1: restart it)
        status, what = 500, "vLLM's engine process stopped and the server is shutting down; retry on a restarted server"
    elif request.kv_path is not None:
        status, what = KV_NOT_LOADED, ("its KV prefix could not be loaded from the front's KV file (removed or "
                                       "damaged on disk); the front writes the file again for the next request: "
                                       "retry it")
    else:
        status, what = 500, "see the vLLM server's log"
    message = f"vLLM could not complete this request for adapter {request.model!r} (vLLM: {theirs}); {what}"
    return status, {"error": {"message": message, "type": "server_error", "param": None, "code": status}}


def whole_answer(answer: dict, request: VllmRequest) -> dict:
    """vLLM's whole ``text_completion`` answer -> the client's answer."""
    out = _envelope(answer, request, chunk=False)
    out["choices"] = [_choice(c, request, delta=False, first=True) for c in answer.get("choices", [])]
    return out


class EventStream:
    """Server-sent events from vLLM -> the client's events: ``feed(bytes)`` returns the complete events so far,
    rewritten (an event may arrive split across chunks); ``[DONE]`` passes unchanged, an error event becomes
    ``failure``'s (and ``failed`` holds its status)."""

    def __init__(self, request: VllmRequest) -> None:
        self.request = request
        self._pending = b""
        self._started: set[int] = set()  # choice indices that have had their first delta
        self.failed: int | None = None  # the status ``failure`` gave an error event, once one came

    def feed(self, chunk: bytes) -> bytes:
        self._pending += chunk
        *events, self._pending = self._pending.split(b"\n\n")
        return b"".join(self._event(e) + b"\n\n" for e in events)

    def close(self) -> bytes:
        rest, self._pending = self._pending, b""
        return self._event(rest) if rest.strip() else b""

    def _event(self, raw: bytes) -> bytes:
        if not raw.startswith(b"data: ") or raw.strip() == b"data: [DONE]":
            return raw
        try:
            answer = json.loads(raw[len(b"data: "):])
        except ValueError:
            return raw
        if isinstance(answer, dict) and "error" in answer:
            self.failed, out = failure(answer, self.request)
            return b"data: " + json.dumps(out, separators=(",", ":")).encode()
        if not isinstance(answer, dict) or "choices" not in answer:
            return raw
        out = _envelope(answer, self.request, chunk=True)
        choices = []
        for choice in answer["choices"]:
            index = choice.get("index", 0)
            choices.append(_choice(choice, self.request, delta=True, first=index not in self._started))
            self._started.add(index)
        out["choices"] = choices
        return b"data: " + json.dumps(out, separators=(",", ":")).encode()


__all__ = ["ENGINE_DEAD", "KV_NOT_LOADED", "EventStream", "chat_logprobs", "failure", "whole_answer"]
