"""The server against its own OpenAPI schema, fuzzed by schemathesis (bounded, in process: no socket at all).

Checks on every generated request: no 5xx, the status is one the schema documents, the content type and the body
match the schema for that status, schema-invalid requests are rejected. ``model`` is drawn from the real adapter
names (a soft prompt with labels, a prefix, a prompt-table task, a NaN adapter, a broken one, ``base``), so the
fuzzer gets past 404. Positive-data acceptance is not checked: a schema-valid prompt can still exceed the context
(400), a rule a JSON schema cannot state.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny import tiny_base

import softprompts as sp

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402  (after the skip: hypothesis comes with schemathesis)
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

from softprompts.serve.http import build_state, create_app  # noqa: E402
from softprompts.table import PromptTable  # noqa: E402

EXAMPLES = 150  # per operation
BRIEF = 5  # per operation, in test-fast
TASK = {"task": "classify", "prompt": "Review: {text}\nSentiment:", "target": " {label}", "labels": ["neg", "pos"]}
STATUSES: Counter = Counter()


def _adapters(tmp):
    base = tiny_base("llama")
    root = tmp / "served"
    for name, method, task in (("clf", "prompt", TASK), ("gen", "prefix", {"task": "generate"})):
        sp.save_adapter(sp.Adapter.from_method(sp.create_method(base, method, num_virtual_tokens=3), base, task=task),
                        root / name)
    table = PromptTable(root / "tasks")
    table.add("sentiment", sp.load_adapter(root / "clf"))
    table.save()
    shutil.copytree(root / "clf", root / "nan")
    save_file({"soft_prompt": torch.full((3, 32), math.nan)}, str(root / "nan" / "adapter.safetensors"))
    shutil.copytree(root / "clf", root / "broken")
    meta = json.loads((root / "broken" / "adapter.json").read_text())
    (root / "broken" / "adapter.json").write_text(json.dumps({**meta, "method": "telepathy"}))
    return base, root


def _schema():
    base, root = _adapters(Path(WORKDIR.name))
    app = create_app(build_state(base, root, poll_s=0))
    spec = app.openapi()
    names = ["base", "clf", "gen", "tasks.sentiment", "nan", "broken"]
    for body in ("CompletionBody", "ClassifyBody"):
        spec["components"]["schemas"][body]["properties"]["model"]["enum"] = names
    app.openapi_schema = spec  # what /openapi.json serves from now on
    return schemathesis.openapi.from_asgi("/openapi.json", app)


WORKDIR = tempfile.TemporaryDirectory(prefix="softprompts-fuzz-")  # lives as long as the test module
schema = _schema()  # schemathesis parametrizes at collection time, from the app's own schema


@pytest.mark.slow  # EXAMPLES per operation: a minute and more; the brief fuzz below stays in test-fast
@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_api_conforms_to_its_schema(case):
    response = case.call_and_validate(excluded_checks=[positive_data_acceptance])
    STATUSES[response.status_code] += 1


@schema.parametrize()
@settings(max_examples=BRIEF, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_api_conforms_to_its_schema_in_brief(case):
    """The same checks on ``BRIEF`` requests per operation (test-fast)."""
    response = case.call_and_validate(excluded_checks=[positive_data_acceptance])
    assert response.status_code < 500


@pytest.mark.slow  # counts what the full fuzz above sent
def test_fuzzing_reached_past_404_and_found_no_server_error():
    print(f"fuzzed {sum(STATUSES.values())} requests, status counts {dict(sorted(STATUSES.items()))}")
    assert sum(STATUSES.values()) >= 200 and not any(s >= 500 for s in STATUSES)
    assert STATUSES[200] > 0 and STATUSES[409] > 0 and STATUSES[422] > 0
