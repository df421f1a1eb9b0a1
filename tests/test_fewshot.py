"""The few-shot baseline (``compare --baseline fewshot``): demonstrations from the training split only, balanced over
labels, seeded; written with the task's template or as chat turns; never truncated; and the demonstrations cached as
a KV prefix made from their text score exactly as the same demonstrations in the prompt."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from tiny import cached_base, save_tiny, tiny_base

from softprompts.cli import main
from softprompts.compare import CompareConfig, CompareData
from softprompts.compare.fewshot import FewShotError, FewShotTask, eligible, fit_problem, pick, shot_order
from softprompts.compare.fewshot_run import FewShotRun
from softprompts.data.datasets import Example, build_examples
from softprompts.evaluate import evaluate, row_label_scores, verbalizations
from softprompts.model.decode_loop import generate_ids
from softprompts.tasks import TaskSpec, encode

SPEC = TaskSpec("classify", "Review: {text}\nSentiment:", " {label}", ["bad", "good", "meh"])


def _examples(rows: list[tuple[str, str]], spec: TaskSpec = SPEC) -> list[Example]:
    return build_examples([{"text": t, "label": y} for t, y in rows], spec.template, "classify", spec.labels)[0]


TRAIN = _examples([(f"good {i}", "good") for i in range(10)] + [(f"bad {i}", "bad") for i in range(5)]
                  + [(f"meh {i}", "meh") for i in range(3)] + [("shared", "good"), ("in dev", "bad")])
DEV = _examples([("in dev", "bad"), ("fine", "good")])
TEST = _examples([("shared", "good"), ("awful", "bad"), ("so so", "meh")])


# --- which demonstrations -------------------------------------------------------------------------------------------


def test_demonstrations_come_from_train_only_never_a_dev_or_test_text():
    rows = eligible(TRAIN, DEV + TEST)
    held_out = {ex.prompt for ex in DEV + TEST}
    assert len(rows) == len(TRAIN) - 2 and all(TRAIN[i].prompt not in held_out for i in rows)
    order = shot_order(TRAIN, rows, SPEC.labels, seed=0)
    for k in range(len(order) + 1):
        try:
            shots = pick(order, k, TRAIN, SPEC.labels, seed=0)
        except FewShotError:
            continue
        assert set(shots) <= set(rows) and len(set(shots)) == k  # indices into TRAIN, distinct, never held out


def test_balanced_over_labels_until_a_label_runs_out():
    order = shot_order(TRAIN, eligible(TRAIN, DEV + TEST), SPEC.labels, seed=3)
    for k in range(1, 10):  # 3 labels: every label floor(k/3) or ceil(k/3) times
        counts = Counter(TRAIN[i].label for i in pick(order, k, TRAIN, SPEC.labels, seed=3))
        values = [counts.get(label, 0) for label in SPEC.labels]
        assert sum(values) == k and max(values) - min(values) <= 1, (k, counts)
    with pytest.raises(FewShotError, match=r"need 4 labelled 'meh'; the training data has 3"):
        pick(order, 12, TRAIN, SPEC.labels, seed=3)  # only 3 'meh' rows
    with pytest.raises(FewShotError, match=r"only 18 training rows can be demonstrations"):
        pick(order, 19, TRAIN, SPEC.labels, seed=3)


def test_seeded_and_nested():
    rows = eligible(TRAIN, DEV + TEST)
    assert shot_order(TRAIN, rows, SPEC.labels, 5) == shot_order(TRAIN, rows, SPEC.labels, 5)
    assert shot_order(TRAIN, rows, SPEC.labels, 5) != shot_order(TRAIN, rows, SPEC.labels, 6)
    order = shot_order(TRAIN, rows, SPEC.labels, 5)
    picked = [set(pick(order, k, TRAIN, SPEC.labels, 5)) for k in (1, 2, 4, 8)]
    assert picked[0] <= picked[1] <= picked[2] <= picked[3]  # choosing k compares more demonstrations, not others
    assert pick(order, 4, TRAIN, SPEC.labels, 5) == pick(order, 4, TRAIN, SPEC.labels, 5)
    generation = shot_order(TRAIN, rows, None, 5)  # no labels: a seeded shuffle of the rows
    assert sorted(generation) == sorted(rows) and generation == shot_order(TRAIN, rows, None, 5)


# --- how they are written -------------------------------------------------------------------------------------------


def test_template_demonstrations_in_front_of_each_row():
    task = FewShotTask(SPEC, None, TRAIN)
    out = task.prompts((0, 10), TEST[1:2])
    assert out.lead == "Review: good 0\nSentiment: good\n\nReview: bad 0\nSentiment: bad"
    assert out.examples == [Example("\n\nReview: awful\nSentiment:", " bad", "bad")]
    assert task.prompts((), TEST).examples == TEST and task.prompts((), TEST).lead == ""  # k = 0: the rows as they are
    marked = TaskSpec("classify", "Say it.\n<|virtual|>{text}:", " {label}", ["bad", "good", "meh"])
    rows = _examples([("x", "good")], marked)
    assert FewShotTask(marked, None, rows).prompts((0,), rows).lead == "Say it.\nx: good"  # marker removed


def _chat_rows(pairs, system=None):
    head = [{"role": "system", "content": system}] if system else []
    return [{"messages": head + [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in pairs]


def test_chat_demonstrations_are_turns_after_the_system_turn():
    base = cached_base("llama")
    spec = TaskSpec.for_chat("classify", ["no", "yes"], system="Answer yes or no.")
    fmt = spec.prompt_format(base.tokenizer)
    train_rows, test_rows = _chat_rows([("A?", "yes"), ("B?", "no")]), _chat_rows([("C?", "yes")])
    train, test = (build_examples(r, fmt, "classify", spec.labels)[0] for r in (train_rows, test_rows))
    out = FewShotTask(spec, base.tokenizer, train, train_rows).prompts((1, 0), test, test_rows)
    assert out.lead == ("<|system|>\nAnswer yes or no.<eos>\n<|user|>\nB?<eos>\n<|assistant|>\nno<eos>\n"
                        "<|user|>\nA?<eos>\n<|assistant|>\nyes<eos>\n")
    assert out.examples == [Example("<|user|>\nC?<eos>\n<|assistant|>\n", "yes", "yes")]
    with pytest.raises(FewShotError, match="needs the rows' messages"):
        FewShotTask(spec, base.tokenizer, train).prompts((0,), test)
    mixed = _chat_rows([("C?", "yes")], system="Other.") + _chat_rows([("D?", "no")], system="Else.")
    examples = build_examples(mixed, TaskSpec.for_chat("classify", ["no", "yes"]).prompt_format(base.tokenizer),
                              "classify", ["no", "yes"])[0]
    with pytest.raises(FewShotError, match="different system messages"):
        FewShotTask(spec, base.tokenizer, train, train_rows).prompts((0,), examples, mixed)


def test_demonstrations_that_do_not_fit_are_refused_not_truncated():
    base = cached_base("llama")  # 256 positions
    task = FewShotTask(SPEC, base.tokenizer, TRAIN)
    out = task.prompts((0,), TEST)
    assert fit_problem(base, base.tokenize(out.lead), out.examples, SPEC) is None
    long = base.tokenize("x" * 240)
    problem = fit_problem(base, long, out.examples, SPEC)
    assert "the demonstrations take 240 tokens" in problem and "context limit is 256" in problem
    assert "never truncated" in problem


# --- the cached prefix is the demonstrations in the prompt ------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3", "qwen2"])
def test_cached_prefix_scores_exactly_as_demonstrations_in_the_prompt(arch):
    """Rank classification of every row: the bare model on ids(lead) + ids(row) (demonstrations as prompt tokens)
    and the rows after ``base.served(None, ids(lead))`` (``text_to_kv``): the same scores, the same predictions and
    metrics; greedy generation the same tokens."""
    base = tiny_base(arch)
    rows = eligible(TRAIN, DEV + TEST)
    shots = pick(shot_order(TRAIN, rows, SPEC.labels, 0), 3, TRAIN, SPEC.labels, 0)
    out = FewShotTask(SPEC, base.tokenizer, TRAIN).prompts(shots, TEST + DEV)
    lead = base.tokenize(out.lead)
    cached = base.served(None, lead)
    kv = base.text_to_kv(lead)
    assert all(torch.equal(a, b) for a, b in zip(cached.keys + cached.values, kv.keys + kv.values, strict=True))
    ids = [e.prompt_ids for e in encode(base, out.examples, SPEC)[0]]
    verbal = [verbalizations(base, SPEC)] * len(ids)
    in_prompt = row_label_scores(base, None, [lead + i for i in ids], verbal)
    after_cache = row_label_scores(base, cached, ids, verbal)
    for a, b in zip(in_prompt, after_cache, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)
        assert int(a.argmax()) == int(b.argmax())
    one_string = [Example(out.lead + ex.prompt, ex.target, ex.label) for ex in out.examples]
    assert all(base.tokenize(o.prompt) == lead + i for o, i in zip(one_string, ids, strict=True))
    metrics_prompt = evaluate(base, None, one_string, SPEC, return_outputs=True)  # the text a user would send
    metrics_cached = evaluate(base, cached, out.examples, SPEC, return_outputs=True)
    assert metrics_prompt == metrics_cached
    tokens_prompt = generate_ids(base, [lead + i for i in ids], None, max_new_tokens=6, stop_ids=set())
    tokens_cached = generate_ids(base, ids, cached, max_new_tokens=6, stop_ids=set())
    assert tokens_prompt == tokens_cached


# --- in a compare -----------------------------------------------------------------------------------------------------


def _short_data(root: Path) -> dict[str, Path]:
    words = {"good": ["great", "fine", "nice", "fun", "top", "wow"], "bad": ["dull", "poor", "sad", "meh", "bleh"]}
    splits = {"train": [(w, y) for y, ws in words.items() for w in ws],
              "dev": [("lovely", "good"), ("awful", "bad"), ("super", "good"), ("weak", "bad")],
              "test": [("cool", "good"), ("ugly", "bad"), ("neat", "good"), ("lame", "bad"), ("fun", "good")]}
    paths = {}
    for split, rows in splits.items():
        paths[split] = root / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    return paths


def _args(model: Path, paths: dict, out: Path, *extra: str) -> list[str]:
    return ["compare", "--model", str(model), "--data", str(paths["train"]), "--eval-data", str(paths["dev"]),
            "--test-data", str(paths["test"]), "--template", r"Review: {text}\nSentiment:", "--target", " {label}",
            "--methods", "prompt", "--steps", "2", "--eval-every", "2", "--batch-size", "4", "--virtual-tokens", "4",
            "--latency-tokens", "2", "--no-progress", "--out", str(out), "--baseline", "fewshot", *extra]


@pytest.mark.slow  # a whole compare; test_compare.py's compare with --baseline fewshot stays in test-fast
def test_compare_with_fewshot_end_to_end(tmp_path, capsys):
    model, paths = save_tiny("llama", tmp_path / "model"), _short_data(tmp_path)
    out = tmp_path / "out"
    assert main(_args(model, paths, out)) == 0
    results = json.loads((out / "results.json").read_text())
    run = json.loads((out / "runs" / "fewshot-seed0" / "result.json").read_text())
    f = run["fewshot"]
    assert f["chosen_by"] == "dev" and set(f["dev_by_shots"]) == {"0", "1", "2", "4"}
    assert "8-shot does not fit" in f["skipped"]["8"] and "context limit is 256" in f["skipped"]["8"]  # 256 positions
    train_texts = [json.loads(line)["text"] for line in paths["train"].read_text().splitlines()]
    assert f["left_out_repeats"] == 1 and train_texts.index("fun") not in f["demonstrations"]  # "fun" is a test text
    assert all(0 <= i < len(train_texts) for i in f["demonstrations"]) and len(f["demonstrations"]) == f["shots"]
    if f["shots"]:
        assert f["check"]["rows"] == 5 and f["check"]["max_abs_logprob_diff"] < 1e-4
        assert f["demo_tokens"] > 0 and f["latency_cached"]["ttft_ms"] > 0 and run["artifact"] == "kv_prefix"
        assert f["prompt_tokens"] == pytest.approx(f["bare_prompt_tokens"] + 2 + f["demo_tokens"])  # + "\n\n"
        assert f["kv_bytes_per_request"] > f["bare_kv_bytes_per_request"]
    assert set(f["dev_predictions"]) == {"1", "2", "4"} and sum(f["dev_predictions"]["4"].values()) == 4  # k=0: base
    assert sum(f["test_predictions"].values()) == 5 and set(f["test_predictions"]) <= {"good", "bad"}
    entry = results["methods"]["fewshot"]
    assert entry["impl"] == "fewshot" and 0 <= entry["test"]["accuracy"]["mean"] <= 1
    report = (out / "report.md").read_text()
    assert "## Few-shot in the prompt (no training)" in report and "**Train at all?**" in report
    assert "- Predicted labels (seed 0), dev per k: k=1: " in report
    assert (out / "quality_vs_context.png").read_bytes()[:4] == b"\x89PNG"
    # resumed with the same flags: skipped; with another --shots: redone with that k
    assert main(_args(model, paths, out)) == 0
    assert "fewshot-seed0" in json.loads((out / "results.json").read_text())["resume"]["skipped"]
    assert main(_args(model, paths, out, "--shots", "2")) == 0
    again = json.loads((out / "runs" / "fewshot-seed0" / "result.json").read_text())["fewshot"]
    assert again["shots"] == 2 and again["chosen_by"] == "--shots" and again["label_counts"] == {"good": 1, "bad": 1}
    assert main(_args(model, paths, tmp_path / "too-many", "--shots", "11")) == 2
    assert "only 10 training rows can be demonstrations" in capsys.readouterr().err


def test_bad_fewshot_flags_are_refused(tmp_path, capsys):
    model, paths = save_tiny("llama", tmp_path / "model"), _short_data(tmp_path)
    args = _args(model, paths, tmp_path / "out")
    assert main(args[: args.index("--baseline")] + ["--shots", "2"]) == 2
    assert "add --baseline fewshot" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(args[:-1] + ["fewshot,nope"])
    assert "takes peft, lora and/or fewshot" in capsys.readouterr().err
    assert main(args + ["--shots", "-1"]) == 2


def test_fewshot_on_chat_rows_and_without_dev(tmp_path):
    """Chat rows through FewShotRun: k fixed (no dev rows to choose it), demonstrations as turns, the check exact."""
    base = tiny_base("llama")
    spec = TaskSpec.for_chat("classify", ["no", "yes"], system="Yes or no.")
    fmt = spec.prompt_format(base.tokenizer)
    rows = {"train": _chat_rows([("A?", "yes"), ("B?", "no"), ("C?", "yes"), ("D?", "no")]),
            "test": _chat_rows([("E?", "yes"), ("F?", "no")])}
    train, test = (build_examples(rows[s], fmt, "classify", spec.labels)[0] for s in ("train", "test"))
    config = CompareConfig(model="unused", methods=["prompt"], baseline="fewshot", latency_tokens=2,
                           latency_repeats=1)
    with pytest.raises(FewShotError, match="needs dev rows"):
        FewShotRun(base, CompareData(spec, train, [], test, rows=rows), [], test, config).run(0, None, {})
    config.shots = 2
    result = FewShotRun(base, CompareData(spec, train, [], test, rows=rows), [], test, config).run(0, None, {})
    f = result["fewshot"]
    assert f["shots"] == 2 and f["label_counts"] == {"yes": 1, "no": 1} and f["lead"].startswith("<|system|>\nYes")
    assert f["lead"].count("<|user|>") == 2 and f["check"]["max_abs_logprob_diff"] < 1e-4
    assert result["test"]["n"] == 2 and result["best_dev"] == {"accuracy": None}


# --- the recommendation weighs it -------------------------------------------------------------------------------------


def _few(accs: list[float], tokens: float, shots: str = "4") -> dict:
    from softprompts.compare.recommend import stats

    return {"impl": "fewshot", "method": "fewshot", "artifact": "kv_prefix", "adapter_bytes": 1, "seeds": 1,
            "failed": 0, "test": {"accuracy": stats(accs)}, "best_dev": stats(accs), "ttft_ms": stats([20.0]),
            "per_token_ms": stats([1.0]), "ttft_overhead_ms": stats([15.0]), "per_token_overhead_ms": stats([0.2]),
            "fewshot": {"shots": [int(shots)], "shots_text": shots, "chosen_by": "dev", "demo_tokens": stats([tokens]),
                        "cached_ttft_overhead_ms": stats([1.0])}}


def test_recommendation_weighs_fewshot():
    from softprompts.compare.recommend import recommend, stats

    def ours(acc: float) -> dict:
        return {"impl": "softprompts", "method": "prompt", "artifact": "soft_prompt", "adapter_bytes": 1000,
                "virtual_tokens": 20, "test": {"accuracy": stats([acc])}, "best_dev": stats([acc]),
                "ttft_ms": stats([5.0]), "per_token_ms": stats([1.0]), "ttft_overhead_ms": stats([0.1]),
                "per_token_overhead_ms": stats([0.1])}

    base = {"test": {"accuracy": 0.70, "n": 1000}}
    rec = recommend({"prompt": ours(0.89), "fewshot": _few([0.81], 380)}, base, "accuracy", 1000)
    text = "\n".join(rec["text"])
    assert rec["winner"] == "prompt" and "4-shot (no training, k chosen on dev) reaches 81.0 at +380 prompt" in text
    assert "`prompt` reaches 89.0 at 20 virtual tokens: training pays off, 8.0 points better" in text
    assert "+1.0 ms with their KV cached" in text
    rec = recommend({"prompt": ours(0.81), "fewshot": _few([0.90], 380)}, base, "accuracy", 1000)
    assert rec["winner"] == "fewshot" and "the demonstrations win by 9.0 points" in "\n".join(rec["text"])
    rec = recommend({"prompt": ours(0.85), "fewshot": _few([0.84], 380)}, base, "accuracy", 1000)
    assert rec["winner"] == "prompt" and "what training buys is 360 fewer positions per request" in "\n".join(
        rec["text"])
    rec = recommend({"prompt": ours(0.85), "fewshot": _few([0.70], 0, shots="0")}, base, "accuracy", 1000)
    assert rec["winner"] == "prompt" and "did not help" in "\n".join(rec["text"])


def test_fewshot_on_an_encoder_decoder_base_reads_demonstrations_in_the_encoder():
    """No KV cache of the demonstrations there (the encoder reads them with each row): scored and timed in the prompt,
    the served form (their embeddings in front of the encoder input) equal to the tokens in the prompt."""
    base = tiny_base("t5")
    config = CompareConfig(model="unused", methods=["prompt"], baseline="fewshot", shots=2, latency_tokens=2,
                           latency_repeats=1)
    result = FewShotRun(base, CompareData(SPEC, TRAIN, DEV, TEST), DEV, TEST, config).run(0, None, {})
    f = result["fewshot"]
    assert result["artifact"] == "soft_prompt" and f["latency_cached"] is None and f["shots"] == 2
    assert f["check"]["rows"] == 3 and f["check"]["max_abs_logprob_diff"] < 1e-4
    assert result["test"]["n"] == 3 and result["latency"]["ttft_ms"] > 0
