"""``softprompts compare`` end to end on a tiny random model and a tiny slice of the bundled sentiment data.

One compare (2 methods + the PEFT baseline for both, and the few-shot baseline beside them: ``--baseline
peft,fewshot``) is shared by the tests through a module fixture; a second invocation of the same command must skip
every finished run and a run with a missing result is redone.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from tiny import save_tiny

from softprompts.cli import main
from softprompts.data.datasets import bundled_path

pytest.importorskip("peft")
pytest.importorskip("matplotlib")


def _compare_args(model: Path, out: Path, methods: str = "prompt,prefix") -> list[str]:
    tiny = out.parent / "data"
    tiny.mkdir(exist_ok=True)
    for split, n in (("train", 24), ("dev", 12), ("test", 12)):
        rows = bundled_path("uci_sentiment", split).read_text().splitlines()[:n]
        (tiny / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    return ["compare", "--model", str(model), "--task", "classify", "--data", str(tiny / "train.jsonl"),
            "--eval-data", str(tiny / "dev.jsonl"), "--test-data", str(tiny / "test.jsonl"),
            "--template", r"Review: {text}\nSentiment:", "--target", " {label}", "--methods", methods,
            "--steps", "4", "--eval-every", "2", "--batch-size", "4", "--virtual-tokens", "4",
            "--latency-tokens", "3", "--no-progress", "--out", str(out)]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    model = save_tiny("llama", root / "model")
    out = root / "out"
    args = _compare_args(model, out)
    assert main(args + ["--baseline", "peft,fewshot"]) == 0
    # a second PEFT method only for the baseline part is not needed: prompt+prefix ours, both through PEFT too
    return out, args


def _finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def test_results_json_fields_hold_real_numbers(compared):
    out, _ = compared
    results = json.loads((out / "results.json").read_text())
    assert results["primary_metric"] == "accuracy"
    methods = results["methods"]
    assert {"prompt", "prefix", "peft:prompt", "peft:prefix", "peft:lora", "fewshot"} <= set(methods)
    assert methods["fewshot"]["trainable_params"] == 0 and methods["fewshot"]["fewshot"]["shots"]  # test_fewshot.py
    for label, m in methods.items():
        if label == "fewshot":
            continue
        assert m["failed"] == 0, (label, m["issues"])
        assert m["trainable_params"] > 0 and m["adapter_params"] > 0 and m["adapter_bytes"] > 0
        assert 0.0 <= m["test"]["accuracy"]["mean"] <= 1.0 and 0.0 <= m["best_dev"]["mean"] <= 1.0
        assert m["train_seconds"]["mean"] > 0 and m["tokens_per_second"]["mean"] > 0
        assert m["peak_memory_bytes"]["mean"] > 10 * 2**20  # a python process with torch: well over 10 MB
        for key in ("ttft_ms", "per_token_ms"):
            assert _finite(m[key]["mean"]) and 0 <= m[key]["mean"] < 60_000  # ms; the machine may be loaded
            assert _finite(m[key.replace("_ms", "_overhead_ms")]["mean"])  # vs the bare model timed beside it
    ours = [r for r in results["runs"] if r["impl"] == "softprompts"]
    assert {r["artifact"] for r in ours} == {"soft_prompt", "kv_prefix"}
    for r in ours:
        assert r["steps"] == 4 and [p["step"] for p in r["curve"] if "dev_accuracy" in p] == [0, 2, 4]
    # the KV prefix stores more per virtual token than a soft prompt (2 * layers * kv width vs hidden)
    assert methods["prefix"]["adapter_params"] > methods["prompt"]["adapter_params"]
    base = results["base_model"]
    assert 0 <= base["test"]["accuracy"] <= 1 and base["latency"]["ttft_ms"] > 0 and base["latency_hf"]["ttft_ms"] > 0
    assert results["machine"]["cpu_count"] >= 1 and results["machine"]["torch"]


def test_peft_prefix_generate_flagged(compared):
    out, _ = compared
    results = json.loads((out / "results.json").read_text())
    issues = " ".join(results["methods"]["peft:prefix"]["issues"])
    import transformers

    if tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (5, 24):
        assert "prefix ignored" in issues  # PEFT 0.21 drops the prefix in generate() on transformers >= 5.24
    assert "prefix ignored" not in " ".join(results["methods"]["peft:prompt"]["issues"])
    assert "no effect" not in " ".join(results["methods"]["peft:lora"]["issues"])  # checked with LoRA switched off


def test_report_and_plots(compared):
    out, _ = compared
    results = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    winner = results["recommendation"]["winner"]
    assert winner in {"prompt", "prefix"}
    verdict = [line for line in report.splitlines() if line.startswith("**Recommendation:")]
    assert len(verdict) == 1 and f"`{winner}`" in verdict[0]
    assert report.index("## Recommendation") > report.index("## Results")
    for needle in ("| no adapter |", "| prompt |", "| peft:prefix |", "Side by side with Hugging Face PEFT",
                   "**Size:**", "**Latency:**", "KV prefix vs soft prompt",
                   "## How far from a weight adapter (PEFT LoRA)", "- LoRA (rank 8 on every linear layer",
                   "## Few-shot in the prompt (no training)", "| fewshot (k=", "**Train at all?**"):
        assert needle in report, needle
    for name in ("learning_curves.png", "quality_vs_size.png", "latency.png", "quality_vs_context.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000


def test_resume_skips_finished_runs_and_redoes_missing(compared, capsys):
    out, args = compared
    finished = out / "runs" / "prompt-seed0" / "result.json"
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/result.json")}
    redo = out / "runs" / "prefix-seed0" / "result.json"
    os.remove(redo)
    assert main(args + ["--baseline", "peft,fewshot"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["resume"]["ran"] == ["prefix-seed0"]
    assert set(results["resume"]["skipped"]) == {"prompt-seed0", "peft-prompt-seed0", "peft-prefix-seed0",
                                                 "peft-lora-seed0", "fewshot-seed0"}
    assert finished.stat().st_mtime_ns == before[finished]
    assert redo.is_file()
    assert "skipped 5 finished run(s)" in capsys.readouterr().err


def test_other_settings_refused(compared):
    out, args = compared
    changed = [a if a != "4" else "5" for a in args]  # --steps 5 ...
    assert main(changed) == 2


def test_minutes_budget_becomes_steps_per_method_once(tmp_path):
    """``--minutes M``: 2 timed steps per method give its step count, stored so a resumed compare keeps it."""
    model = save_tiny("llama", tmp_path / "model")
    out = tmp_path / "out"
    args = _compare_args(model, out, methods="prompt")
    args[args.index("--steps") : args.index("--steps") + 2] = ["--minutes", "0.02"]  # 1.2 s of training per run
    assert main(args) == 0
    settings = json.loads((out / "compare.json").read_text())
    steps = settings["steps_per_method"]["prompt"]
    record = json.loads((out / "runs" / "prompt-seed0" / "adapter" / "training.json").read_text())
    assert steps >= 1 and record["steps_done"] == steps
    shutil.rmtree(out / "runs" / "prompt-seed0")  # the whole run, adapter included: it must train again
    assert main(args) == 0  # redone with the stored step count, not re-timed
    assert json.loads((out / "compare.json").read_text())["steps_per_method"] == {"prompt": steps}
    assert json.loads((out / "runs" / "prompt-seed0" / "adapter" / "training.json").read_text())["steps_done"] == steps


def test_peft_missing_is_one_clear_error(monkeypatch):
    import sys

    from softprompts.compare.peft_baseline import PeftMissingError, import_peft

    monkeypatch.setitem(sys.modules, "peft", None)  # makes `import peft` fail like an absent package
    with pytest.raises(PeftMissingError, match=r"pip install 'softprompts\[peft\]'"):
        import_peft()


def _entry(method: str, artifact: str, accs: list[float], size: int, ttft: float = 10.0) -> dict:
    from softprompts.compare.report import _stats

    return {"impl": "softprompts", "method": method, "artifact": artifact, "adapter_bytes": size,
            "test": {"accuracy": _stats(accs)}, "best_dev": _stats(accs), "ttft_ms": _stats([ttft]),
            "per_token_ms": _stats([1.0]), "ttft_overhead_ms": _stats([ttft - 5]),
            "per_token_overhead_ms": _stats([0.1])}


def test_recommendation_follows_the_numbers():
    from softprompts.compare.report import recommend

    base = {"test": {"accuracy": 0.70, "n": 500}}
    clear = {"prompt": _entry("prompt", "soft_prompt", [0.80, 0.81, 0.79], 1000),
             "prefix": _entry("prefix", "kv_prefix", [0.90, 0.91, 0.89], 10000, ttft=12.0)}
    rec = recommend(clear, base, "accuracy", 500)
    text = "\n".join(rec["text"])
    assert rec["winner"] == "prefix" and "10.0 points" in text and "a real difference" in text
    assert "10.0x smaller" in text and "+10.0 points quality" in text and "+2.0 ms first token" in text
    tie = {"prompt": _entry("prompt", "soft_prompt", [0.80, 0.85, 0.75], 1000),
           "prefix": _entry("prefix", "kv_prefix", [0.81, 0.86, 0.76], 10000)}
    rec = recommend(tie, base, "accuracy", 500)
    assert rec["winner"] == "prompt" and "a tie on this data" in "\n".join(rec["text"])
    # the gap (1.3 points) exceeds each seed std (1.0) but is 1.6 standard errors of the difference over 3 seeds:
    # not a real difference, so the 10x smaller adapter is recommended
    close = {"prompt": _entry("prompt", "soft_prompt", [0.79, 0.80, 0.81], 1000),
             "prefix": _entry("prefix", "kv_prefix", [0.803, 0.813, 0.823], 10000)}
    rec = recommend(close, base, "accuracy", 500)
    text = "\n".join(rec["text"])
    assert rec["winner"] == "prompt" and rec["best_quality"] == "prefix"
    assert "1.6 standard errors of the difference (over 3 seeds" in text and "a tie on this data" in text
    worse = {"prompt": _entry("prompt", "soft_prompt", [0.60], 1000)}
    assert "**But:**" in "\n".join(recommend(worse, base, "accuracy", 500)["text"])


def test_comparison_leaves_the_callers_config_alone(tmp_path):
    """Aliases are resolved for the runs, not written back into the caller's ``CompareConfig``."""
    from softprompts.compare import CompareConfig, CompareData, Comparison
    from softprompts.data.datasets import Example
    from softprompts.tasks import TaskSpec

    config = CompareConfig(model="unused", methods=["p-tuning", "prompt_tuning"], steps=1)
    spec = TaskSpec("classify", "{text}", " {label}", ["a", "b"])
    rows = [Example("x", " a", "a")]
    comparison = Comparison(config, CompareData(spec, rows, rows, []), tmp_path / "out")
    assert comparison.methods == ["ptuning", "prompt"]
    assert config.methods == ["p-tuning", "prompt_tuning"]


def test_lora_run_leaves_the_base_model_as_it_was():
    """LoRA wraps the model's own linear layers; after ``release`` the base is the same model (same modules, same
    logits, frozen), so every run after it starts from the bare model."""
    from tiny import tiny_base

    from softprompts.compare.config import CompareData
    from softprompts.compare.peft_baseline import LORA, PeftSpec, release, run_peft
    from softprompts.data.datasets import build_examples
    from softprompts.tasks import TaskSpec
    from softprompts.training import TrainConfig

    base = tiny_base("llama")
    spec = TaskSpec("classify", "Review: {text}\nSentiment:", " {label}", ["negative", "positive"])
    rows = [{"text": f"text {i}", "label": ["negative", "positive"][i % 2]} for i in range(8)]
    examples, _ = build_examples(rows, spec.template, "classify", spec.labels)
    ids = torch.tensor([base.tokenize("hello world")])
    before = base.model(input_ids=ids).logits
    modules = [type(m).__name__ for m in base.model.modules()]
    config = TrainConfig(steps=3, lr=1e-2, batch_size=4, eval_every=0, progress=False)
    result = run_peft(base, PeftSpec(LORA, None, config), CompareData(spec, examples, examples[:4], examples[:4]))
    assert result.trainable_params > 0 and result.steps_done == 3
    assert any(hasattr(m, "lora_A") for m in base.model.modules())  # LoRA layers were in the model
    release(result, base)
    assert [type(m).__name__ for m in base.model.modules()] == modules
    assert not any(p.requires_grad for p in base.model.parameters()) and not base.model.training
    torch.testing.assert_close(base.model(input_ids=ids).logits, before)


@pytest.mark.parametrize("stop", ["patience", "on_eval"])
def test_peft_loop_keeps_and_stops_by_our_loops_rules(monkeypatch, stop):
    """Fed the same dev scores, compare's PEFT loop and our loop evaluate at the same steps, keep the same step (ties
    keep the earlier) and stop early at the same step, by ``patience`` as by ``on_eval`` (``training/cadence.py``:
    one set of rules for both)."""
    from tiny import tiny_base

    import softprompts.compare.peft_baseline as peft_baseline
    import softprompts.training.loop as loop
    from softprompts.compare.config import CompareData
    from softprompts.compare.peft_baseline import LORA, PeftSpec, release, run_peft
    from softprompts.data.datasets import build_examples
    from softprompts.methods import create_method
    from softprompts.tasks import TaskSpec
    from softprompts.training import TrainConfig, train

    scripted = [0.5, 0.7, 0.7, 0.6, 0.9, 0.9, 0.9, 0.9]  # step 1 is best; steps 2 (a tie) and 3 are bad evaluations
    spec = TaskSpec("classify", "Review: {text}\nSentiment:", " {label}", ["negative", "positive"])
    rows = [{"text": f"text {i}", "label": ["negative", "positive"][i % 2]} for i in range(8)]
    examples, _ = build_examples(rows, spec.template, "classify", spec.labels)
    patience = 2 if stop == "patience" else 0
    config = TrainConfig(steps=7, lr=1e-2, batch_size=4, eval_every=1, patience=patience, checkpoint_every=0,
                         progress=False)

    def on_eval(step: int, metric: float) -> bool:
        return stop == "on_eval" and step == 3

    def scores(n: int):
        it = iter(scripted)
        return lambda *a: {"accuracy": next(it), "macro_f1": 0.0, "n": n}

    monkeypatch.setattr(loop, "dev_score", scores(4))
    base = tiny_base("llama")
    ours = train(base, create_method(base, "prompt", num_virtual_tokens=2, seed=0), examples, spec, config,
                 dev_examples=examples[:4], base_dev={"accuracy": 0.0, "macro_f1": 0.0, "n": 4},
                 on_eval=on_eval).record
    monkeypatch.setattr(peft_baseline, "make_evaluator", lambda base, task: scores(4))
    peft = run_peft(base, PeftSpec(LORA, None, config), CompareData(spec, examples, examples[:4], []), on_eval=on_eval)
    release(peft, base)
    assert ours["stopped_early"] and peft.stopped_early
    assert ours["steps_done"] == peft.steps_done == 3
    assert ours["best_step"] == peft.best_step == 1 and ours["best_dev"] == peft.best_dev["accuracy"] == 0.7
    assert [p.get("dev_accuracy") for p in ours["curve"]] == [p.get("dev_accuracy") for p in peft.curve]


def test_a_lora_run_that_fails_leaves_the_base_model_as_it_was():
    """A LoRA run stopped by an error (here its ``on_eval``, as a tuning trial's) takes its layers out of the base
    before the error reaches the compare, which reports a failed PEFT run and goes on with the next run."""
    from tiny import tiny_base

    from softprompts.compare.config import CompareData
    from softprompts.compare.peft_baseline import LORA, PeftSpec, run_peft
    from softprompts.data.datasets import build_examples
    from softprompts.tasks import TaskSpec
    from softprompts.training import TrainConfig

    base = tiny_base("llama")
    spec = TaskSpec("classify", "Review: {text}\nSentiment:", " {label}", ["negative", "positive"])
    rows = [{"text": f"text {i}", "label": ["negative", "positive"][i % 2]} for i in range(8)]
    examples, _ = build_examples(rows, spec.template, "classify", spec.labels)
    modules = [type(m).__name__ for m in base.model.modules()]

    def broken(step: int, metric: float) -> bool:
        raise RuntimeError("evaluation failed")

    config = TrainConfig(steps=3, lr=1e-2, batch_size=4, eval_every=1, progress=False)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        run_peft(base, PeftSpec(LORA, None, config), CompareData(spec, examples, examples[:4], []), on_eval=broken)
    assert [type(m).__name__ for m in base.model.modules()] == modules
    assert not any(p.requires_grad for p in base.model.parameters())


def test_the_report_says_a_method_has_no_peft_counterpart_only_when_counterparts_ran():
    """``--baseline lora`` runs no method through PEFT by choice: the report must not claim PEFT has no counterpart
    of prompt tuning; ``--baseline peft`` names the methods that have none."""
    from softprompts.compare.recommend import peft_comparison

    methods = {"prompt": {"impl": "softprompts", "method": "prompt"},
               "residual": {"impl": "softprompts", "method": "residual"},
               "peft:lora": {"impl": "peft", "method": "lora"}}
    assert peft_comparison(methods, "accuracy") == []
    assert peft_comparison({**methods, "peft:prompt": {"impl": "peft", "method": "prompt", "failed": 1, "seeds": 1,
                                                       "issues": ["boom"]}}, "accuracy", counterparts=True) == [
        "- `peft:prompt`: failed (boom)", "- `residual`: PEFT has no counterpart of this method (ours only)."]


def test_the_recommendation_says_when_lora_is_the_better_choice():
    from softprompts.compare.report import recommend

    base = {"test": {"accuracy": 0.55, "n": 207}}
    ours = {"prefix": _entry("prefix", "kv_prefix", [0.831], 465_728)}
    lora = {**_entry("lora", None, [0.836], 9_823_216), "impl": "peft"}
    close = "\n".join(recommend({**ours, "peft:lora": lora}, base, "accuracy", 207)["text"])
    assert "**Against LoRA:** LoRA (83.6) is within noise of `prefix` (+0.5 points" in close and "21x smaller" in close
    far = {**lora, "test": {"accuracy": _entry("x", None, [0.95], 1)["test"]["accuracy"]}}
    text = "\n".join(recommend({**ours, "peft:lora": far}, base, "accuracy", 207)["text"])
    assert "**When LoRA is the better choice:** here, for quality" in text and "11.9 points above `prefix`" in text
    below = {**lora, "test": {"accuracy": _entry("x", None, [0.565], 1)["test"]["accuracy"]}}
    text = "\n".join(recommend({**ours, "peft:lora": below}, base, "accuracy", 207)["text"])
    assert "`prefix` scores 26.6 points above LoRA (56.5), a real difference" in text and "within noise" not in text
    assert "Against LoRA" not in "\n".join(recommend(ours, base, "accuracy", 207)["text"])  # LoRA did not run
