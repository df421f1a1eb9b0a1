"""``compare`` refuses what cannot run before its first training step (and before the model loads where it can), with
every problem listed at once; with no dev rows it carves them from the training rows (``compare/config.carve_dev``).

The trainer (and PEFT's) is patched to fail in the refusal tests: a refusal that comes after a run has trained fails
the test with "training started" instead of the refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny import save_tiny

from softprompts.cli import main
from softprompts.data.datasets import bundled_path
from softprompts.errors import SoftpromptsError

TEMPLATE = r"Review: {text}\nSentiment:"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("preflight") / "model")


def _split(root: Path, split: str, n: int, offset: int = 0) -> Path:
    rows = bundled_path("uci_sentiment", split).read_text().splitlines()[offset : offset + n]
    path = root / f"{split}-{n}.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


def _args(model: Path, root: Path, *extra: str, train: int = 24, dev: int | None = 8, test: int = 8) -> list[str]:
    data = ["--data", str(_split(root, "train", train)), "--test-data", str(_split(root, "test", test))]
    if dev:
        data += ["--eval-data", str(_split(root, "dev", dev))]
    return ["compare", "--model", str(model), *data, "--template", TEMPLATE, "--target", " {label}",
            "--methods", "prompt", "--steps", "2", "--eval-every", "2", "--batch-size", "4", "--virtual-tokens", "4",
            "--latency-tokens", "2", "--no-progress", "--out", str(root / "out"), *extra]


def _forbid(monkeypatch, what: str, *targets: str) -> None:
    def called(*args, **kwargs):
        raise AssertionError(what)

    for target in targets:
        monkeypatch.setattr(target, called)


@pytest.fixture
def no_training(monkeypatch):
    """Any training (ours or PEFT's) fails the test."""
    _forbid(monkeypatch, "training started", "softprompts.compare.runner.train",
            "softprompts.compare.peft_run.run_peft")


@pytest.fixture
def no_model(monkeypatch):
    """Loading the model fails the test (refusals that need no model come before it)."""
    _forbid(monkeypatch, "the model loaded", "softprompts.model.load.load_base", "softprompts.compare.runner.load_base")


def _refused(args: list[str], capsys) -> str:
    assert main(args) == 2
    return capsys.readouterr().err


def test_fewshot_without_dev_rows_carves_them_from_train(model, tmp_path):
    """The issue's command (no dev rows, k chosen on dev) runs: 10% of the 24 training rows (2, seeded) become dev,
    for k and for keep-best; the compare records it."""
    assert main(_args(model, tmp_path, "--baseline", "fewshot", dev=None)) == 0
    settings = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert settings["sizes"] == {"train": 22, "dev": 2, "test": 8}
    assert settings["data"]["dev"] == "2 rows carved from the training rows (seeded)"
    few = json.loads((tmp_path / "out" / "runs" / "fewshot-seed0" / "result.json").read_text())["fewshot"]
    assert few["chosen_by"] == "dev" and few["dev_by_shots"]
    record = json.loads((tmp_path / "out" / "runs" / "prompt-seed0" / "adapter" / "training.json").read_text())
    assert record["best_dev"] is not None  # keep-best ran on the carved rows


def test_carved_dev_is_deterministic_and_disjoint_from_train():
    from softprompts.compare.config import CompareData, carve_dev
    from softprompts.data.datasets import Example

    train = [Example(f"p{i}", " t", "t") for i in range(50)]
    rows = {"train": [{"i": i} for i in range(50)], "dev": [], "test": []}
    one, two = carve_dev(CompareData(None, train, [], [], rows=rows)), carve_dev(CompareData(None, train, [], []))
    assert [e.prompt for e in one.dev] == [e.prompt for e in two.dev] and len(one.dev) == 5 and len(one.train) == 45
    assert {e.prompt for e in one.dev}.isdisjoint(e.prompt for e in one.train)
    assert [r["i"] for r in one.rows["dev"]] == [int(e.prompt[1:]) for e in one.dev]  # chat rows follow their rows
    assert [r["i"] for r in one.rows["train"]] == [int(e.prompt[1:]) for e in one.train]
    big = carve_dev(CompareData(None, train * 60, [], []))
    assert len(big.dev) == 200  # at most 200 rows
    small = CompareData(None, train[:9], [], [])
    assert carve_dev(small) is small  # under 10 rows: nothing carved


def test_fewshot_without_dev_rows_to_carve_refused_before_training(model, tmp_path, capsys, no_training):
    err = _refused(_args(model, tmp_path, "--baseline", "fewshot", train=6, dev=None), capsys)
    assert "choosing k for --baseline fewshot needs dev rows" in err and "--shots K" in err


def test_too_many_shots_refused_before_the_model_loads(model, tmp_path, capsys, no_training, no_model):
    err = _refused(_args(model, tmp_path, "--baseline", "fewshot", "--shots", "30"), capsys)
    assert "30 demonstrations asked for, but only 24 training rows" in err


def test_kv_prefix_after_text_refused_before_training(model, tmp_path, capsys, no_training):
    args = _args(model, tmp_path)
    args[args.index(TEMPLATE)] = r"Review: {text}<|virtual|>\nSentiment:"
    args[args.index("prompt")] = "prompt,prefix"
    err = _refused(args, capsys)
    assert "prefix: prefix makes a KV prefix" in err and "prompt:" not in err


def test_test_rows_beyond_the_context_refused_before_training(model, tmp_path, capsys, no_training):
    """Test rows are only read after training: one that cannot fit the context with the virtual tokens is found
    before (the tiny model has 256 positions)."""
    args = _args(model, tmp_path, "--max-prompt-tokens", "250")
    long = tmp_path / "long-test.jsonl"
    long.write_text(json.dumps({"text": "word " * 120, "label": "positive"}) + "\n")
    args[args.index("--test-data") + 1] = str(long)
    err = _refused(args, capsys)
    assert "test data" in err and "exceed the model's context limit of 256" in err


def test_a_method_without_peft_counterpart_runs_ours_only_and_the_report_says_so(tmp_path):
    """Residual prompt tuning has no PEFT counterpart and is in compare's default set: ``--baseline peft`` without
    ``--methods`` must not be refused (it was, before any training); PEFT runs for the others, ours for it."""
    pytest.importorskip("peft")
    args = _args(save_tiny("llama", tmp_path / "model"), tmp_path, "--baseline", "peft", "--no-lora")
    args[args.index("prompt")] = "prompt,residual"
    assert main(args) == 0
    out = Path(args[args.index("--out") + 1])
    runs = {p.name for p in (out / "runs").iterdir()}
    assert {"prompt-seed0", "residual-seed0", "peft-prompt-seed0"} <= runs and "peft-residual-seed0" not in runs
    assert "`residual`: PEFT has no counterpart of this method (ours only)" in (out / "report.md").read_text()


def test_every_problem_listed_at_once(model, tmp_path, capsys, no_training, no_model):
    args = _args(model, tmp_path, "--baseline", "fewshot", "--shots", "30", "--latency-tokens", "0")
    args[args.index("prompt")] = "prompt,nope"
    err = _refused(args, capsys)
    assert "unknown method 'nope'" in err and "30 demonstrations asked for" in err and "--latency-tokens" in err


def test_options_refused_before_chat_rows_load_the_model(model, tmp_path, capsys, no_model):
    """Chat rows need the model's chat template, so the model loads to read them: the options come first."""
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                     {"role": "assistant", "content": "yes"}]}) + "\n"
                            for i in range(4)))
    args = ["compare", "--model", str(model), "--data", str(chat), "--methods", "nope", "--steps", "2",
            "--no-progress", "--out", str(tmp_path / "out")]
    assert "unknown method 'nope'" in _refused(args, capsys)


def test_python_api_refuses_before_the_model_loads(tmp_path, no_model):
    """Empty training data, and chat few-shot without the rows' messages: refused by ``run_compare`` itself."""
    from softprompts.compare import CompareConfig, CompareData, run_compare
    from softprompts.data.datasets import Example
    from softprompts.tasks import TaskSpec

    config = CompareConfig(model="unused", methods=["prompt"], baseline="fewshot", shots=1, steps=1)
    spec = TaskSpec("classify", "{text}", " {label}", ["a", "b"])
    dev = [Example("x", " a", "a"), Example("y", " b", "b")]
    with pytest.raises(SoftpromptsError, match="the training data is empty"):
        run_compare(config, CompareData(spec, [], dev, dev), tmp_path / "out")
    chat = TaskSpec.for_chat("classify", ["a", "b"])
    with pytest.raises(SoftpromptsError, match="needs the rows' messages"):
        run_compare(config, CompareData(chat, dev, dev, dev), tmp_path / "out")


def test_baseline_lora_runs_the_ceiling_alone(tmp_path):
    pytest.importorskip("peft")
    args = _args(save_tiny("llama", tmp_path / "model"), tmp_path, "--baseline", "lora")
    assert main(args) == 0
    out = Path(args[args.index("--out") + 1])
    assert {p.name for p in (out / "runs").iterdir()} == {"base", "prompt-seed0", "peft-lora-seed0"}
    assert "How far from a weight adapter (PEFT LoRA)" in (out / "report.md").read_text()


def test_compare_explains_each_method_with_explains_own_code(tmp_path):
    """``--explain N``: each method's adapter explained by ``softprompts.explain`` (the same numbers as the command)
    under OUT/explain/<method>/, a section of report.md, and the summaries in results.json; a bad N refused first."""
    from softprompts.cli import main as cli

    model = save_tiny("llama", tmp_path / "model")
    args = _args(model, tmp_path, "--explain", "4")
    args[args.index("prompt")] = "prompt,prefix"
    assert main(args) == 0
    out = Path(args[args.index("--out") + 1])
    results = json.loads((out / "results.json").read_text())
    assert set(results["explain"]) == {"prompt", "prefix"}
    for method in ("prompt", "prefix"):
        alone = tmp_path / f"alone-{method}"
        assert cli(["explain", "--adapter", str(out / "runs" / f"{method}-seed0" / "adapter"), "--model", str(model),
                    "--data", args[args.index("--eval-data") + 1], "--limit", "4", "--out", str(alone)]) == 0
        assert json.loads((alone / "explain.json").read_text())["attention_share"] == \
            results["explain"][method]["attention_share"]
    assert "## Where each method acts (softprompts explain)" in (out / "report.md").read_text()
    (tmp_path / "bad").mkdir()
    assert main(_args(model, tmp_path / "bad", "--explain", "0")) == 2
