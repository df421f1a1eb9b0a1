"""A request's plan (``serve/plan.py``): synchronous, runs no model, and the one source of both engines' prompts.

The plan's virtual positions equal the placed artifact's length (computed for real), its refusals are the ones the
vLLM front gives, and the front's module reaches nothing of ``serve/state.py`` (what a default-engine server holds).
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
from tiny import perturbed, tiny_base

import softprompts as sp
from softprompts.errors import SoftpromptsError
from softprompts.interop import vllm_requests
from softprompts.interop.vllm_kv_files import save_kv
from softprompts.interop.vllm_requests import KVFile
from softprompts.serve.plan import ArtifactKey, plan_generation, plan_scores
from softprompts.serve.registry import BASE_NAME, Registry
from softprompts.serve.schemas import ChatBody, ClassifyBody, CompletionBody

SRC = Path(sp.__file__).parent
CHAT = {"task": "generate", "prompt": "", "target": "{label}", "chat": {"placement": "user-start", "system": "S"}}
CLASSIFY = {"task": "classify", "prompt": "Review: {text}\nSentiment:", "target": " {label}",
            "labels": ["positive", "negative"]}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base = tiny_base("llama")
    root = tmp_path_factory.mktemp("plan")
    for name, method, n, task in (("soft", "prompt", 3, {"task": "generate"}), ("kv", "prefix", 4, CLASSIFY),
                                  ("helper", "prompt", 2, CHAT)):
        sp.save_adapter(sp.Adapter.from_method(perturbed(base, method, n, "abcd"[:n]), base, task=task), root / name)
    return base, Registry(base, root, poll_s=0), root


def completion(**body) -> CompletionBody:
    return CompletionBody.model_validate({"model": "soft", "max_tokens": 4, **body})


def test_the_plan_is_synchronous_and_runs_no_model(served, monkeypatch):
    base, registry, _ = served

    def forbidden(*args, **kwargs):
        raise AssertionError("a plan must not run the model")

    monkeypatch.setattr(base, "embed", forbidden)
    monkeypatch.setattr(base, "serving_artifact", forbidden)
    assert not inspect.iscoroutinefunction(plan_generation) and not inspect.iscoroutinefunction(plan_scores)
    entry = registry.get("soft")
    plan = plan_generation(base, entry, completion(prompt=["ab<|virtual|>cd", "efg"], n=2))
    assert [p.virtual for p in plan.prompts] == [2 + 3, 3] and plan.rows == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert plan_generation(base, entry, completion(prompt=[5, 6, 7])).prompts[0].ids == [5, 6, 7]
    assert plan.prompts[0].key == ArtifactKey("soft", entry.version, plan.prompts[0].lead)
    assert plan_scores(base, registry.get("kv"), ClassifyBody(model="kv", texts=["fine"])).labels == [
        "positive", "negative"]


@pytest.mark.parametrize("name, body", [
    ("soft", {"prompt": "ab<|virtual|>cd"}),
    ("soft", {"prompt": [1, 2, 3]}),
    ("kv", {"prompt": "plain"}),
    (BASE_NAME, {"prompt": "lead<|virtual|>rest"}),
])
def test_virtual_positions_are_the_placed_artifacts_length(served, name, body):
    base, registry, _ = served
    entry = None if name == BASE_NAME else registry.get(name)
    plan = plan_generation(base, entry, completion(**body))
    for p in plan.prompts:
        real = base.served(entry.source if entry is not None else None, p.lead)
        assert p.virtual == (real.length if real is not None else 0)


def test_chat_plan_follows_the_adapters_placement(served):
    base, registry, _ = served
    body = ChatBody.model_validate({"model": "helper", "max_tokens": 4,
                                    "messages": [{"role": "user", "content": "hi"}]})
    plan = plan_generation(base, registry.get("helper"), body)
    (prompt,) = plan.prompts
    assert plan.chat and prompt.lead and prompt.virtual == len(prompt.lead) + 2 and plan.stop_ids


@pytest.mark.parametrize("name, body, needle", [
    ("kv", {"prompt": "ab<|virtual|>cd"}, "sits in front of everything"),
    ("soft", {"prompt": "x" * 300}, "context limit"),
    ("soft", {"prompt": "x", "max_tokens": 10**6}, "context limit"),
    ("soft", {"prompt": [1, 99999]}, "outside the model's vocabulary"),
])
def test_both_engines_refuse_with_the_plans_error(served, tmp_path, name, body, needle):
    base, registry, _ = served
    entry = registry.get(name)
    with pytest.raises(SoftpromptsError, match=needle) as planned:
        plan_generation(base, entry, completion(**body))

    def kv_file(e):
        path = save_kv(e.source, tmp_path / f"{e.name}.safetensors")
        return KVFile(path, "0" * 64)

    with pytest.raises(SoftpromptsError) as front:
        vllm_requests.translate(base, entry, {"model": name, "max_tokens": 4, **body}, False, "base", kv_file)
    assert str(front.value) == str(planned.value)


def test_the_vllm_front_reaches_no_server_state():
    """``interop/vllm_*.py`` import the plan, the registry and the schemas, never ``serve/state.py``."""
    for path in sorted((SRC / "interop").glob("vllm*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.module != "softprompts.serve.state", path.name
