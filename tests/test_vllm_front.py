"""The vLLM front (``softprompts.interop.vllm_front``) without vLLM: what it sends vLLM must carry exactly the
adapter's computation, and what it answers must be the default engine's answer.

vLLM is replaced by ``FakeVllm``, an ASGI app that does with the body what vLLM does with it - ``prompt_embeds`` fed to
the model as input embeddings, or P placeholders whose KV is the file named in ``kv_transfer_params`` - computed with
our own decode on the tiny Llama. Its answers through the front must equal the default engine's (``softprompts
serve``'s app on the same adapters directory) for every adapter kind, completions and chat (placement and system
message), whole and streamed. ``tests/vllm/test_vllm_server.py`` checks the same against the real vLLM server.
"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from safetensors.torch import load_file
from starlette.responses import JSONResponse, StreamingResponse
from tiny import perturbed, tiny_base

import softprompts as sp
from softprompts.errors import SoftpromptsError
from softprompts.interop.vllm import decode_prompt_embeds
from softprompts.interop.vllm_answers import EventStream
from softprompts.interop.vllm_front import SoftpromptsFront
from softprompts.interop.vllm_kv_files import LENGTH_KEY, PATH_KEY, PLACEHOLDER_ID, SALT_PREFIX
from softprompts.interop.vllm_launch import ENV, FrontConfig, vllm_command
from softprompts.interop.vllm_requests import VllmRequest
from softprompts.model.artifacts import KVPrefix, SoftPrompt
from softprompts.model.decode import generate_ids
from softprompts.serve.http import build_state, create_app

CHAT_TASK = {"task": "generate", "prompt": "", "target": "{label}",
             "chat": {"placement": "after-system", "system": "Be brief."}}
ADAPTERS = {"soft": ("prompt", 4, None), "ptuning": ("ptuning", 3, None), "prefix": ("prefix", 5, None),
            "deep": ("deep", 6, None), "chatsoft": ("prompt", 3, CHAT_TASK)}
PROMPT = "hello there"


class FakeVllm:
    """vLLM's ``/v1/completions`` and ``/v1/models`` as far as the front relies on them, computed with our decode."""

    def __init__(self, base) -> None:
        self.base, self.seen = base, []

    def _tokens(self, body: dict, prompt_index: int) -> list[int]:
        base, stops = self.base, (set(body["stop_token_ids"]) if not body["ignore_eos"] else set())
        table = base.model.get_input_embeddings().weight
        if "prompt_embeds" in body:  # [e(lead); E; e(ids)]: the real tail found back in the embedding table
            embeds = decode_prompt_embeds(body["prompt_embeds"][prompt_index])
            last = int((table == embeds[-1]).all(dim=1).nonzero()[0])
            artifact, ids = SoftPrompt(embeds[:-1]), [last]
        else:
            params, ids = body["kv_transfer_params"], body["prompt"][prompt_index]
            length = params[LENGTH_KEY]
            assert ids[:length] == [PLACEHOLDER_ID] * length and body["cache_salt"].startswith(SALT_PREFIX)
            tensors = load_file(params[PATH_KEY])
            layers = range(len(tensors) // 2)
            artifact = KVPrefix([tensors[f"layers.{i}.key"] for i in layers],
                                [tensors[f"layers.{i}.value"] for i in layers])
            ids = ids[length:]
        return generate_ids(base, [ids], artifact, max_new_tokens=body["max_tokens"], stop_ids=stops)[0]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/v1/models":
            return await JSONResponse({"object": "list", "data": [{"id": "base", "object": "model"}]})(
                scope, receive, send)
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        body = json.loads(raw)
        self.seen.append((scope["path"], body))
        if "prompt_embeds" not in body and "kv_transfer_params" not in body:  # not the front's: only recorded
            return await JSONResponse({"object": "text_completion", "choices": []})(scope, receive, send)
        count = len(body.get("prompt_embeds") or body.get("prompt") or [])
        tokens = [self._tokens(body, i) for i in range(count)]
        decode = self.base.tokenizer.decode
        prompt_tokens = sum(len(p) for p in body.get("prompt", [])) + sum(
            int(decode_prompt_embeds(e).shape[0])
            for e in body.get("prompt_embeds", []))
        envelope = {"id": "cmpl-1", "created": 0, "model": body["model"]}
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": sum(map(len, tokens)),
                 "total_tokens": prompt_tokens + sum(map(len, tokens))}
        if not body["stream"]:
            choices = [{"index": i, "text": decode(t, skip_special_tokens=True), "logprobs": None,
                        "finish_reason": "length" if len(t) == body["max_tokens"] else "stop", "stop_reason": None}
                       for i, t in enumerate(tokens)]
            return await JSONResponse({**envelope, "object": "text_completion", "choices": choices,
                                       "usage": usage})(scope, receive, send)

        def events():
            for i, row in enumerate(tokens):
                for k, token in enumerate(row):
                    choice = {"index": i, "text": decode([token], skip_special_tokens=True), "logprobs": None,
                              "finish_reason": "length" if k == len(row) - 1 else None}
                    yield "data: " + json.dumps({**envelope, "object": "text_completion", "choices": [choice]}) + "\n\n"
            if (body.get("stream_options") or {}).get("include_usage"):
                yield "data: " + json.dumps({**envelope, "object": "text_completion", "choices": [],
                                             "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"

        return await StreamingResponse(events(), media_type="text/event-stream")(scope, receive, send)


@pytest.fixture(scope="module")
def fronted(tmp_path_factory):
    """``(front client, default-engine client, fake vLLM, adapters directory, base)``."""
    base = tiny_base("llama")
    directory = tmp_path_factory.mktemp("adapters")
    for seed, (name, (method, n, task)) in enumerate(ADAPTERS.items()):
        method_ = perturbed(base, method, n, "virtual tokens"[:n], scale=0.3, seed=seed)
        sp.save_adapter(sp.Adapter.from_method(method_, base, task=task), directory / name)
    fake = FakeVllm(base)
    config = FrontConfig(adapters=str(directory), model="tiny", served_names=("base", "tiny"), poll_s=0)
    front = TestClient(SoftpromptsFront(fake, config, base))
    with TestClient(create_app(build_state(base, directory, poll_s=0))) as ours:
        yield front, ours, fake, directory, base


def _both(fronted, path: str, body: dict) -> tuple[dict, dict]:
    front, ours = fronted[0], fronted[1]
    got, want = front.post(path, json=body), ours.post(path, json=body)
    assert got.status_code == want.status_code == 200, (got.text, want.text)
    return got.json(), want.json()


@pytest.mark.parametrize("name", ["soft", "ptuning", "prefix", "deep"])
def test_completions_carry_the_adapters_computation(fronted, name):
    body = {"model": name, "prompt": [PROMPT, "abc"], "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    got, want = _both(fronted, "/v1/completions", body)
    assert [c["text"] for c in got["choices"]] == [c["text"] for c in want["choices"]]
    assert got["model"] == name and got["usage"]["prompt_tokens"] == want["usage"]["prompt_tokens"]
    path, sent = fronted[2].seen[-1]
    assert path == "/v1/completions" and sent["model"] == "base" and "echo" not in sent


@pytest.mark.parametrize("name", ["chatsoft", "deep"])
def test_chat_is_rendered_placed_and_answered_as_a_chat(fronted, name):
    body = {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0}
    got, want = _both(fronted, "/v1/chat/completions", body)
    assert got["object"] == "chat.completion" and got["id"].startswith("chatcmpl-")
    assert got["choices"][0]["message"] == want["choices"][0]["message"]
    assert got["usage"]["prompt_tokens"] == want["usage"]["prompt_tokens"]
    sent = fronted[2].seen[-1][1]
    assert sent["max_tokens"] == 5 and set(sent["stop_token_ids"]) >= {fronted[4].tokenizer.eos_token_id}
    streamed = fronted[0].post("/v1/chat/completions", json={**body, "stream": True,
                                                              "stream_options": {"include_usage": True}})
    events = [json.loads(line[6:]) for line in streamed.text.split("\n\n") if line.startswith("data: {")]
    assert streamed.text.rstrip().endswith("data: [DONE]")
    assert all(e["object"] == "chat.completion.chunk" and e["model"] == name for e in events)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]) == \
        want["choices"][0]["message"]["content"]
    assert events[-1]["usage"]["prompt_tokens"] == want["usage"]["prompt_tokens"]


def test_base_requests_and_unauthenticated_ones_reach_vllm_unchanged(fronted, tmp_path):
    front, _, fake, directory, base = fronted
    body = {"model": "base", "prompt": "x", "max_tokens": 2, "temperature": 0, "ignore_eos": True,
            "stop_token_ids": [], "stream": False, "some_vllm_field": 1}
    assert front.post("/v1/completions", json=body).status_code == 200
    assert fake.seen[-1] == ("/v1/completions", body)
    keyed = TestClient(SoftpromptsFront(fake, FrontConfig(adapters=str(directory), model="tiny", poll_s=0,
                                                          api_keys=("k",)), base))
    keyed.post("/v1/completions", json={**body, "model": "nope"})  # no key: vLLM answers (it refuses), not the front
    assert fake.seen[-1][1]["model"] == "nope"
    assert keyed.post("/v1/completions", json={**body, "model": "nope"},
                      headers={"Authorization": "Bearer k"}).status_code == 404


@pytest.mark.parametrize(("body", "status", "says"), [
    ({"model": "nope", "prompt": "x"}, 404, "'nope' not found"),
    ({"model": "../x", "prompt": "x"}, 400, "invalid adapter name"),
    ({"model": "deep", "prompt": "x", "made_up": 1}, 400, "'made_up'"),
    ({"model": "deep", "prompt": "x", "max_tokens": "2"}, 422, "max_tokens"),
    ({"model": "deep", "prompt": "x", "echo": True}, 400, "echo is not served"),
    ({"model": "deep", "prompt": "a<|virtual|>b"}, 400, "cannot be placed after text"),
    ({"model": "deep", "prompt": "x", "max_tokens": 100000}, 400, "context"),
])
def test_errors_in_openais_shape(fronted, body, status, says):
    answer = fronted[0].post("/v1/completions", json=body)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert says in error["message"] and error["code"] == status


def test_model_list_and_adapters(fronted):
    ids = [m["id"] for m in fronted[0].get("/v1/models").json()["data"]]
    assert ids[0] == "base" and set(ADAPTERS) <= set(ids)
    listed = fronted[0].get("/v1/adapters").json()["data"]
    assert {a["id"]: a["method"] for a in listed}["prefix"] == "prefix"


def test_a_new_adapter_version_gets_its_own_kv_file_and_salt(fronted):
    front, _, fake, directory, base = fronted
    body = {"model": "prefix", "prompt": PROMPT, "max_tokens": 3}
    front.post("/v1/completions", json=body)
    first = fake.seen[-1][1]
    sp.save_adapter(sp.Adapter.from_method(perturbed(base, "prefix", 5, "other", scale=0.3, seed=9), base),
                    directory / "prefix", overwrite=True)
    front.app.registry.scan()
    front.post("/v1/completions", json=body)
    second = fake.seen[-1][1]
    assert first["cache_salt"] != second["cache_salt"]
    assert first["kv_transfer_params"][PATH_KEY] != second["kv_transfer_params"][PATH_KEY]


def test_events_split_anywhere_are_rewritten_the_same():
    request = VllmRequest(body={}, model="a", chat=True, virtual_tokens=2, prompts=1, top_logprobs=1)
    events = b"".join(b"data: " + json.dumps({"id": "cmpl-9", "object": "text_completion", "created": 0,
                                               "model": "base", "choices": [{"index": 0, "text": t,
                                                                             "finish_reason": None}]}).encode()
                      + b"\n\n" for t in ["a", "b\u00e9", "c"]) + b"data: [DONE]\n\n"
    whole = EventStream(request).feed(events)
    stream = EventStream(request)
    pieces = b"".join(stream.feed(events[i:i + 7]) for i in range(0, len(events), 7)) + stream.close()
    assert pieces == whole and whole.endswith(b"data: [DONE]\n\n")
    chunks = [json.loads(e[6:]) for e in whole.split(b"\n\n") if e.startswith(b"data: {")]
    assert [c["choices"][0]["delta"] for c in chunks] == [{"role": "assistant", "content": "a"},
                                                          {"content": "b\u00e9"}, {"content": "c"}]


def test_launch_command_and_config():
    config = FrontConfig(adapters="/a", model="m", served_names=("base", "m"))
    argv, env = vllm_command(config, "/models/m", "0.0.0.0", 9000, "float32", ["--tensor-parallel-size", "2",
                                                                                "--api-key", "s"])
    assert argv[argv.index("--middleware") + 1] == "softprompts.interop.vllm_front.SoftpromptsFront"
    assert "--enable-prompt-embeds" in argv and argv[-4:] == ["--tensor-parallel-size", "2", "--api-key", "s"]
    assert json.loads(argv[argv.index("--kv-transfer-config") + 1])["kv_connector"] == "SoftpromptsKVConnector"
    assert FrontConfig.from_env({ENV: env[ENV]}) == FrontConfig(**{**config.__dict__, "api_keys": ("s",)})
    with pytest.raises(SoftpromptsError, match="--served-model-name"):
        vllm_command(config, "/m", "h", 1, "float32", ["--served-model-name=x"])
    with pytest.raises(SoftpromptsError, match="softprompts serve --engine vllm"):
        FrontConfig.from_env({})


def test_an_encoder_decoder_base_is_refused_at_start(tmp_path):
    with pytest.raises(SoftpromptsError, match="encoder-decoder model: serve it with the default engine"):
        SoftpromptsFront(FakeVllm(None), FrontConfig(adapters=str(tmp_path), model="t5", poll_s=0), tiny_base("t5"))
