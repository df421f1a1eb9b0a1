"""One codec for adapter.json and table.json: documents become typed records once, and records write back to the
same bytes. ``tests/fixtures/*.json`` were written by the code before the codec (a trained template task, a trained
chat task, a table holding both): this release reads them to the records below and writes them back unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import cached_base, perturb

import softprompts as sp
from softprompts.codec import (
    AdapterError,
    TableError,
    adapter_text,
    decode_adapter,
    parse_adapter,
    parse_table,
    table_text,
)
from softprompts.serve.text import classify_prompts
from softprompts.table import PromptTable
from softprompts.task_spec import ChatSpec, TaskSpec
from softprompts.workflow import recorded_task

FIXTURES = Path(__file__).parent / "fixtures"
TEMPLATE = TaskSpec("classify", "Review: {text}\nSentiment:", " {label}", ["neg", "pos"], 128, 8)
CHAT = TaskSpec("generate", "", "{label}", None, 200, 64, ChatSpec("after-system", "Be brief."))


def llama():
    return cached_base("llama")


def adapter(base, method="prompt", task=None, seed=0) -> sp.Adapter:
    m = perturb(sp.create_method(base, method, num_virtual_tokens=3, init="random", seed=seed), seed=seed)
    return sp.Adapter.from_method(m, base, task=task)


@pytest.mark.parametrize("name, task", [("adapter_template.json", TEMPLATE), ("adapter_chat.json", CHAT)])
def test_an_adapter_json_of_the_previous_code_reads_typed_and_writes_back_the_same_bytes(name, task):
    raw = (FIXTURES / name).read_bytes()
    record = parse_adapter(raw, name)
    assert record.task == task and isinstance(record.task.chat, ChatSpec | None)
    assert record.base.name == "tiny-llama" and record.base.shapes.kv_heads == (2, 2)
    assert adapter_text(record).encode() == raw


def test_a_table_json_of_the_previous_code_reads_typed_and_writes_back_the_same_bytes():
    raw = (FIXTURES / "table.json").read_bytes()
    record = parse_table(raw, "table.json")
    assert {name: entry.task for name, entry in record.tasks.items()} == {"trained-chat": CHAT,
                                                                         "trained-template": TEMPLATE}
    assert record.tasks["trained-chat"].tensors == tuple(f"layers.{i}.{kv}" for i in (0, 1) for kv in ("key", "value"))
    assert table_text(record).encode() == raw


@pytest.mark.parametrize("task, want", [
    ({}, None),
    ({"task": "generate"}, TaskSpec("generate")),
    ({"labels": ["a", "b"]}, TaskSpec(labels=["a", "b"])),
    ({"task": "generate", "prompt": "{text}", "max_prompt_tokens": 12}, TaskSpec("generate", "{text}",
                                                                                 max_prompt_tokens=12)),
    ({"task": "classify", "chat": {"placement": "user-start"}}, TaskSpec("classify", chat=ChatSpec("user-start"))),
])
def test_a_partial_task_of_the_previous_code_reads_to_one_record(task, want):
    """Adapters saved with ``task={...}`` by hand held any part of a task: every reader now sees the same record
    (and ``Adapter.from_method`` converts such a dict to the same record)."""
    doc = json.loads((FIXTURES / "adapter_template.json").read_text())
    doc["task"] = task
    assert decode_adapter(doc, "adapter.json").task == want
    assert sp.Adapter.from_method(_method(), llama(), task=task).task == want


def _method():
    return sp.create_method(llama(), "prompt", num_virtual_tokens=2, init="random", seed=0)


@pytest.mark.parametrize("task", [TEMPLATE, CHAT, {"task": "generate"}, None])
def test_save_load_save_gives_the_same_bytes(task, tmp_path):
    base = llama()
    sp.save_adapter(adapter(base, "prefix", task), tmp_path / "a")
    first = (tmp_path / "a" / "adapter.json").read_bytes()
    loaded = sp.load_adapter(tmp_path / "a", base)
    sp.save_adapter(loaded, tmp_path / "b")
    assert (tmp_path / "b" / "adapter.json").read_bytes() == first
    assert loaded.task == sp.Adapter.from_method(_method(), base, task=task).task

    table = PromptTable.load(tmp_path / "t", create=True)
    table.add("one", loaded)
    table.add("two", adapter(base, "prompt", TEMPLATE, seed=1))
    table.save()
    saved = (tmp_path / "t" / "table.json").read_bytes()
    PromptTable.load(tmp_path / "t", base).save(tmp_path / "u")
    assert (tmp_path / "u" / "table.json").read_bytes() == saved
    assert PromptTable.load(tmp_path / "u").adapter("one").task == loaded.task


def test_the_table_reader_makes_the_adapter_readers_checks(tmp_path):
    """A table whose task holds tensors of another model's shapes (or another length than it records) is refused
    on reading, as an adapter directory is: before the codec the table reader let it through."""
    base = llama()
    table = PromptTable.load(tmp_path / "t", create=True)
    table.add("x", adapter(base, "prompt", TEMPLATE))
    table.save()
    doc = json.loads((tmp_path / "t" / "table.json").read_text())
    doc["tasks"]["x"]["num_virtual_tokens"] = 5
    (tmp_path / "t" / "table.json").write_text(json.dumps(doc))
    with pytest.raises(TableError, match="5 virtual tokens"):
        PromptTable.load(tmp_path / "t")
    doc["tasks"]["x"]["num_virtual_tokens"] = 3
    doc["base_model"]["shapes"]["hidden_size"] = 64
    (tmp_path / "t" / "table.json").write_text(json.dumps(doc))
    with pytest.raises(TableError, match="soft prompt width 32 != hidden 64"):
        PromptTable.load(tmp_path / "t")


def test_a_bad_document_is_one_error_naming_every_problem():
    doc = json.loads((FIXTURES / "adapter_template.json").read_text())
    doc["task"] = {"task": "translate", "max_prompt_tokens": 0}
    with pytest.raises(AdapterError, match="task -> task.*task -> max_prompt_tokens"):
        decode_adapter(doc, "adapter.json")


def test_every_reader_applies_the_records_defaults():
    """The server's classification, the CLI's generation and a table read the same record: a task without a
    target verbalizes labels as ``" {label}"``, a task without a template sends the text as is."""
    labels, prompts, targets = classify_prompts(TaskSpec("classify", labels=["no", "yes"]), ["a b"], None, "x")
    assert (labels, prompts, targets) == (["no", "yes"], ["a b"], [" no", " yes"])
    labels, prompts, _ = classify_prompts(TEMPLATE, ["great"], None, "x")
    assert prompts == ["Review: great\nSentiment:"]
    assert recorded_task(sp.Adapter(sp.SoftPrompt(torch.zeros(2, 32)), "prompt", {}, "m", llama().shapes,
                                    task={"task": "generate"})) is None
