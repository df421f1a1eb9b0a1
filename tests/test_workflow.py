"""The workflow layer under the command line (``softprompts.workflow``): ``softprompts train`` / ``eval`` are their
flags plus one call, and the Python face (``sp.train_files``, ``sp.evaluate_files``) makes the same call, so a run
from Python equals the command's run; the device / torchrun / device-map rules are the workflow's."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from tiny import save_tiny

import softprompts as sp
from softprompts.cli import main
from softprompts.training.distributed import Distributed
from softprompts.workflow import Hardware, Start, TrainFiles

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TEMPLATE, TARGET = "Review: {text}\\nSentiment:", " {label}"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("workflow")
    model = save_tiny("llama", root / "llama")
    rows = [{"text": ("nice " if i % 2 else "poor ") + "y" * (i % 5), "label": "pos" if i % 2 else "neg"}
            for i in range(10)]
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "model": str(model), "data": str(data)}


def without_timings(record: dict) -> dict:
    """A training record without what a clock measures (timings, each curve point's seconds)."""
    curve = [{k: v for k, v in point.items() if k != "seconds"} for point in record["curve"]]
    return {**{k: v for k, v in record.items() if k != "timings"}, "curve": curve}


def test_train_files_is_the_command(env, capsys):
    """``sp.train_files`` with the request the flags make == ``softprompts train``: the same adapter tensors and
    document, the same training record (timings aside), and the line the command prints is ``Trained.summary``."""
    cli_out, api_out = env["root"] / "cli", env["root"] / "api"
    assert main(["train", "--model", env["model"], "--method", "prefix", "--data", env["data"], "--eval-data",
                 env["data"], "--template", TEMPLATE, "--target", TARGET, "--steps", "3", "--eval-every", "2",
                 "--virtual-tokens", "2", "--lr", "0.05", "--out", str(cli_out), "--no-progress"]) == 0
    printed = capsys.readouterr().err.strip().splitlines()[-1]
    request = sp.TrainFiles(api_out, sp.TrainConfig(steps=3, lr=0.05, eval_every=2, progress=False),
                            sp.TaskFlags("classify", TEMPLATE, TARGET, max_prompt_tokens=256, max_target_tokens=64),
                            data=env["data"], eval_data=env["data"], start=Start("prefix", virtual_tokens=2),
                            model=env["model"])
    done = sp.train_files(request)
    assert done.main and done.method == "prefix" and done.summary().startswith(f"saved prefix adapter to {api_out} (")
    assert printed.startswith(f"saved prefix adapter to {cli_out} (") and ", best dev_accuracy " in printed
    cli, api = load_file(str(cli_out / "adapter.safetensors")), load_file(str(api_out / "adapter.safetensors"))
    assert cli.keys() == api.keys() and all(torch.equal(cli[k], api[k]) for k in cli)
    assert (cli_out / "adapter.json").read_text() == (api_out / "adapter.json").read_text()
    records = [json.loads((d / "training.json").read_text()) for d in (cli_out, api_out)]
    assert without_timings(records[0]) == without_timings(records[1])
    resumed = sp.train_files(TrainFiles(api_out, request.config, request.task, data=env["data"], resume=True))
    assert resumed.result is None and resumed.summary() == f"{api_out} is already finished (nothing to resume)"


def test_evaluate_files_is_the_command(env, capsys):
    """``sp.evaluate_files`` == ``softprompts eval --json``, with an adapter (its recorded task) and on the bare
    model (the task the flags describe)."""
    adapter = env["root"] / "evaluated"
    assert main(["train", "--model", env["model"], "--data", env["data"], "--template", TEMPLATE, "--target", TARGET,
                 "--steps", "1", "--virtual-tokens", "2", "--out", str(adapter), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", "--adapter", str(adapter), "--data", env["data"], "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == sp.evaluate_files(sp.EvalFiles(env["data"], sp.Source(str(adapter))))
    assert main(["eval", "--model", env["model"], "--data", env["data"], "--template", TEMPLATE, "--target", TARGET,
                 "--json"]) == 0
    bare = sp.EvalFiles(env["data"], sp.Source(model=env["model"]), sp.TaskFlags(template=TEMPLATE, target=TARGET))
    assert json.loads(capsys.readouterr().out) == sp.evaluate_files(bare)


def test_a_request_refuses_what_the_command_refuses(env, tmp_path):
    """The data rules are the request's: one of data and corpus, and a corpus does not continue an adapter."""
    with pytest.raises(sp.SoftpromptsError, match="--data FILE, or a corpus"):
        sp.train_files(TrainFiles(tmp_path / "a"))
    with pytest.raises(sp.SoftpromptsError, match="a cartridge starts from its corpus"):
        sp.train_files(TrainFiles(tmp_path / "b", corpus=sp.workflow.Corpus(["c.md"]), start=Start(init_from="x")))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_device_rules(monkeypatch):
    """Where the base loads: a device map wins (accelerate places it), then a named device, then the rank's own GPU
    under torchrun, then auto; a device map under torchrun needs one process per node."""
    one, ranks = Distributed(), Distributed(rank=1, world_size=2, local_rank=1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert Hardware().device_for(one) == "auto" and Hardware("cpu").device_for(ranks) == "cpu"
    assert Hardware(device_map="auto").device_for(ranks) is None
    assert Hardware().device_for(ranks) == (ranks.device or "auto")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(sp.SoftpromptsError, match="one process per node"):
        Hardware(device_map="auto").device_for(ranks)
    assert Hardware(device_map="auto").device_for(one) is None  # one process: no torchrun rule


def test_tune_files_is_the_command(env, capsys):
    """``sp.tune_files`` with the request the flags make == ``softprompts tune``: the same trials (parameters and
    dev values), the same best adapter, and the command's line is ``tune_summary``."""
    pytest.importorskip("optuna")
    cli_out, api_out = env["root"] / "tune-cli", env["root"] / "tune-api"
    assert main(["tune", "--model", env["model"], "--data", env["data"], "--eval-data", env["data"], "--template",
                 TEMPLATE, "--target", TARGET, "--trials", "2", "--steps", "2", "--eval-every", "1",
                 "--virtual-tokens-choices", "2,3", "--pruner", "none", "--out", str(cli_out)]) == 0
    printed = capsys.readouterr().err.strip().splitlines()[-1]
    request = sp.TuneFiles(api_out, env["data"], env["data"],
                           sp.TuneConfig(trials=2, virtual_tokens=(2, 3), pruner="none"),
                           sp.TrainConfig(steps=2, lr=sp.METHODS["prompt"].default_lr, eval_every=1),
                           sp.TaskFlags("classify", TEMPLATE, TARGET, max_prompt_tokens=256, max_target_tokens=64),
                           model=env["model"])
    result = sp.tune_files(request)
    assert printed == sp.workflow.tune_summary(result, cli_out)
    best = [json.loads((d / "best.json").read_text()) for d in (cli_out, api_out)]
    assert {k: v for k, v in best[0].items() if "second" not in k} == {k: v for k, v in best[1].items()
                                                                        if "second" not in k}
    cli, api = (load_file(str(d / "best" / "adapter.safetensors")) for d in (cli_out, api_out))
    assert all(torch.equal(cli[k], api[k]) for k in cli)


def test_a_comparison_takes_what_is_not_given_from_the_dataset(tmp_path):
    """``CompareFiles.inputs``: a catalog dataset fills the task, template, target and labels not given (a template
    given replaces the preset's template and target together); given files are used as they are; without data and
    without a dataset the request is refused in one line."""
    from softprompts.compare import CompareConfig

    config = CompareConfig(model="unused", methods=["prompt"], progress=False)
    files = {"data": "a.jsonl", "eval_data": "b.jsonl", "test_data": "c.jsonl"}
    flags, paths = sp.CompareFiles(tmp_path, config, dataset="uci-sentiment", **files).inputs()
    assert (flags.task, flags.template, flags.target, flags.labels) == (
        "classify", "Review: {text}\nSentiment:", " {label}", ["negative", "positive"])
    assert paths == {"train": "a.jsonl", "dev": "b.jsonl", "test": "c.jsonl"}
    own = sp.TaskFlags(template="Text: {text}\nLabel:", labels=["neg", "pos"])
    flags, _ = sp.CompareFiles(tmp_path, config, own, dataset="uci-sentiment", **files).inputs()
    assert (flags.template, flags.target, flags.labels) == ("Text: {text}\nLabel:", None, ["neg", "pos"])
    with pytest.raises(sp.SoftpromptsError, match="--data required"):
        sp.CompareFiles(tmp_path, config).inputs()
