"""The real commands on a tiny model: train -> eval -> generate -> inspect, --init-from, and every bad input
(exit code 2, one message, no traceback, no partial output directory)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import save_tiny

from softprompts.cli import main

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TEMPLATE = ["--template", "Review: {text}\\nSentiment:", "--target", " {label}"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    llama = save_tiny("llama", root / "llama")
    qwen = save_tiny("qwen2", root / "qwen2")
    rows = [{"text": ("nice " if i % 2 else "poor ") + "y" * (i % 5), "label": "pos" if i % 2 else "neg"}
            for i in range(12)]
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    adapter = root / "adapter"
    rc = main(["train", "--model", str(llama), "--method", "prefix", "--data", str(data), "--eval-data", str(data),
               *TEMPLATE, "--steps", "3", "--eval-every", "2", "--virtual-tokens", "2", "--out", str(adapter),
               "--no-progress"])
    assert rc == 0
    return {"root": root, "llama": llama, "qwen": qwen, "data": data, "adapter": adapter}


def train_args(env, out, data=None, *extra) -> list[str]:
    return ["train", "--model", str(env["llama"]), "--method", "prompt", "--data", str(data or env["data"]), *TEMPLATE,
            "--steps", "1", "--virtual-tokens", "2", "--out", str(out), "--no-progress", *extra]


def test_train_writes_adapter_and_record(env):
    adapter = env["adapter"]
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter.json", "adapter.safetensors", "training.json"]
    meta = json.loads((adapter / "adapter.json").read_text())
    assert meta["task"]["labels"] == ["neg", "pos"] and meta["task"]["prompt"] == "Review: {text}\nSentiment:"
    record = json.loads((adapter / "training.json").read_text())
    assert record["curve"][0]["step"] == 0 and record["base_model_dev"]["n"] == 12
    assert {"train_seconds", "tokens_per_second"} <= set(record["timings"])


def test_eval_generate_inspect(env, capsys):
    adapter = str(env["adapter"])
    assert main(["eval", "--adapter", adapter, "--data", str(env["data"]), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["n"] == 12 and 0 <= metrics["accuracy"] <= 1 and "macro_f1" in metrics
    assert main(["generate", "--adapter", adapter, "--max-new-tokens", "3", "nice day", "poor"]) == 0
    assert len(capsys.readouterr().out.splitlines()) >= 2
    assert main(["inspect", adapter]) == 0
    out = capsys.readouterr().out
    assert "prefix" in out and "labels       neg, pos" in out and "best" in out


def test_init_from_continues_and_keeps_task(env, tmp_path, capsys):
    out = tmp_path / "continued"
    args = ["train", "--method", "prefix", "--data", str(env["data"]), "--steps", "1", "--out", str(out),
            "--init-from", str(env["adapter"]), "--no-progress"]
    assert main(args) == 0
    meta = json.loads((out / "adapter.json").read_text())
    assert meta["task"]["labels"] == ["neg", "pos"] and meta["base_model"]["name"] == str(env["llama"])
    assert meta["num_virtual_tokens"] == 2


def bad(env, capsys, args, *needles, out: Path | None = None):
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    if out is not None:
        assert not out.exists()
        assert not list(out.parent.glob(f".{out.name}*")) and not list(out.parent.glob(f"{out.name}.*"))
    return lines[0]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_malformed_json_line(env, tmp_path, capsys):
    data = write(tmp_path / "bad.jsonl",
                 '{"text": "a", "label": "pos"}\n{"text": "b", "label": "neg"}\n{"text": oops}\n')
    bad(env, capsys, train_args(env, tmp_path / "o", data), "bad.jsonl", "line 3", out=tmp_path / "o")


def test_template_field_missing(env, tmp_path, capsys):
    data = write(tmp_path / "d.jsonl", '{"review": "a", "label": "pos"}\n{"review": "b", "label": "neg"}\n')
    bad(env, capsys, train_args(env, tmp_path / "o", data), "'text'", "label, review", out=tmp_path / "o")


def test_empty_dataset(env, tmp_path, capsys):
    data = write(tmp_path / "empty.jsonl", "\n")
    bad(env, capsys, train_args(env, tmp_path / "o", data), "no rows", out=tmp_path / "o")


def test_label_outside_labels(env, tmp_path, capsys):
    data = write(tmp_path / "d.jsonl", '{"text": "a", "label": "pos"}\n{"text": "b", "label": "meh"}\n')
    bad(env, capsys, train_args(env, tmp_path / "o", data, "--labels", "pos,neg"), "'meh'", out=tmp_path / "o")


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_steps_not_positive(env, tmp_path, capsys, steps):
    args = train_args(env, tmp_path / "o")
    args[args.index("--steps") + 1] = steps
    bad(env, capsys, args, "--steps must be a positive integer", out=tmp_path / "o")


def test_gradient_checkpointing_flag_and_bf16_refused_on_cpu(env, tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert main(train_args(env, out, None, "--gradient-checkpointing")) == 0
    assert json.loads((out / "training.json").read_text())["train_config"]["gradient_checkpointing"] is True
    bad(env, capsys, train_args(env, tmp_path / "o", None, "--bf16"), "--bf16", "CUDA", out=tmp_path / "o")


def test_unknown_method(env, tmp_path, capsys):
    args = train_args(env, tmp_path / "o")
    args[args.index("--method") + 1] = "lora"
    bad(env, capsys, args, "unknown method 'lora'", out=tmp_path / "o")


def test_unknown_model(env, tmp_path, capsys):
    args = train_args(env, tmp_path / "o")
    args[args.index("--model") + 1] = str(tmp_path / "no-such-model")
    bad(env, capsys, args, "cannot load model", out=tmp_path / "o")


def test_existing_output_dir_needs_overwrite(env, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    bad(env, capsys, train_args(env, out), "already exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    assert main(train_args(env, out, None, "--overwrite")) == 0
    assert (out / "adapter.safetensors").exists() and not (out / "keep.txt").exists()


def test_adapter_for_another_base_model(env, capsys):
    args = ["eval", "--adapter", str(env["adapter"]), "--data", str(env["data"]), "--model", str(env["qwen"])]
    bad(env, capsys, args, "adapter was made for base model")


def test_truncated_and_corrupted_safetensors(env, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(env["adapter"], broken)
    weights = broken / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:-20])
    bad(env, capsys, ["eval", "--adapter", str(broken), "--data", str(env["data"])], "truncated or corrupted")
    weights.write_bytes(b"\x00" * 64)
    bad(env, capsys, ["generate", "--adapter", str(broken), "hi"], "truncated or corrupted")


@pytest.mark.slow  # a subprocess; test_the_console_script_is_the_cli_main checks the same wiring in-process
def test_installed_entry_point(env, tmp_path):
    """The `softprompts` console script (one subprocess: starting Python + torch is the slow part)."""
    exe = Path(sys.executable).with_name("softprompts")
    assert exe.exists(), "install the package (pip install -e .)"
    done = subprocess.run([str(exe), "inspect", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "adapter.json is missing" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_console_script_is_the_cli_main():
    """In-process twin of ``test_installed_entry_point`` (test-fast): the installed ``softprompts`` script names
    ``softprompts.cli:main``, the function every other test of this file calls."""
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "softprompts"]
    assert script.value == "softprompts.cli:main" and script.load() is main


def test_demo_runs_end_to_end_on_a_tiny_model(env, tmp_path, capsys):
    """The demo's code path (the real one uses SmolLM2 and more steps: `softprompts demo`)."""
    rc = main(["demo", "--model", str(env["llama"]), "--steps", "1", "--dev-limit", "4", "--test-limit", "6",
               "--out", str(tmp_path / "demo")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "none (bare model)" in out and "prompt" in out and "prefix" in out and "ms/token" in out
    assert (tmp_path / "demo" / "prefix" / "adapter.safetensors").exists()


def test_table_references_and_multi_task_eval(env, tmp_path, capsys):
    """eval/generate/inspect take TABLE#NAME; ``eval --table`` runs several tasks in shared batches with the
    metrics each gets alone."""
    other = tmp_path / "other"
    data = env["data"]
    assert main(["train", "--model", str(env["llama"]), "--method", "prompt", "--data", str(data), "--template",
                 "Text: {text}\\nLabel:", "--target", " {label}", "--labels", "pos,neg", "--steps", "2",
                 "--virtual-tokens", "3", "--out", str(other), "--no-progress"]) == 0
    table = str(tmp_path / "table")
    for name, adapter in (("sent", env["adapter"]), ("other", other)):
        assert main(["table", "add", table, "--name", name, "--adapter", str(adapter)]) == 0
    capsys.readouterr()

    def metrics(*args):
        assert main(["eval", *args, "--json"]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    alone = {}
    for name, adapter in (("sent", env["adapter"]), ("other", other)):
        alone[name] = metrics("--adapter", str(adapter), "--data", str(data))
        assert metrics("--adapter", f"{table}#{name}", "--data", str(data)) == alone[name]
        assert metrics("--adapter", f"table:{name}", "--table", table, "--data", str(data)) == alone[name]
    together = metrics("--table", table, "--data", f"sent={data}", "--data", f"other={data}", "--batch-size", "5")
    assert together == alone

    assert main(["generate", "--adapter", f"{table}#sent", "--max-new-tokens", "3", "nice day"]) == 0
    from_table = capsys.readouterr().out
    assert main(["generate", "--adapter", str(env["adapter"]), "--max-new-tokens", "3", "nice day"]) == 0
    assert capsys.readouterr().out == from_table
    assert main(["inspect", f"{table}#other"]) == 0
    out = capsys.readouterr().out
    assert "prompt (soft_prompt, 3 virtual tokens)" in out and "labels       pos, neg" in out
    bad(env, capsys, ["eval", "--table", table, "--data", str(data)], "NAME=FILE")
    bad(env, capsys, ["eval", "--table", table, "--data", f"nope={data}"], "no task 'nope'")


def test_a_missing_subcommand_module_is_an_error(monkeypatch):
    """A typo in the subcommand list must fail loudly, not silently remove a command."""
    import softprompts.cli as cli

    monkeypatch.setattr(cli, "SUBCOMMANDS", [*cli.SUBCOMMANDS, "no_such_command"])
    with pytest.raises(ModuleNotFoundError, match="no_such_command"):
        cli.build_parser()


@pytest.mark.parametrize("count", ["0", "-3"])
def test_virtual_tokens_must_be_positive(env, tmp_path, capsys, count):
    """0 was silently replaced by the method's default (``args.virtual_tokens or default``)."""
    out = tmp_path / "v"
    assert main(train_args(env, out, None, "--virtual-tokens", count)) == 2  # the last flag wins
    assert "num_virtual_tokens must be a positive integer" in capsys.readouterr().err
    assert not out.exists()


# -- eval of any task, with or without an adapter; generate with the bare model ------------------------------------
SENTIMENT = ["--template", "Review: {text}\\nSentiment:", "--target", " {label}"]


def cli_json(capsys, *args) -> dict:
    """``main([*args, "--json"])`` must succeed; its JSON line."""
    assert main([str(a) for a in args] + ["--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def bundled(env):
    """The first 16 short rows of the bundled uci_sentiment test split (the tiny model holds 256 byte tokens)."""
    from softprompts.data.datasets import bundled_path
    from softprompts.data.sources import read_rows

    rows = [r for r in read_rows(bundled_path("uci_sentiment", "test")) if len(r["text"]) < 100][:16]
    path = env["root"] / "bundled.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def llama(env):
    import softprompts as sp

    return sp.load_base(str(env["llama"]))


def api_metrics(base, adapter, path, spec) -> dict:
    """The Python API's metrics for ``adapter`` (None: the bare model) on the rows of ``path``."""
    from softprompts.data.sources import load_task_data
    from softprompts.evaluate import evaluate

    examples, _ = load_task_data(path, spec.prompt_format(base.tokenizer), spec.task, spec.labels)
    return evaluate(base, adapter, examples, spec)


def test_eval_without_adapter_scores_the_bare_model_as_the_api_and_compare_do(env, bundled, llama, tmp_path,
                                                                                capsys):
    from softprompts.tasks import TaskSpec

    got = cli_json(capsys, "eval", "--model", env["llama"], "--data", bundled, *SENTIMENT)
    spec = TaskSpec("classify", "Review: {text}\nSentiment:", " {label}", ["negative", "positive"])
    assert got == api_metrics(llama, None, bundled, spec) and got["n"] == 16
    out = tmp_path / "cmp"
    assert main(["compare", "--model", str(env["llama"]), "--data", str(bundled), "--test-data", str(bundled),
                 *SENTIMENT, "--methods", "prompt", "--steps", "1", "--virtual-tokens", "2", "--latency-tokens", "1",
                 "--no-progress", "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["base_model"]["test"] == got
    generated = cli_json(capsys, "eval", "--model", env["llama"], "--data", bundled, *SENTIMENT, "--task", "generate",
                         "--max-new-tokens", "2")
    want = api_metrics(llama, None, bundled, TaskSpec("generate", "Review: {text}\nSentiment:", " {label}"))
    assert generated["n"] == 16 and set(generated) == set(want)  # max_new_tokens differs: the API decodes 64
    assert generated["perplexity"] == pytest.approx(want["perplexity"])


def test_eval_scores_an_adapter_on_another_task(env, bundled, llama, capsys):
    """Task flags replace the adapter's recorded task: its artifact evaluated on that task through the API."""
    import softprompts as sp
    from softprompts.tasks import TaskSpec

    adapter = sp.load_adapter(env["adapter"], llama)
    other = ["--template", "Text: {text}\\nLabel:", "--target", " {label}"]
    got = cli_json(capsys, "eval", "--adapter", env["adapter"], "--data", bundled, *other)
    spec = TaskSpec("classify", "Text: {text}\nLabel:", " {label}", ["negative", "positive"])
    assert got == api_metrics(llama, adapter, bundled, spec)
    as_generation = ["--task", "generate", "--max-new-tokens", "2"]
    with_adapter = cli_json(capsys, "eval", "--adapter", env["adapter"], "--data", bundled, *other, *as_generation)
    bare = cli_json(capsys, "eval", "--model", env["llama"], "--data", bundled, *other, *as_generation)
    assert with_adapter["perplexity"] != bare["perplexity"]  # the adapter acts (reference log-likelihoods)
    flipped = cli_json(capsys, "eval", "--adapter", env["adapter"], "--data", bundled, *other, "--labels",
                       "positive,negative")
    assert flipped == api_metrics(llama, adapter, bundled, spec.__class__(**{**spec.to_json(),
                                                                             "labels": ["positive", "negative"]}))
    generated = cli_json(capsys, "eval", "--adapter", env["adapter"], "--data", env["data"], "--task", "generate",
                         "--max-new-tokens", "2")  # the recorded template, as a generation task
    assert generated["n"] == 12 and "perplexity" in generated
    same = cli_json(capsys, "eval", "--adapter", env["adapter"], "--data", env["data"])  # nothing given: as recorded
    assert same == api_metrics(llama, adapter, env["data"], adapter.task)


def test_eval_on_chat_rows_with_and_without_an_adapter(env, llama, tmp_path, capsys):
    """Rows holding ``messages`` are rendered with the model's chat template, as ``train`` renders them."""
    import softprompts as sp
    from softprompts.tasks import TaskSpec

    rows = [{"messages": [{"role": "user", "content": ("nice " if i % 2 else "poor ") + "y" * (i % 4)},
                          {"role": "assistant", "content": "pos" if i % 2 else "neg"}]} for i in range(10)]
    chat = write(tmp_path / "chat.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    spec = TaskSpec.for_chat("classify", ["neg", "pos"], "start", "Classify.")
    bare = cli_json(capsys, "eval", "--model", env["llama"], "--data", chat, "--system", "Classify.")
    assert bare == api_metrics(llama, None, chat, spec) and bare["n"] == 10
    adapter = sp.load_adapter(env["adapter"], llama)  # a template adapter (prefix tuning) on chat rows
    got = cli_json(capsys, "eval", "--adapter", env["adapter"], "--data", chat, "--system", "Classify.")
    assert got == api_metrics(llama, adapter, chat, spec)
    bad(env, capsys, ["eval", "--adapter", str(env["adapter"]), "--data", str(chat), "--placement", "user-start"],
        "a KV prefix", "cannot be placed after text")


@pytest.mark.parametrize("args, needles", [
    (["eval", "--model", "{llama}", "--data", "{data}"], ["--template and --target are required", "without --adapter"]),
    (["eval", "--model", "{llama}", "--data", "{data}", *SENTIMENT, "--task", "generate", "--labels", "pos,neg"],
     ["--labels is for --task classify"]),
    (["eval", "--model", "{llama}", "--data", "{data}", "--template", "Review: {text}"],
     ["--template and --target are required"]),
    (["eval", "--model", "{llama}", "--data", "{data}", *SENTIMENT, "--labels", "pos,meh"], ["'neg'", "not one of"]),
    (["eval", "--adapter", "{adapter}", "--data", "{data}", "--system", "S"], ["--placement and --system are for"]),
    (["eval", "--model", "{llama}", "--data", "{data}", "--data", "{data}", *SENTIMENT], ["--data is given once"]),
    (["eval", "--table", "{root}/none", "--data", "a={data}", "--template", "{text}"], ["--template", "--adapter"]),
    (["generate", "--model", "{llama}", "--raw", "--chat", "hi"], ["--raw sends TEXT as is"]),
    (["generate", "--model", "{llama}", "--template", "Q: {q}", "--system", "S", "hi"], ["not both"]),
    (["generate", "--model", "{llama}", "--template", "Q: {q} {r}", "hi"], ["has fields q, r"]),
])
def test_eval_and_generate_task_flag_errors(env, capsys, args, needles):
    for key in ("llama", "data", "adapter", "root"):
        args = [a.replace("{" + key + "}", str(env[key])) for a in args]
    bad(env, capsys, args, *needles)


def test_eval_refuses_an_unknown_task(env, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--model", str(env["llama"]), "--data", str(env["data"]), "--task", "summarize", *SENTIMENT])
    assert exit_.value.code == 2 and "invalid choice: 'summarize'" in capsys.readouterr().err


def test_generate_without_adapter_runs_the_bare_model(env, llama, capsys):
    from softprompts.data.chat import ChatFormat
    from softprompts.evaluate import generate_texts
    from softprompts.tasks import TaskSpec

    def generated(*args) -> str:
        assert main(["generate", "--model", str(env["llama"]), "--max-new-tokens", "4", *args]) == 0
        return capsys.readouterr().out

    assert generated("nice day") == generate_texts(llama, None, ["nice day"], None, 4)[0] + "\n"
    spec = TaskSpec("generate", "Review: {text}\nSentiment:", "{target}")
    want = generate_texts(llama, None, ["Review: nice day\nSentiment:"], spec, 4)[0]
    assert generated("--template", "Review: {text}\\nSentiment:", "nice day") == want + "\n"
    chat = TaskSpec.for_chat("generate", None, "start", "Be brief.")
    prompt = ChatFormat(llama.tokenizer, "start", "Be brief.").render_prompt(
        {"messages": [{"role": "user", "content": "say one"}]})
    assert generated("--chat", "--system", "Be brief.", "say one") == generate_texts(llama, None, [prompt], chat,
                                                                                      4)[0] + "\n"
    adapter_out = main(["generate", "--adapter", str(env["adapter"]), "--max-new-tokens", "4", "--template",
                        "Review: {text}\\nSentiment:", "nice day"])
    assert adapter_out == 0 and capsys.readouterr().out != want + "\n"  # the adapter's prefix acts
