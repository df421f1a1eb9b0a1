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
import os

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
from softprompts.model.decode_loop import generate_ids
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
        self.fail_next = False  # answer the next adapter request as vLLM does when a KV load fails
        self.fail_message = "Internal server error"  # vLLM's GenerationError (a KV load failure)

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
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            self.seen.append((scope["path"], raw))
            return await JSONResponse({"error": {"message": "not JSON"}}, status_code=400)(scope, receive, send)
        self.seen.append((scope["path"], body))
        if "stop_token_ids" not in body or ("prompt_embeds" not in body and "kv_transfer_params" not in body):
            # not the front's: only recorded
            return await JSONResponse({"object": "text_completion", "choices": []})(scope, receive, send)
        if self.fail_next:
            self.fail_next = False
            error = {"error": {"message": self.fail_message, "type": "InternalServerError", "param": None,
                               "code": 500}}
            if not body["stream"]:
                return await JSONResponse(error, status_code=500)(scope, receive, send)
            return await StreamingResponse(iter([f"data: {json.dumps(error)}\n\n", "data: [DONE]\n\n"]),
                                           media_type="text/event-stream")(scope, receive, send)
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
    connector = json.loads(argv[argv.index("--kv-transfer-config") + 1])
    assert connector["kv_connector"] == "SoftpromptsKVConnector"
    read = FrontConfig.from_env({ENV: env[ENV]})
    # the connector reads only the directory the front writes to, a private one made for this server
    assert read.kv_dir == connector["kv_connector_extra_config"]["kv_dir"] and os.path.isdir(read.kv_dir)
    assert os.stat(read.kv_dir).st_mode & 0o777 == 0o700
    assert read == FrontConfig(**{**config.__dict__, "api_keys": ("s",), "kv_dir": read.kv_dir})
    with pytest.raises(SoftpromptsError, match="--served-model-name"):
        vllm_command(config, "/m", "h", 1, "float32", ["--served-model-name=x"])
    with pytest.raises(SoftpromptsError, match="softprompts serve --engine vllm"):
        FrontConfig.from_env({})


def test_an_encoder_decoder_base_is_refused_at_start(tmp_path):
    with pytest.raises(SoftpromptsError, match="encoder-decoder model: serve it with the default engine"):
        SoftpromptsFront(FakeVllm(None), FrontConfig(adapters=str(tmp_path), model="t5", poll_s=0), tiny_base("t5"))


PROBES = [  # (path, body, the field named): what a client tried against the base model (issue V)
    ("/v1/completions", {"model": "base", "prompt": [0] * 5 + [7, 8], "max_tokens": 2,
                         "kv_transfer_params": {PATH_KEY: "/etc/hostname", LENGTH_KEY: 5}}, "kv_transfer_params"),
    ("/v1/completions", {"model": "tiny", "prompt_embeds": "AAAA", "max_tokens": 2}, "prompt_embeds"),
    ("/v1/completions", {"model": "base", "prompt": "x", "vllm_xargs": {"kv_transfer_params": ["a", 1]}},
     "vllm_xargs.kv_transfer_params"),
    ("/v1/completions", {"model": "base", "prompt": "x", "ec_transfer_params": {}}, "ec_transfer_params"),
    ("/v1/completions", {"model": "base", "prompt": "x", "cache_salt": SALT_PREFIX + "0" * 64}, "cache_salt"),
    ("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "prompt_embeds", "data": "AAAA"}]}]}, "messages[0].content[1]"),
    ("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "hi"}],
                              "kv_transfer_params": {PATH_KEY: "x"}}, "kv_transfer_params"),
    ("/inference/v1/generate", {"model": "base", "token_ids": [1, 2], "kv_transfer_params": {}},
     "kv_transfer_params"),
    ("/v1/completions", {"model": "deep", "prompt": "x", "kv_transfer_params": {PATH_KEY: "x"}},
     "kv_transfer_params"),
]


@pytest.mark.parametrize(("path", "body", "param"), PROBES)
def test_fields_only_the_front_sets_are_refused_on_every_route_and_model(fronted, path, body, param):
    front, _, fake, _, _ = fronted
    seen = len(fake.seen)
    answer = front.post(path, json=body)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and param.split("[")[0].split(".")[0] in error["message"]
    assert len(fake.seen) == seen, "a refused body must never reach vLLM"


def test_an_operator_can_trust_clients_with_a_field_but_never_with_the_adapters_salt(fronted):
    _, _, fake, directory, base = fronted
    trusting = TestClient(SoftpromptsFront(fake, FrontConfig(adapters=str(directory), model="tiny", poll_s=0,
                                                             client_fields=("prompt_embeds",)), base))
    body = {"model": "base", "prompt_embeds": "AAAA", "max_tokens": 2, "cache_salt": "tenant-7"}
    assert trusting.post("/v1/completions", json=body).status_code == 200
    assert fake.seen[-1] == ("/v1/completions", body)  # a client's own salt is vLLM's feature, kept
    refused = trusting.post("/v1/completions", json={**body, "cache_salt": SALT_PREFIX + "x"})
    assert refused.status_code == 400 and "reserved" in refused.json()["error"]["message"]
    assert fronted[0].post("/v1/completions", json=body).status_code == 400  # the default trusts no one


def test_bodies_that_are_not_json_or_too_deep_reach_vllm_as_sent(fronted):
    front, _, fake, _, _ = fronted
    for raw in (b"[" * 100_000 + b"]" * 100_000, b"{not json"):
        assert front.post("/v1/completions", content=raw).status_code == 400  # the fake vLLM's answer
        assert fake.seen[-1] == ("/v1/completions", raw)


def _kv_path(fake) -> str:
    return fake.seen[-1][1]["kv_transfer_params"][PATH_KEY]


def test_a_kv_file_removed_or_changed_on_disk_is_written_again(fronted):
    front, ours, fake, _, _ = fronted
    body = {"model": "deep", "prompt": "abc", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    want = ours.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert front.post("/v1/completions", json=body).json()["choices"][0]["text"] == want
    path = _kv_path(fake)
    os.remove(path)
    assert front.post("/v1/completions", json=body).json()["choices"][0]["text"] == want
    with open(path, "r+b") as damaged:  # same size, other bytes
        damaged.seek(-8, 2)
        damaged.write(b"\x7f" * 8)
    assert front.post("/v1/completions", json=body).json()["choices"][0]["text"] == want


@pytest.mark.parametrize("stream", [False, True])
def test_a_kv_prefix_vllm_cannot_load_fails_that_request_alone_and_the_next_recovers(fronted, stream):
    front, ours, fake, _, _ = fronted
    body = {"model": "deep", "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "ignore_eos": True,
            "stream": stream}
    front.post("/v1/completions", json={**body, "stream": False})
    path = _kv_path(fake)
    fake.fail_next = True
    failed = front.post("/v1/completions", json=body)
    if stream:
        events = [json.loads(e[6:]) for e in failed.text.split("\n\n") if e.startswith("data: {")]
        error = events[-1]["error"]
    else:
        assert failed.status_code == 503, failed.text
        error = failed.json()["error"]
    assert "'deep'" in error["message"] and "retry" in error["message"] and error["code"] == 503
    assert not os.path.exists(path), "the file vLLM could not load is dropped, to be written again"
    again = front.post("/v1/completions", json={**body, "stream": False})
    want = ours.post("/v1/completions", json={**body, "stream": False}).json()["choices"][0]["text"]
    assert again.status_code == 200 and again.json()["choices"][0]["text"] == want
    assert os.path.exists(_kv_path(fake))


def test_the_connector_reads_only_inside_its_directory(tmp_path):
    from softprompts.interop.vllm_kv_files import inside

    kv_dir = tmp_path / "kv"
    kv_dir.mkdir()
    (kv_dir / "a.safetensors").write_bytes(b"x")
    os.symlink("/etc/hostname", kv_dir / "link.safetensors")
    assert inside(kv_dir / "a.safetensors", kv_dir)
    assert not inside("/etc/hostname", kv_dir) and not inside(kv_dir / ".." / "kv2" / "a", kv_dir)
    assert not inside(kv_dir / "link.safetensors", kv_dir) and not inside(kv_dir, kv_dir)
    assert not inside(str(kv_dir) + "2/a", kv_dir)
    assert inside("/anything", None)  # offline use: the caller owns the process


def test_the_kv_cache_is_sized_to_fit_the_machine():
    from softprompts.interop.vllm_launch import kv_cache_size

    mib, gib = 2**20, 2**30
    per_token = 46_080  # SmolLM2-135M in fp32: 2 * 30 layers * 3 heads * 64 * 4 bytes
    roomy = kv_cache_size(per_token, 512, available=20 * gib)
    assert roomy.bytes == 32 * 512 * per_token and "32 sequences" in roomy.reason
    tight = kv_cache_size(per_token, 8192, available=int(21.44 * gib))  # issue V's machine: vLLM refused to start
    assert tight.bytes == int(21.44 * gib * 0.25) and "a quarter" in tight.reason
    assert kv_cache_size(per_token, 512, available=gib, max_kv_mb=100).bytes == 100 * mib
    with pytest.raises(SoftpromptsError, match="not enough memory for vLLM's KV cache.*--max-model-len"):
        kv_cache_size(per_token, 8192, available=gib)
    with pytest.raises(SoftpromptsError, match="cannot hold one full sequence"):
        kv_cache_size(per_token, 8192, available=20 * gib, max_kv_mb=10)
    with pytest.raises(SoftpromptsError, match="more than the"):
        kv_cache_size(per_token, 512, available=gib, max_kv_mb=4096)


def test_the_kv_cache_is_sized_for_max_model_len_as_vllm_reads_it():
    """``--max-model-len`` takes vLLM's human-readable integers and ``auto``; the launcher sizes the KV cache for
    the same length (it read only plain integers: ``4k`` was a traceback, ``-1`` a negative size)."""
    from softprompts.interop.vllm_launch import max_model_len

    assert max_model_len([], 2048) == 2048
    assert max_model_len(["--max-model-len", "512"], 2048) == 512
    assert max_model_len(["--max-model-len=4k"], 2048) == 4000 and max_model_len(["--max-model-len", "4K"], 9) == 4096
    assert max_model_len(["--max-model-len", "1.5k"], 9) == 1500
    assert max_model_len(["--max-model-len", "auto"], 2048) == max_model_len(["--max-model-len", "-1"], 2048) == 2048
    for bad in ("lots", "0", "1.5K", "-5"):
        with pytest.raises(SoftpromptsError, match="--max-model-len"):
            max_model_len(["--max-model-len", bad], 2048)


def test_the_launcher_sizes_the_kv_cache_for_a_readable_max_model_len(tmp_path, monkeypatch):
    """``serve --engine vllm ... --max-model-len 4k`` on a CPU: room for 32 sequences of 4,000 tokens."""
    import argparse
    import sys
    import types

    from tiny import save_tiny
    from transformers import AutoConfig

    from softprompts.cli.serve_vllm import _kv_cache_option
    from softprompts.interop.vllm_launch import SIZED_SEQUENCES, kv_bytes_per_token

    cpu = types.SimpleNamespace(current_platform=types.SimpleNamespace(is_cpu=lambda: True))
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setitem(sys.modules, "vllm.platforms", cpu)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    path = save_tiny("llama", tmp_path / "model")
    args = argparse.Namespace(extra_args=["--max-model-len", "4k"], max_kv_mb=None)
    per_sequence = kv_bytes_per_token(AutoConfig.from_pretrained(path), "float32") * 4000
    assert _kv_cache_option(args, str(path), "float32") == ["--kv-cache-memory-bytes",
                                                             str(SIZED_SEQUENCES * per_sequence)]


def test_the_cli_offers_exactly_the_fields_the_front_can_allow():
    import argparse

    from softprompts.cli import serve
    from softprompts.interop.vllm_requests import ALLOWABLE_FIELDS

    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers())
    action = next(a for a in parser._subparsers._group_actions[0].choices["serve"]._actions
                  if a.dest == "allow_client_field")
    assert tuple(action.choices) == ALLOWABLE_FIELDS


def test_a_dead_engine_is_not_reported_as_a_kv_load_failure(fronted):
    front, _, fake, _, _ = fronted
    body = {"model": "deep", "prompt": PROMPT, "max_tokens": 2, "temperature": 0, "ignore_eos": True}
    front.post("/v1/completions", json=body)
    path = _kv_path(fake)
    fake.fail_next, fake.fail_message = True, "EngineCore encountered an issue. See stack trace (above)."
    try:
        failed = front.post("/v1/completions", json=body)
    finally:
        fake.fail_message = "Internal server error"
    assert failed.status_code == 500 and "engine process stopped" in failed.json()["error"]["message"]
    assert os.path.exists(path), "the KV file was fine: kept"


def _supervised(script: str, stop: int | None = None) -> tuple[int, str]:
    """``(exit status, stderr)`` of ``supervise`` running ``python -c script`` as the server, sent ``stop`` after
    1.5 s."""
    import subprocess
    import sys
    import time

    code = ("import os, sys\nfrom softprompts.cli.serve_vllm import supervise\n"
            f"sys.exit(supervise([sys.executable, '-c', {script!r}], dict(os.environ)))")
    parent = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    if stop is not None:
        time.sleep(1.5)
        parent.send_signal(stop)
    _, err = parent.communicate(timeout=60)
    return parent.returncode, err


def test_serve_exits_non_zero_when_vllm_stops_on_its_own():
    """vLLM's API server exits 0 when its engine process is killed (measured under load): a supervisor must see a
    failure."""
    code, err = _supervised("import sys; sys.exit(0)")  # vLLM ending by itself, status 0
    assert code == 1 and "stopped on its own" in err
    assert _supervised("import sys; sys.exit(3)")[0] == 3


@pytest.mark.slow  # 1.5 s before each signal
def test_serve_passes_a_stop_signal_on_and_exits_as_the_server_did():
    """Asked to stop, serve passes the signal on and exits as the server did."""
    import signal

    graceful = "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); time.sleep(30)"
    assert _supervised(graceful, stop=signal.SIGTERM)[0] == 0  # asked to stop: the server's own status
    assert _supervised("import time; time.sleep(30)", stop=signal.SIGINT)[0] == 0  # died of the signal passed on
