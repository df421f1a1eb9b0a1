"""Prompt tables: many named tasks in one file set; edits never touch other tasks; mixed-task batches in one forward."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny import cached_base, perturb, save_tiny, tiny_base

import softprompts as sp
from softprompts.cli import main
from softprompts.model.decoder.inject import forward
from softprompts.table import PromptTable, TableError, adapter_base_name, resolve_adapter

ATOL = 2e-4
# different methods, artifact kinds and lengths
SPECS = {"sentiment": ("prompt", 3), "topic": ("deep", 5), "translate": ("prefix", 7), "qa": ("ptuning", 4)}


def llama() -> sp.BaseModel:
    return cached_base("llama")


def make_adapter(base, method: str, length: int, seed: int = 0) -> sp.Adapter:
    m = perturb(sp.create_method(base, method, num_virtual_tokens=length, init="random", seed=seed), seed=seed + 7)
    return sp.Adapter.from_method(m, base, task={"task": "generate", "prompt": "{text}", "target": " {label}"})


def filled_table(base, path, names=tuple(SPECS)) -> tuple[PromptTable, dict[str, sp.Adapter]]:
    table = PromptTable.load(path, create=True)
    adapters = {}
    for i, name in enumerate(names):
        method, length = SPECS[name]
        adapters[name] = make_adapter(base, method, length, seed=i)
        table.add(name, adapters[name])
    table.save()
    return table, adapters


def stored(path) -> tuple[dict[str, torch.Tensor], dict]:
    return load_file(str(path / "table.safetensors")), json.loads((path / "table.json").read_text())


def assert_same_bits(a: torch.Tensor, b: torch.Tensor):
    assert a.dtype == b.dtype and a.shape == b.shape

    def raw(t):
        return t.view(torch.uint8) if t.dtype != torch.bool else t

    assert torch.equal(raw(a), raw(b))


def test_round_trip(tmp_path):
    base = llama()
    _, adapters = filled_table(base, tmp_path / "t")
    table = PromptTable.load(tmp_path / "t", base)
    assert table.names() == sorted(SPECS)
    for name, adapter in adapters.items():
        got = table.adapter(name)
        assert (got.method, got.task, got.num_virtual_tokens) == (adapter.method, adapter.task, SPECS[name][1])
        assert got.artifact.kind == adapter.artifact.kind
        for key, t in adapter.artifact.tensors().items():
            assert_same_bits(t, got.artifact.tensors()[key])
    info = table.info("translate")
    assert (info.artifact, info.num_virtual_tokens, info.method) == ("kv_prefix", 7, "prefix")
    keys, meta = stored(tmp_path / "t")
    assert all(k.startswith("tasks.") for k in keys) and "tasks.sentiment.soft_prompt" in keys
    assert "tasks.topic.layers.1.value" in keys
    assert meta["format"] == "softprompts-table" and meta["base_model"]["fingerprint"] == base.shapes.fingerprint()


def test_edits_never_change_other_tasks_bit_for_bit(tmp_path):
    base = llama()
    path = tmp_path / "t"
    filled_table(base, path, names=("sentiment", "topic"))
    before, meta_before = stored(path)
    table = PromptTable.load(path, base)  # attached to a base: served copies must not leak into what is saved
    table.context(["sentiment", "topic"])
    half = make_adapter(base, "prompt", 6, seed=9)
    half.artifact = half.artifact.detached(torch.bfloat16)  # a bf16 task next to fp32 ones
    table.add("qa", half)
    table.add("translate", make_adapter(base, "prefix", 7, seed=3))
    table.save()
    table = PromptTable.load(path, base)
    table.add("qa", make_adapter(base, "ptuning", 2, seed=4), replace=True)
    table.remove("translate")
    table.save()
    after, meta_after = stored(path)
    for key, t in before.items():
        assert_same_bits(t, after[key])
    for name in ("sentiment", "topic"):
        assert meta_after["tasks"][name] == meta_before["tasks"][name]
    assert sorted(meta_after["tasks"]) == ["qa", "sentiment", "topic"]
    assert meta_after["tasks"]["qa"]["num_virtual_tokens"] == 2


def test_bf16_task_is_stored_as_bf16(tmp_path):
    base = llama()
    table = PromptTable.load(tmp_path / "t", create=True)
    adapter = make_adapter(base, "deep", 3)
    adapter.artifact = adapter.artifact.detached(torch.bfloat16)
    table.add("half", adapter)
    table.save()
    table = PromptTable.load(tmp_path / "t", base)
    assert table.info("half").dtype == "bfloat16"
    assert table.artifact("half").keys[0].dtype == base.dtype  # served in the base's dtype
    assert stored(tmp_path / "t")[0]["tasks.half.layers.0.key"].dtype == torch.bfloat16


@pytest.mark.injection
@pytest.mark.parametrize("padding", ["right", "left"])
def test_mixed_task_batch_equals_each_task_alone(base, tmp_path, padding):
    """Rows of different tasks (soft prompts and prefixes of lengths 3..7, and no adapter) in ONE forward."""
    table, _ = filled_table(base, tmp_path / "t")
    table.attach(base)
    rows = ["sentiment", "translate", None, "topic", "qa", "sentiment"]
    texts = ["good film", "hello", "plain row", "sports news today", "why?", "bad"]
    tokens = [base.tokenize(t) for t in texts]
    width = max(len(t) for t in tokens)
    ids, mask = [], []
    for t in tokens:
        pad = width - len(t)
        ids.append(t + [256] * pad if padding == "right" else [256] * pad + t)
        mask.append([1] * len(t) + [0] * pad if padding == "right" else [0] * pad + [1] * len(t))
    ids, mask = torch.tensor(ids), torch.tensor(mask)
    mixed = forward(base, table.context(rows), ids, mask).logits
    for i, name in enumerate(rows):
        keep = mask[i].bool()
        alone = forward(base, None if name is None else table.artifact(name), ids[i : i + 1, keep]).logits[0]
        torch.testing.assert_close(mixed[i, keep], alone, atol=ATOL, rtol=1e-4)
    plain = base.model(input_ids=ids[:1, mask[0].bool()]).logits[0]
    assert (plain - mixed[0, mask[0].bool()]).abs().max() > 1e-2  # the table's adapters do something


def test_refusals(tmp_path):
    base = llama()
    table, adapters = filled_table(base, tmp_path / "t", names=("sentiment",))
    with pytest.raises(TableError, match="already exists"):
        table.add("sentiment", adapters["sentiment"])
    table.add("sentiment", adapters["sentiment"], replace=True)
    for bad in ["", "a.b", "x/y", "-lead", "with space", "é", "n" * 65]:
        with pytest.raises(TableError, match="invalid task name"):
            table.add(bad, adapters["sentiment"])
    other_arch = make_adapter(tiny_base("qwen2"), "prompt", 3)
    with pytest.raises(sp.AdapterMismatchError, match="made for base model"):
        table.add("qwen", other_arch)
    other_weights = tiny_base("llama", seed=1)  # same shapes, other checkpoint: the adapter rule, a warning
    with pytest.warns(sp.BaseWeightsWarning, match="same shapes, other weights"):
        table.add("other", make_adapter(other_weights, "prompt", 3))
    assert "other" in table
    with pytest.warns(sp.BaseWeightsWarning, match="prompt table .* was made for base model 'tiny-llama'"):
        assert PromptTable.load(tmp_path / "t", other_weights).names() == ["sentiment"]
    with pytest.raises(TableError, match="no task 'missing'"):
        table.adapter("missing")
    with pytest.raises(TableError, match="no task"):
        table.remove("missing")
    assert issubclass(TableError, sp.SoftpromptsError)


def test_malformed_tables(tmp_path):
    with pytest.raises(TableError, match="table.json is missing"):
        PromptTable.load(tmp_path / "none")
    base = llama()
    path = tmp_path / "t"
    filled_table(base, path, names=("sentiment", "topic"))
    meta = json.loads((path / "table.json").read_text())
    meta["tasks"]["sentiment"]["tensors"] = ["other"]
    (path / "table.json").write_text(json.dumps(meta))
    with pytest.raises(TableError, match="lists tensors"):
        PromptTable.load(path)
    (path / "table.json").write_text("{")
    with pytest.raises(TableError, match="not valid JSON"):
        PromptTable.load(path)
    filled_table(base, tmp_path / "u", names=("sentiment",))
    data = (tmp_path / "u" / "table.safetensors").read_bytes()
    (tmp_path / "u" / "table.safetensors").write_bytes(data[:20])
    with pytest.raises(TableError, match="corrupted"):
        PromptTable.load(tmp_path / "u")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "keep.txt").write_text("x")
    with pytest.raises(TableError, match="not a prompt table"):
        PromptTable(tmp_path / "plain").save()


def test_failed_save_leaves_table_intact(tmp_path, monkeypatch):
    base = llama()
    path = tmp_path / "t"
    filled_table(base, path, names=("sentiment",))
    before = (path / "table.safetensors").read_bytes(), (path / "table.json").read_text()
    table = PromptTable.load(path)
    table.add("topic", make_adapter(base, "deep", 5))

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("softprompts.table.save_file", boom)
    with pytest.raises(OSError):
        table.save()
    assert ((path / "table.safetensors").read_bytes(), (path / "table.json").read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]  # no temporary directory left behind


def test_resolve_adapter_references(tmp_path):
    base = llama()
    _, adapters = filled_table(base, tmp_path / "t", names=("sentiment", "topic"))
    sp.save_adapter(adapters["topic"], tmp_path / "single")
    by_path = resolve_adapter(f"{tmp_path / 't'}#topic", base)
    by_name = resolve_adapter("table:topic", base, table=tmp_path / "t")
    single = resolve_adapter(tmp_path / "single", base)
    for got in (by_path, by_name, single):
        for key, t in adapters["topic"].artifact.tensors().items():
            assert torch.equal(t, got.artifact.tensors()[key])
    with pytest.raises(TableError, match="no table was given"):
        resolve_adapter("table:topic", base)
    for ref, table in ((f"{tmp_path / 't'}#topic", None), ("table:topic", tmp_path / "t"), (tmp_path / "single", None)):
        assert adapter_base_name(ref, table) == base.name == "tiny-llama"


def test_cli(tmp_path, capsys):
    base = llama()
    for name in ("sentiment", "translate"):
        sp.save_adapter(make_adapter(base, *SPECS[name]), tmp_path / name)
    t = str(tmp_path / "table")
    assert main(["table", "add", t, "--name", "sentiment", "--adapter", str(tmp_path / "sentiment")]) == 0
    assert main(["table", "add", t, "--name", "translate", "--adapter", str(tmp_path / "translate")]) == 0
    assert main(["table", "add", t, "--name", "translate", "--adapter", str(tmp_path / "sentiment")]) == 2
    assert "--replace" in capsys.readouterr().err
    assert main(["table", "add", t, "--name", "bad.name", "--adapter", str(tmp_path / "sentiment")]) == 2
    assert main(["table", "list", t]) == 0
    out = capsys.readouterr().out
    assert "2 task(s)" in out and "kv_prefix" in out and "soft_prompt" in out
    assert main(["table", "extract", t, "--name", "translate", "--out", str(tmp_path / "x")]) == 0
    extracted = sp.load_adapter(tmp_path / "x", base)
    assert torch.equal(extracted.artifact.keys[0], sp.load_adapter(tmp_path / "translate").artifact.keys[0])
    assert main(["export", "--adapter", f"{t}#translate", "--format", "peft", "--out", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "adapter_config.json").is_file()
    assert main(["table", "remove", t, "--name", "translate"]) == 0
    assert main(["table", "remove", t, "--name", "translate"]) == 2
    assert PromptTable.load(t).names() == ["sentiment"]
    model_dir = save_tiny("gpt2", tmp_path / "gpt2")
    sp.save_adapter(make_adapter(sp.load_base(str(model_dir)), "prompt", 3), tmp_path / "gpt2-adapter")
    assert main(["table", "add", t, "--name", "g", "--adapter", str(tmp_path / "gpt2-adapter")]) == 2
    assert "made for base model" in capsys.readouterr().err


def test_evaluate_tasks_mixes_rows_and_equals_each_task_alone(tmp_path):
    """``evaluate_tasks``: classify tasks (one-token and multi-token label sets) and a generation task share batches;
    each task's scores, outputs and metrics equal those it gets alone."""
    from softprompts.data.datasets import Example
    from softprompts.evaluate import evaluate, evaluate_tasks, label_scores, row_label_scores
    from softprompts.tasks import TaskSpec

    base = llama()
    table, _ = filled_table(base, tmp_path / "t")
    table.attach(base)
    one = TaskSpec("classify", "{text} is", " {label}", ["a", "b"])
    multi = TaskSpec("classify", "{text} means", " {label}", ["very good indeed", "bad", "so so"])
    gen = TaskSpec("generate", "{text}:", " {label}", None, max_target_tokens=3)
    texts = ["good film", "hello there", "x", "sports news today", "why?", "bad"]

    def rows(spec, labels):
        return [Example(spec.template.render_prompt({"text": t}), f" {labels[i % len(labels)]}",
                        labels[i % len(labels)] if spec.labels else None) for i, t in enumerate(texts)]

    tasks = [(table.artifact("sentiment"), rows(one, one.labels), one),
             (table.artifact("translate"), rows(multi, multi.labels)[:4], multi),
             (None, rows(multi, multi.labels)[2:], multi),
             (table.artifact("topic"), rows(gen, ["yes", "no"]), gen)]
    together = evaluate_tasks(base, tasks, batch_size=4, return_outputs=True)
    for (artifact, examples, spec), result in zip(tasks, together, strict=True):
        assert result == evaluate(base, artifact, examples, spec, batch_size=4, return_outputs=True)

    prompts = [base.tokenize(t) for t in texts]
    verbal = [base.tokenize(f" {c}") for c in multi.labels]
    artifacts = [table.artifact(n) for n in ("sentiment", "translate", "qa", "topic", "sentiment", "qa")]
    mixed = row_label_scores(base, artifacts, prompts, [verbal] * len(prompts), batch_size=4)
    for i, artifact in enumerate(artifacts):
        torch.testing.assert_close(mixed[i], label_scores(base, artifact, prompts[i : i + 1], verbal)[0],
                                   atol=ATOL, rtol=1e-4)
