"""The default engine's HTTP answers, byte for byte, on a fixed request set recorded from an earlier version.

A tiny Llama (seed 0) serves adapters of every artifact path (a soft prompt, a KV prefix, a deep prompt, a chat
adapter whose soft prompt follows a lead, a classifier, a prompt table's tasks); ``REQUESTS`` covers completions,
chat, streams, logprobs, echo, stop strings, ``n > 1``, token-id prompts, placement markers, classification and the
errors. Every answer (status + body; a stream's events) is compared with ``fixtures/serve_recorded.json`` with the
volatile fields (``id``, ``created``) taken out. Requests go one at a time, so batching cannot change a float.

Recorded once from the code before a refactor (``python tests/test_serve_recorded.py`` rewrites the fixture); a
change that alters any answer fails here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from tiny import perturbed, tiny_base

import softprompts as sp
from softprompts.table import PromptTable

FIXTURE = Path(__file__).parent / "fixtures" / "serve_recorded.json"
VOLATILE = ("id", "created")
CLASSIFY = {"task": "classify", "prompt": "Review: {text}\nSentiment:", "target": " {label}",
            "labels": ["positive", "negative"]}
HELPER = {"task": "generate", "prompt": "", "target": "{label}", "chat": {"placement": "user-start", "system": "S"}}
AFTER = {"task": "generate", "prompt": "", "target": "{label}", "chat": {"placement": "after-system",
                                                                          "system": "Be brief."}}
CHAT = [{"role": "user", "content": "What is two plus two?"}]
SYSTEM_CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "say one"}]
C, CHAT_URL, CLS = "/v1/completions", "/v1/chat/completions", "/v1/classify"

# (name, path, body): sent in this order, one at a time
REQUESTS: list[tuple[str, str, dict]] = [
    ("base-greedy", C, {"model": "base", "prompt": "Hello", "max_tokens": 8, "temperature": 0}),
    ("soft-greedy-logprobs", C, {"model": "soft", "prompt": "Hello", "max_tokens": 6, "temperature": 0,
                                 "logprobs": 2}),
    ("pre-two-prompts-n2-sampled", C, {"model": "pre", "prompt": ["one", "two"], "max_tokens": 6, "n": 2,
                                       "temperature": 0.9, "seed": 7}),
    ("deep-token-ids", C, {"model": "deep", "prompt": [72, 101, 108, 108, 111], "max_tokens": 5, "temperature": 0}),
    ("soft-marker", C, {"model": "soft", "prompt": "ab<|virtual|>cd", "max_tokens": 5, "temperature": 0}),
    ("base-marker", C, {"model": "base", "prompt": "ab<|virtual|>cd", "max_tokens": 4, "temperature": 0}),
    ("pre-echo-logprobs", C, {"model": "pre", "prompt": "Echo me", "max_tokens": 3, "temperature": 0, "echo": True,
                              "logprobs": 1}),
    ("base-echo-zero-tokens", C, {"model": "base", "prompt": "Just score", "max_tokens": 0, "echo": True,
                                  "logprobs": 0}),
    ("soft-stop-strings", C, {"model": "soft", "prompt": "Hello", "max_tokens": 12, "temperature": 0,
                              "stop": ["56", "zz"], "logprobs": 1}),
    ("base-stop-min-tokens", C, {"model": "base", "prompt": "Hello", "max_tokens": 12, "temperature": 0,
                                 "stop": ["v", "~"], "min_tokens": 3}),
    ("base-ignore-eos", C, {"model": "base", "prompt": "x", "max_tokens": 10, "temperature": 0.7, "seed": 3,
                            "ignore_eos": True}),
    ("soft-stream-stop-logprobs", C, {"model": "soft", "prompt": "Hello", "max_tokens": 12, "temperature": 0,
                                      "stop": ["56"], "logprobs": 1, "stream": True,
                                      "stream_options": {"include_usage": True}}),
    ("pre-stream-n3-sampled", C, {"model": "pre", "prompt": "Stream", "max_tokens": 8, "n": 3, "temperature": 1.0,
                                  "top_p": 0.9, "seed": 11, "stream": True}),
    ("base-stream-echo", C, {"model": "base", "prompt": "Echo", "max_tokens": 4, "temperature": 0, "echo": True,
                             "stream": True}),
    ("sampled-multibyte-stops", C, {"model": "deep", "prompt": "\u00e9t\u00e9", "max_tokens": 16,
                                    "temperature": 1.3, "seed": 5, "stop": ["\u00e9", "\ufffd", "ab"], "n": 2}),
    ("sampled-multibyte-stream", C, {"model": "soft", "prompt": "\u00fcber", "max_tokens": 16, "temperature": 1.3,
                                     "seed": 9, "stop": ["\u00fc", "r["], "stream": True, "logprobs": 0}),
    ("table-a", C, {"model": "t.a", "prompt": "table", "max_tokens": 5, "temperature": 0}),
    ("table-b", C, {"model": "t.b", "prompt": "table", "max_tokens": 5, "temperature": 0}),
    ("chat-helper-lead", CHAT_URL, {"model": "helper", "messages": CHAT, "max_tokens": 6, "temperature": 0}),
    ("chat-helper-lead-again", CHAT_URL, {"model": "helper", "messages": CHAT, "max_tokens": 6, "temperature": 0,
                                          "logprobs": True, "top_logprobs": 2}),
    ("chat-after-system", CHAT_URL, {"model": "after", "messages": SYSTEM_CHAT, "max_tokens": 6, "temperature": 0}),
    ("chat-plain-stream", CHAT_URL, {"model": "soft", "messages": CHAT, "max_completion_tokens": 6,
                                     "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}),
    ("chat-base-n2-stop", CHAT_URL, {"model": "base", "messages": CHAT, "max_tokens": 8, "temperature": 0.8,
                                     "seed": 1, "n": 2, "stop": ["H", "K"]}),
    ("classify", CLS, {"model": "sentiment", "texts": ["great film", "awful film"]}),
    ("classify-labels", CLS, {"model": "sentiment", "texts": ["fine"], "labels": ["good", "bad"]}),
    ("err-unknown-adapter", C, {"model": "nope", "prompt": "x"}),
    ("err-bad-name", C, {"model": "../soft", "prompt": "x"}),
    ("err-too-long", C, {"model": "soft", "prompt": "x" * 250, "max_tokens": 10}),
    ("err-max-tokens-over-context", C, {"model": "pre", "prompt": "x", "max_tokens": 100000}),
    ("err-token-out-of-vocab", C, {"model": "soft", "prompt": [1, 2, 99999], "max_tokens": 2}),
    ("err-echo-marker", C, {"model": "soft", "prompt": "a<|virtual|>b", "echo": True, "logprobs": 1}),
    ("err-missing-prompt", C, {"model": "base", "max_tokens": 2}),
    ("err-unknown-field", C, {"model": "soft", "prompt": "x", "best_of_everything": 1}),
    ("chat-after-system-no-system", CHAT_URL, {"model": "after", "messages": CHAT, "max_tokens": 2}),
    ("err-deep-marker-after-lead", C, {"model": "deep", "prompt": "ab<|virtual|>cd", "max_tokens": 2}),
    ("err-classify-base", CLS, {"model": "base", "texts": ["x"]}),
    ("err-classify-no-labels", CLS, {"model": "soft", "texts": ["x"]}),
    ("err-classify-too-long", CLS, {"model": "sentiment", "texts": ["x" * 300]}),
]


def build_adapters(base, root: Path) -> None:
    """The served directory: every artifact path of the engine, and a prompt table of two tasks."""
    def save(method, n, text, seed, task, name):
        tuned = perturbed(base, method, n, text, scale=0.3, seed=seed)
        sp.save_adapter(sp.Adapter.from_method(tuned, base, task=task), root / name)
        return tuned

    save("prompt", 3, "abc", 1, {"task": "generate"}, "soft")
    save("prefix", 4, "pref", 2, {"task": "generate"}, "pre")
    save("deep", 2, "dp", 3, {"task": "generate"}, "deep")
    save("prompt", 3, "hlp", 4, HELPER, "helper")
    save("prompt", 2, "af", 5, AFTER, "after")
    save("prompt", 4, "sent", 6, CLASSIFY, "sentiment")
    table = PromptTable.load(root / "t", create=True)
    for i, name in enumerate(("a", "b")):
        tuned = perturbed(base, "prefix", 2 + i, "tb", scale=0.3, seed=10 + i)
        table.add(name, sp.Adapter.from_method(tuned, base, task={"task": "generate"}))
    table.save()


def cleaned(value):
    """``value`` without the fields that differ on every call."""
    if isinstance(value, dict):
        return {k: cleaned(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [cleaned(v) for v in value]
    return value


def _choice_index(event) -> int:
    """Where an event sorts: by its choice (the choices of ``n > 1`` interleave as the worker's steps happen to
    fall; each choice's own order is kept), the usage chunk and ``[DONE]`` last."""
    choices = event["choices"] if isinstance(event, dict) else []
    return choices[0]["index"] if choices else 1 << 30


def answer_of(response) -> dict:
    """Status and body of one answer; a stream as its events, each choice's together (``[DONE]`` kept as
    text)."""
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line[len("data: "):] for line in response.text.split("\n") if line.startswith("data: ")]
        parsed = [e if e == "[DONE]" else cleaned(json.loads(e)) for e in events]
        return {"status": response.status_code, "events": sorted(parsed, key=_choice_index)}
    return {"status": response.status_code, "body": cleaned(response.json())}


def answers(root: Path) -> dict[str, dict]:
    """Every request of ``REQUESTS`` answered by a default-engine server over ``root``'s adapters."""
    from fastapi.testclient import TestClient

    from softprompts.serve.http import build_state, create_app

    state = build_state(tiny_base("llama"), root, max_running=8, poll_s=0)
    out = {}
    with TestClient(create_app(state), raise_server_exceptions=False) as client:
        for name, path, body in REQUESTS:
            out[name] = answer_of(client.post(path, json=body))
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("recorded")
    build_adapters(tiny_base("llama"), root)
    return answers(root)


@pytest.mark.parametrize("name", [name for name, _, _ in REQUESTS])
def test_answer_matches_the_recording(served, name):
    recorded = json.loads(FIXTURE.read_text())
    assert json.dumps(served[name], sort_keys=True) == json.dumps(recorded[name], sort_keys=True)


def test_the_recording_covers_what_it_claims():
    """The fixture exercises stops that cut, streams, errors and every status the set was built for."""
    recorded = json.loads(FIXTURE.read_text())
    assert set(recorded) == {name for name, _, _ in REQUESTS}
    statuses = {a["status"] for a in recorded.values()}
    assert {200, 400, 404, 422} <= statuses
    reasons = [c.get("finish_reason") for a in recorded.values() for c in a.get("body", {}).get("choices", [])]
    assert "stop" in reasons and "length" in reasons


if __name__ == "__main__":  # record: python tests/test_serve_recorded.py (from the code the answers must keep)
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))
    with tempfile.TemporaryDirectory() as tmp:
        build_adapters(tiny_base("llama"), Path(tmp))
        FIXTURE.write_text(json.dumps(answers(Path(tmp)), indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    print(f"recorded {len(REQUESTS)} answers in {FIXTURE}")
