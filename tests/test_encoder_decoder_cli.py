"""The command line end to end on tiny local T5 and BART directories: train, eval, generate, tables, compare, PEFT
export; the surfaces that run decoder-only models only (vLLM export, sp.wrap, the PEFT baseline, --compile,
gradient checkpointing) refuse an encoder-decoder base with one clear error."""

from __future__ import annotations

import json

import pytest
from tiny import save_tiny

import softprompts as sp
from softprompts.cli import main

ROWS = [{"text": f"item {i} {'good great' if i % 2 else 'bad awful'}", "label": "pos" if i % 2 else "neg"}
        for i in range(24)]
TASK = ["--task", "classify", "--labels", "neg,pos", "--template", "Review: {text}", "--target", "{label}"]


@pytest.fixture(scope="module", params=["t5", "bart"])
def env(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    model = save_tiny(request.param, root / "model")
    data = root / "cls.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    adapters = {}
    for method in ("prompt", "prefix"):
        out = root / method
        assert main(["train", "--model", str(model), "--data", str(data), *TASK, "--method", method, "--steps", "3",
                     "--batch-size", "4", "--out", str(out), "--no-progress"]) == 0
        adapters[method] = out
    return {"root": root, "model": model, "data": data, "adapters": adapters}


def eval_json(capsys, *args) -> dict:
    capsys.readouterr()
    assert main(["eval", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_train_eval_generate(env, capsys):
    for method, adapter in env["adapters"].items():
        record = json.loads((adapter / "adapter.json").read_text())
        assert record["base_model"]["shapes"]["encoder_layers"] == 2, method
        result = eval_json(capsys, "--adapter", str(adapter), "--data", str(env["data"]))
        assert result["n"] == len(ROWS) and 0 <= result["accuracy"] <= 1
        assert main(["generate", "--adapter", str(adapter), "--max-new-tokens", "3", "Review: item 3 good"]) == 0


def test_table_of_both_kinds_equals_each_adapter(env, capsys, tmp_path):
    table = str(tmp_path / "table")
    for name, adapter in env["adapters"].items():
        assert main(["table", "add", table, "--name", name, "--adapter", str(adapter)]) == 0
    capsys.readouterr()
    data = str(env["data"])
    assert main(["eval", "--table", table, "--data", f"prompt={data}", "--data", f"prefix={data}", "--json"]) == 0
    together = json.loads(capsys.readouterr().out)
    for name, adapter in env["adapters"].items():
        alone = eval_json(capsys, "--adapter", str(adapter), "--data", data)
        assert together[name]["accuracy"] == alone["accuracy"], name


def test_compare_runs_every_method(env, tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", "--model", str(env["model"]), "--data", str(env["data"]), "--eval-data",
                 str(env["data"]), *TASK, "--methods", "prompt,prefix,ptuning,deep", "--steps", "2",
                 "--batch-size", "4", "--eval-every", "2", "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"prompt", "prefix", "ptuning", "deep"}


def test_peft_export_of_a_soft_prompt_and_refusals(env, tmp_path, capsys):
    assert main(["export", "--adapter", str(env["adapters"]["prompt"]), "--out", str(tmp_path / "p")]) == 0
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["task_type"] == "SEQ_2_SEQ_LM"
    refusals = [
        (["export", "--adapter", str(env["adapters"]["prefix"]), "--out", str(tmp_path / "q")], "decoder only"),
        (["export", "--adapter", str(env["adapters"]["prompt"]), "--format", "vllm", "--out", str(tmp_path / "v")],
         "vLLM's prompt_embeds input is for decoder-only"),
        (["compare", "--model", str(env["model"]), "--data", str(env["data"]), *TASK, "--methods", "prompt",
          "--baseline", "peft", "--steps", "1", "--out", str(tmp_path / "c"), "--no-progress"], "--baseline peft"),
    ]
    for flag in ("--compile", "--gradient-checkpointing"):
        refusals.append((["train", "--model", str(env["model"]), "--data", str(env["data"]), *TASK, "--steps", "1",
                          "--out", str(tmp_path / "t"), "--no-progress", flag], f"{flag} runs on decoder-only"))
    for argv, message in refusals:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert not any((tmp_path / name).exists() for name in ("q", "v", "t"))
    with pytest.raises(sp.SoftpromptsError, match="encoder-decoder"):
        sp.wrap(str(env["model"]), "prompt")
