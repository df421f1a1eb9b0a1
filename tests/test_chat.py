"""Chat end to end on a tiny model: train/eval/generate/compare/table on `messages` rows, and the server's
`/v1/chat/completions` through the official `openai` client (plain and streamed, with an adapter and with `base`),
its answers equal to the engine's own."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from live_server import live_server
from tiny import concurrently, decode_alone, save_tiny, tiny_base

import softprompts as sp
from softprompts.cli import main
from softprompts.model.generation import GenerationRequest
from softprompts.serve.http import build_state
from softprompts.tasks import split_prompt

openai = pytest.importorskip("openai")


def rows(path: Path, items) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return path


def conversation(user: str, answer: str | None = None, system: str | None = None) -> dict:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return {"messages": messages + ([{"role": "assistant", "content": answer}] if answer is not None else [])}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    save_tiny("llama", root / "model")
    rows(root / "clf.jsonl", [conversation(("nice " if i % 2 else "poor ") + "y" * (i % 4), "pos" if i % 2 else "neg")
                              for i in range(12)])
    rows(root / "gen.jsonl", [conversation(f"say {w}", w, "Be brief.") for w in ["one", "two", "three"] * 4])
    return root


def cli(*args: str) -> int:
    return main([str(a) for a in args])


def test_train_eval_generate_on_chat_rows(work, capsys):
    assert cli("train", "--model", work / "model", "--data", work / "clf.jsonl", "--eval-data", work / "clf.jsonl",
               "--labels", "neg,pos", "--steps", "2", "--virtual-tokens", "2", "--placement", "user-start",
               "--out", work / "clf", "--no-progress") == 0
    task = json.loads((work / "clf" / "adapter.json").read_text())["task"]
    assert task["chat"] == {"placement": "user-start", "system": None} and task["labels"] == ["neg", "pos"]
    capsys.readouterr()
    assert cli("eval", "--adapter", work / "clf", "--data", work / "clf.jsonl", "--json") == 0  # no flags needed
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["n"] == 12 and 0 <= metrics["accuracy"] <= 1
    assert cli("train", "--model", work / "model", "--data", work / "gen.jsonl", "--task", "generate", "--steps", "2",
               "--virtual-tokens", "2", "--placement", "after-system", "--out", work / "gen", "--no-progress") == 0
    capsys.readouterr()
    conv = json.dumps([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "say one"}])
    assert cli("generate", "--adapter", work / "gen", "--max-new-tokens", "3", conv) == 0
    assert capsys.readouterr().out.endswith("\n")  # the answer was printed (a tiny random model's text)
    assert cli("generate", "--adapter", work / "gen", "say one") == 2  # after-system, and no system message
    assert "needs a system message" in capsys.readouterr().err


def test_compare_and_table_take_chat_adapters(work):
    assert cli("compare", "--model", work / "model", "--data", work / "clf.jsonl", "--eval-data", work / "clf.jsonl",
               "--labels", "neg,pos", "--methods", "prompt", "--steps", "2", "--eval-every", "2",
               "--virtual-tokens", "2", "--placement", "after-system", "--system", "Classify.",
               "--latency-tokens", "2", "--no-progress", "--out", work / "cmp") == 0
    results = json.loads((work / "cmp" / "results.json").read_text())
    assert results["task"]["chat"] == {"placement": "after-system", "system": "Classify."}
    assert cli("table", "add", work / "tasks", "--name", "clf", "--adapter", work / "clf") == 0
    assert cli("eval", "--adapter", f"{work / 'tasks'}#clf", "--data", work / "clf.jsonl") == 0


@pytest.mark.parametrize("args, needle", [
    (["--data", "{w}/bad_last.jsonl"], "must be the assistant's answer"),
    (["--data", "{w}/bad_role.jsonl"], "role 'robot'"),
    (["--data", "{w}/bad_content.jsonl"], "must be a string"),
    (["--data", "{w}/clf.jsonl", "--labels", "neg,maybe"], "label 'pos'"),
    (["--data", "{w}/clf.jsonl", "--placement", "after-system"], "needs a system message"),
    (["--data", "{w}/clf.jsonl", "--method", "deep", "--placement", "user-start"], "in front of everything"),
    (["--data", "{w}/clf.jsonl", "--target", " {label}"], "--template and --target are required"),
])
def test_bad_chat_input_is_one_clear_error(work, tmp_path, capsys, args, needle):
    rows(work / "bad_last.jsonl", [conversation("q", "a"), conversation("q")])
    rows(work / "bad_role.jsonl", [{"messages": [{"role": "robot", "content": "q"}, {"role": "assistant",
                                                                                      "content": "a"}]}])
    rows(work / "bad_content.jsonl", [{"messages": [{"role": "user", "content": 3}, {"role": "assistant",
                                                                                      "content": "a"}]}])
    argv = ["train", "--model", str(work / "model"), "--steps", "1", "--virtual-tokens", "2", "--out",
            str(tmp_path / "o"), "--no-progress"] + [a.replace("{w}", str(work)) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tiny_base("llama")
    root = tmp_path_factory.mktemp("served")
    method = sp.create_method(base, "prompt", num_virtual_tokens=3, init_text="abc")
    task = {"task": "generate", "prompt": "", "target": "{label}", "chat": {"placement": "user-start", "system": "S"}}
    sp.save_adapter(sp.Adapter.from_method(method, base, task=task), root / "helper")
    sp.save_adapter(sp.Adapter.from_method(method, base, task={"task": "generate"}), root / "plain")
    state = build_state(base, root, max_running=8, poll_s=0)
    with live_server(state) as port:
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0), state, port


def expected(state, model: str, messages: list[dict], max_tokens: int) -> tuple[str, str]:
    """What the engine alone answers for the conversation (the reference for the HTTP answers)."""
    entry = None if model == "base" else state.registry.get(model)
    chat = state.chat_format(entry)
    lead, ids = split_prompt(state.base, chat.render_prompt({"messages": messages}))
    end = state.base.tokenize(chat.end_of_turn)
    stops = frozenset(sp.model.generation.eos_ids(state.base) | {end[0]})
    result = decode_alone(state.engine, [GenerationRequest(ids, state.artifact(entry, lead), max_tokens,
                                                           stop_ids=stops)])[0]
    return state.base.tokenizer.decode(result.tokens, skip_special_tokens=True), result.finish_reason


@pytest.mark.parametrize("model", ["helper", "plain", "base"])
def test_openai_client_chat_plain_and_streamed(server, model):
    client, state, _ = server
    messages = [{"role": "user", "content": "What is two plus two?"}]
    text, reason = expected(state, model, messages, 6)
    answer = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0)
    assert answer.object == "chat.completion" and answer.model == model
    assert answer.choices[0].message.role == "assistant" and answer.choices[0].message.content == text
    assert answer.choices[0].finish_reason == reason
    assert answer.usage.completion_tokens >= 0 and answer.usage.prompt_tokens > 0
    stream = client.chat.completions.create(model=model, messages=messages, max_completion_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert streamed == text and finals == [reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == answer.usage.prompt_tokens


def test_chat_and_completion_requests_share_a_batch(server):
    client, state, port = server
    messages = [{"role": "user", "content": "hi"}]

    def chat():
        return client.chat.completions.create(model="helper", messages=messages, max_tokens=5,
                                              temperature=0).choices[0].message.content

    def complete():
        with httpx.Client(timeout=60) as c:
            return c.post(f"http://127.0.0.1:{port}/v1/completions", json={
                "model": "plain", "prompt": "plain text", "max_tokens": 5, "temperature": 0}).json()

    first, text, second = concurrently([chat, complete, chat])
    assert first == second == expected(state, "helper", messages, 5)[0]
    assert text["choices"][0]["finish_reason"] in ("stop", "length")
    registry = state.registry  # the fixed lead's KV was computed once, reused
    assert registry.placed_misses >= 1 and registry.placed_hits >= 1


def test_chat_bad_requests(server):
    client, _, _ = server
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="base", messages=[{"role": "user", "content": "x" * 300}], max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="ends with an assistant message"):
        client.chat.completions.create(model="base", messages=[{"role": "user", "content": "x"},
                                                               {"role": "assistant", "content": "y"}])
