"""``softprompts serve --engine vllm`` against the real vLLM server, through the official ``openai`` client
(``make test-vllm``, in ``.venv-vllm``).

One server (fp32, prefix caching on, block size 32) over an adapters directory holding a soft prompt, a prefix, a deep
prompt, a cartridge, a chat soft prompt placed after its system message, a DePT adapter (its offsets on the prompt's
embeddings, in prompt_embeds) and a prompt table with two tasks. Every
adapter's greedy answer must equal the default engine's (``softprompts serve``'s app, in this process, on the same
adapters): completions for all, mixed in one burst with base requests so vLLM batches them together, chat for the chat
adapters, streamed and whole. Then: the model list, OpenAI's error shape for an unknown adapter and a refused field, and
hot reload - an adapter replaced while serving answers with its new KV, not the old version's cached blocks.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("vllm.config", reason="vLLM is not installed in this environment; run make test-vllm")

import openai  # noqa: E402
import torch  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from tiny import perturbed  # noqa: E402

import softprompts as sp  # noqa: E402
from softprompts.adapter_io import save_adapter  # noqa: E402
from softprompts.interop.vllm import encode_prompt_embeds  # noqa: E402
from softprompts.model.decode_loop import generate_ids  # noqa: E402
from softprompts.serve.http import build_state, create_app  # noqa: E402
from softprompts.table import PromptTable  # noqa: E402

NEW_TOKENS = 24
PROMPTS = ["Review: a fine, warm film with a great cast.\nSentiment:",
           "Question: what is the capital of France?\nAnswer:"]
CHAT = [{"role": "user", "content": "Name one colour of the sky."}]
CHAT_TASK = {"task": "generate", "prompt": "", "target": "{label}", "chat": {"placement": "after-system",
                                                                               "system": "You answer in one word."}}
# name -> (method, virtual tokens, init text, task)
ADAPTERS = {"soft": ("prompt", 8, "Answer briefly.", None),
            "prefix": ("prefix", 37, "You are a helpful assistant. Answer briefly.", None),
            "deep": ("deep", 37, "Reply in one short sentence, please.", None),
            "cartridge": ("cartridge", 64, "The Eiffel Tower is in Paris. It was built in 1889 for the fair.", None),
            "chatsoft": ("prompt", 6, "Be kind.", CHAT_TASK),
            "dept": ("dept", 8, "Answer briefly.", None)}  # a soft prompt + offsets on the first 256 prompt tokens
STARTUP_S = 420
PARTIAL = "\ufffd"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _adapter(base, name: str, seed: int):
    method, n, init_text, task = ADAPTERS[name]
    return sp.Adapter.from_method(perturbed(base, method, n, init_text, scale=0.1, seed=seed), base, task)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``(vLLM client, default-engine client, adapters directory, base, the server's TMPDIR)``; the vLLM server runs
    for the module."""
    torch.manual_seed(0)
    base = sp.load_base(dtype="float32")
    directory = tmp_path_factory.mktemp("adapters")
    for seed, name in enumerate(ADAPTERS):
        save_adapter(_adapter(base, name, seed), directory / name)
    table = PromptTable.load(directory / "table", base, create=True)
    table.add("a", _adapter(base, "deep", 7))
    table.add("b", _adapter(base, "soft", 8))
    table.save()
    port = _free_port()
    log = (tmp_path_factory.mktemp("log") / "server.log").open("w")
    scratch = tmp_path_factory.mktemp("scratch")  # the server's TMPDIR: its private KV directory is made here
    # no VLLM_CPU_KVCACHE_SPACE: the launcher sizes vLLM's KV cache (room for 32 sequences of 512 tokens)
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    env = {**env, "OMP_NUM_THREADS": "1", "TMPDIR": str(scratch)}
    server = subprocess.Popen([sys.executable, "-m", "softprompts", "serve", "--engine", "vllm", "--adapters",
                               str(directory), "--port", str(port), "--poll-seconds", "0.5", "--max-model-len", "512",
                               "--block-size", "32", "--enforce-eager", "--seed", "0"],
                              stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300)
    deadline = time.time() + STARTUP_S
    while True:
        try:
            client.models.list()
            break
        except openai.APIConnectionError:
            if server.poll() is not None or time.time() > deadline:
                server.kill()
                pytest.fail(f"the vLLM server did not start:\n{open(log.name).read()[-4000:]}")
            time.sleep(2)
    started = open(log.name).read()
    assert "vLLM's KV cache: 0.70 GiB, room for 32 sequences of 512 tokens" in started, started[-3000:]
    state = build_state(base, directory, poll_s=0)
    try:
        with TestClient(create_app(state)) as ours:
            yield client, ours, directory, base, scratch
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)


def _completion(client, model: str, prompt: str, stream: bool = False) -> str:
    fields = {"model": model, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0.0,
              "extra_body": {"ignore_eos": True}}
    if not stream:
        return client.completions.create(**fields).choices[0].text
    return "".join(chunk.choices[0].text for chunk in client.completions.create(**fields, stream=True)
                   if chunk.choices)


def _ours(ours, path: str, body: dict) -> dict:
    answer = ours.post(path, json=body)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_every_adapter_kind_gives_the_default_engines_tokens(served):
    client, ours, _, _, _ = served
    names = ["base", *[n for n in ADAPTERS if n != "chatsoft"], "table.a", "table.b"]
    jobs = [(name, prompt) for prompt in PROMPTS for name in names]
    with ThreadPoolExecutor(len(jobs)) as pool:  # one burst: vLLM batches adapters and base together
        got = list(pool.map(lambda job: _completion(client, *job), jobs))
    want = [_ours(ours, "/v1/completions", {"model": name, "prompt": prompt, "max_tokens": NEW_TOKENS,
                                            "temperature": 0.0, "ignore_eos": True})["choices"][0]["text"]
            for name, prompt in jobs]
    # an answer that ends inside a multi-byte character: the default engine writes U+FFFD for the partial bytes,
    # vLLM holds them back; the tokens are the same
    wrong = {job: (g, w) for job, g, w in zip(jobs, got, want, strict=True) if g.rstrip(PARTIAL) != w.rstrip(PARTIAL)}
    assert not wrong, f"vLLM (got) vs the default engine (want): {wrong}"
    base_answers = dict(zip(jobs, got, strict=True))
    for name in names[1:]:  # each adapter changes the answer, so equality is the adapter's doing
        assert any(base_answers[(name, p)] != base_answers[("base", p)] for p in PROMPTS), name
    for name in ("deep", "soft"):
        assert _completion(client, name, PROMPTS[0], stream=True) == base_answers[(name, PROMPTS[0])]


def test_dept_offsets_reach_vllm(served):
    """DePT's answers on vLLM (equal to the default engine's above) are not its soft prompt's alone: the offsets
    on the prompt's embeddings reach vLLM."""
    client, _, directory, base, _ = served
    artifact = sp.load_adapter(directory / "dept", base).artifact
    soft_only = generate_ids(base, [base.tokenize(p) for p in PROMPTS], artifact.prompt, max_new_tokens=NEW_TOKENS,
                             stop_ids=set())
    got = [_completion(client, "dept", p) for p in PROMPTS]
    assert got != [base.tokenizer.decode(t, skip_special_tokens=True) for t in soft_only]


@pytest.mark.parametrize("name", ["chatsoft", "deep"])
def test_chat_applies_placement_and_system_message(served, name):
    client, ours, _, _, _ = served
    body = {"model": name, "messages": CHAT, "max_tokens": NEW_TOKENS, "temperature": 0.0}
    want = _ours(ours, "/v1/chat/completions", body)["choices"][0]
    answer = client.chat.completions.create(**body)
    assert answer.object == "chat.completion" and answer.model == name
    assert answer.choices[0].message.content == want["message"]["content"]
    assert answer.choices[0].finish_reason == want["finish_reason"]
    chunks = list(client.chat.completions.create(**body, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want["message"]["content"]
    assert chunks[-1].usage.prompt_tokens == answer.usage.prompt_tokens
    ours_usage = _ours(ours, "/v1/chat/completions", body)["usage"]
    assert answer.usage.prompt_tokens == ours_usage["prompt_tokens"]  # virtual tokens are not counted
    scored = client.chat.completions.create(**body, logprobs=True, top_logprobs=2)
    tokens = scored.choices[0].logprobs.content
    assert len(tokens) == scored.usage.completion_tokens > 0
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in tokens)
    assert all(t.top_logprobs[0].logprob >= t.logprob - 1e-4 for t in tokens)  # greedy: the top one was chosen


def test_models_and_errors_in_openais_shape(served):
    client, _, _, _, _ = served
    ids = {m.id for m in client.models.list().data}
    assert {"base", *ADAPTERS, "table.a", "table.b"} <= ids
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    assert "nope" in missing.value.body["message"] and missing.value.body["type"] == "not_found_error"
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="deep", prompt="hi", max_tokens=2, extra_body={"made_up": 1})
    assert "made_up" in refused.value.body["message"]
    with pytest.raises(openai.BadRequestError) as echo:
        client.completions.create(model="deep", prompt="hi", max_tokens=2, echo=True)
    assert "echo" in echo.value.body["message"]
    assert client.completions.create(model="base", prompt="hi", max_tokens=2, echo=True).choices[0].text


def test_a_replaced_adapter_is_served_with_its_new_kv(served):
    """Hot reload, and versions never share cached KV: the same name and length (so the same placeholder blocks,
    which prefix caching holds from the earlier requests), other values."""
    client, ours, directory, base, _ = served
    before = _completion(client, "prefix", PROMPTS[1])
    replacement = sp.Adapter.from_method(perturbed(base, "prefix", 37, "Say no.", scale=0.3, seed=11), base)
    save_adapter(replacement, directory / "prefix", overwrite=True)
    ours.app.state.serve.registry.scan()
    want = _ours(ours, "/v1/completions", {"model": "prefix", "prompt": PROMPTS[1], "max_tokens": NEW_TOKENS,
                                           "temperature": 0.0, "ignore_eos": True})["choices"][0]["text"]
    assert want != before, "the replacement was meant to answer differently"
    deadline = time.time() + 30
    while (after := _completion(client, "prefix", PROMPTS[1])) == before and time.time() < deadline:
        time.sleep(0.5)
    assert after == want


def test_a_client_cannot_make_the_server_open_a_file_or_take_a_tensor(served):
    """Issue V's probes, against the base model: each is a 400 naming the field, and the server keeps answering."""
    client, _, directory, base, _ = served
    ids = base.tokenize(PROMPTS[1])
    for path in (str(directory / "prefix" / "adapter.safetensors"), "/etc/hostname"):
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model="base", prompt=[0] * 37 + ids, max_tokens=4, extra_body={
                "kv_transfer_params": {"softprompts_kv": path, "num_virtual_tokens": 37}})
        assert refused.value.body["param"] == "kv_transfer_params", refused.value.body
    embeds = encode_prompt_embeds(torch.randn(12, base.model.config.hidden_size))
    probes = [("completions", {"model": "base", "prompt": "", "max_tokens": 2, "extra_body": {"prompt_embeds": embeds}},
               "prompt_embeds"),
              ("completions", {"model": "base", "prompt": "hi", "max_tokens": 2,
                               "extra_body": {"cache_salt": "softprompts-kv-" + "0" * 64}}, "cache_salt"),
              ("completions", {"model": "base", "prompt": "hi", "max_tokens": 2,
                               "extra_body": {"vllm_xargs": {"kv_transfer_params": ["x"]}}},
               "vllm_xargs.kv_transfer_params"),
              ("chat", {"model": "base", "max_tokens": 2, "messages": [{"role": "user", "content": [
                  {"type": "prompt_embeds", "data": embeds}]}]}, "messages[0].content[0]")]
    for kind, fields, param in probes:
        create = client.completions.create if kind == "completions" else client.chat.completions.create
        with pytest.raises(openai.BadRequestError) as refused:
            create(**fields)
        assert refused.value.body["param"] == param, refused.value.body
    assert client.completions.create(model="base", prompt="hi", max_tokens=2, extra_body={"cache_salt": "mine"}
                                     ).choices[0].text  # a client's own salt is vLLM's feature, kept


def test_a_kv_file_removed_or_damaged_on_disk_is_written_again(served):
    client, _, _, _, scratch = served
    want = _completion(client, "cartridge", PROMPTS[0])
    files = list(scratch.glob("softprompts-vllm-kv-*/cartridge.*.safetensors"))
    assert files, f"no KV file of the cartridge under {scratch}"
    for path in files:
        path.unlink()
    assert _completion(client, "cartridge", PROMPTS[0]) == want
    for path in scratch.glob("softprompts-vllm-kv-*/cartridge.*.safetensors"):
        path.write_bytes(b"not a safetensors file")
    assert _completion(client, "cartridge", PROMPTS[0]) == want


def test_a_start_that_cannot_fit_is_one_clear_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    done = subprocess.run([sys.executable, "-m", "softprompts", "serve", "--engine", "vllm", "--adapters",
                           str(tmp_path), "--max-model-len", "512", "--max-kv-mb", "1"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "--max-kv-mb 1 cannot hold one full sequence" in done.stderr and "lower --max-model-len" in done.stderr
