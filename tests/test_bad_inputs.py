"""Bad input, table-driven, over the command line, the Python API and the HTTP server.

Every case must: fail with the right code (exit 2 / a ``SoftpromptsError`` / a 4xx), say what is wrong (the message
holds the needle), print no traceback, and leave every file as it was (the whole workspace is hashed before and
after, so a half-written output directory or a touched adapter fails the case).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny import save_tiny, tiny_base

import softprompts as sp
from softprompts.cli import main
from softprompts.data.datasets import Example
from softprompts.data.templates import Template
from softprompts.errors import SoftpromptsError
from softprompts.table import PromptTable
from softprompts.training import guards as loop_errors

ROWS = [{"text": ("nice " if i % 2 else "poor ") + "y" * (i % 5), "label": "pos" if i % 2 else "neg"}
        for i in range(12)]
TEMPLATE = ["--template", "Review: {text}\\nSentiment:", "--target", " {label}"]
TASK = {"task": "classify", "prompt": "Review: {text}\nSentiment:", "target": " {label}", "labels": ["neg", "pos"]}


def jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def edited_adapter(source: Path, target: Path, edit) -> Path:
    """A copy of ``source`` whose adapter.json went through ``edit(meta) -> document``."""
    shutil.copytree(source, target)
    meta = json.loads((target / "adapter.json").read_text())
    (target / "adapter.json").write_text(json.dumps(edit(meta)))
    return target


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    save_tiny("llama", root / "llama")
    save_tiny("qwen2", root / "qwen")
    base = tiny_base("llama")
    jsonl(root / "train.jsonl", ROWS)
    jsonl(root / "maybe.jsonl", [*ROWS[:3], {"text": "so so", "label": "maybe"}])
    jsonl(root / "malformed.jsonl", [ROWS[0], '{"text": oops}'])
    jsonl(root / "nofield.jsonl", [ROWS[0], {"body": "x", "label": "pos"}])
    jsonl(root / "onelabel.jsonl", [r for r in ROWS if r["label"] == "pos"])
    (root / "empty.jsonl").write_text("")
    (root / "notes.txt").write_text("text\n")
    (root / "datadir").mkdir()
    (root / "long.jsonl").write_text(json.dumps({"text": "x" * 400, "label": "pos"}) + "\n")
    (root / "a_file").write_text("not a directory")
    method = sp.create_method(base, "prompt", num_virtual_tokens=3, init_text="abc")
    adapter = sp.Adapter.from_method(method, base, task=TASK)
    sp.save_adapter(adapter, root / "adapter")
    nan = root / "nan"
    shutil.copytree(root / "adapter", nan)
    save_file({"soft_prompt": torch.full((3, 32), math.nan)}, str(nan / "adapter.safetensors"))
    edited_adapter(root / "adapter", root / "unknown_method", lambda m: {**m, "method": "telepathy"})
    edited_adapter(root / "adapter", root / "string_version", lambda m: {**m, "format_version": "1"})
    edited_adapter(root / "adapter", root / "list_doc", lambda m: [m])
    edited_adapter(root / "adapter", root / "no_base", lambda m: {k: v for k, v in m.items() if k != "base_model"})
    edited_adapter(root / "adapter", root / "wrong_count", lambda m: {**m, "num_virtual_tokens": 7})
    edited_adapter(root / "adapter", root / "wrong_kind", lambda m: {**m, "artifact": "kv_prefix"})
    edited_adapter(root / "adapter", root / "future", lambda m: {**m, "format_version": 99})
    shutil.copytree(root / "adapter", root / "truncated_json")
    (root / "truncated_json" / "adapter.json").write_text('{"format": "softprompts-adapter", ')
    table = PromptTable(root / "table")
    table.add("sentiment", adapter)
    table.save()
    (root / "lora").mkdir()
    (root / "lora" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM"}))
    return root


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def evaluate(adapter: str, data: str = "{ws}/train.jsonl", *extra: str) -> list[str]:
    return ["eval", "--adapter", f"{{ws}}/{adapter}", "--data", data, "--model", "{ws}/llama", *extra]


def generate(*args: str) -> list[str]:
    return ["generate", "--adapter", "{ws}/adapter", "--model", "{ws}/llama", *args]


def train(*extra: str) -> list[str]:
    return ["train", "--model", "{ws}/llama", "--method", "prompt", "--data", "{ws}/train.jsonl", *TEMPLATE,
            "--steps", "1", "--virtual-tokens", "2", "--out", "{ws}/out", "--no-progress", *extra]


def replace(args: list[str], flag: str, value: str) -> list[str]:
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


# (case id, argv with {ws}, text the one error line must contain)
CLI_CASES = [
    ("steps-0", train("--steps", "0"), "--steps must be a positive integer"),
    ("steps-negative", train("--steps", "-4"), "--steps must be a positive integer"),
    ("lr-inf", train("--lr", "inf"), "--lr: expected a finite number, got 'inf'"),
    ("lr-nan", train("--lr", "nan"), "--lr: expected a finite number, got 'nan'"),
    ("lr-word", train("--lr", "fast"), "--lr: expected a number, got 'fast'"),
    ("lr-0", train("--lr", "0"), "--lr must be a positive finite number"),
    ("weight-decay-negative", train("--weight-decay", "-1"), "--weight-decay"),
    ("virtual-0", train("--virtual-tokens", "0"), "num_virtual_tokens must be a positive integer"),
    ("virtual-negative", train("--virtual-tokens", "-3"), "num_virtual_tokens must be a positive integer"),
    ("virtual-over-context", train("--virtual-tokens", "100000"), "context of 256 tokens"),
    ("virtual-plus-data-over-context", train("--virtual-tokens", "250"), "context limit of 256"),
    ("eval-limit-0", train("--eval-data", "{ws}/train.jsonl", "--eval-limit", "0"), "--eval-limit must be at least 1"),
    ("max-prompt-tokens-0", train("--max-prompt-tokens", "0"), "--max-prompt-tokens must be a positive integer"),
    ("max-target-tokens-0", train("--max-target-tokens", "0"), "--max-target-tokens must be a positive integer"),
    ("batch-size-0", train("--batch-size", "0"), "--batch-size and --grad-accum must be at least 1"),
    ("grad-accum-0", train("--grad-accum", "0"), "--batch-size and --grad-accum must be at least 1"),
    ("schedule-unknown", train("--schedule", "sawtooth"), "--schedule must be one of"),
    ("warmup-over-1", train("--warmup-ratio", "1.5"), "warmup_ratio must be in [0, 1)"),
    ("patience-negative", train("--patience", "-1"), "--patience must be >= 0"),
    ("method-unknown", replace(train(), "--method", "telepathy"), "unknown method 'telepathy'"),
    ("init-unknown", train("--init", "magic"), "init must be one of"),
    ("task-unknown", train("--task", "dance"), "invalid choice: 'dance'"),
    ("steps-not-a-number", train("--steps", "many"), "invalid int value"),
    ("data-missing", replace(train(), "--data", "{ws}/nope.jsonl"), "no such file"),
    ("data-directory", replace(train(), "--data", "{ws}/datadir"), "is a directory"),
    ("data-extension", replace(train(), "--data", "{ws}/notes.txt"), "unsupported file type"),
    ("data-malformed", replace(train(), "--data", "{ws}/malformed.jsonl"), "line 2: malformed JSON"),
    ("data-empty", replace(train(), "--data", "{ws}/empty.jsonl"), "has no rows"),
    ("data-missing-field", replace(train(), "--data", "{ws}/nofield.jsonl"), "template field 'text' is missing"),
    ("label-outside-labels", replace(train(), "--data", "{ws}/maybe.jsonl") + ["--labels", "neg,pos"],
     "label 'maybe'"),
    ("one-label", replace(train(), "--data", "{ws}/onelabel.jsonl"), "at least two labels"),
    ("labels-duplicate", train("--labels", "pos,pos"), "labels must be unique"),
    ("eval-data-malformed", train("--eval-data", "{ws}/malformed.jsonl"), "malformed JSON"),
    ("template-missing", [a for a in train() if a not in TEMPLATE], "--template and --target are required"),
    ("template-placeholder", replace(train(), "--template", "Review: {0}"), "only plain {field} placeholders"),
    ("target-without-field", replace(train(), "--target", " yes"), "has no field"),
    ("model-missing-dir", replace(train(), "--model", "{ws}/nowhere/model"), "cannot load model"),
    ("model-hub-id", replace(train(), "--model", "no-such-org/no-such-model"), "cannot load model"),
    ("device-missing-gpu", train("--device", "cuda:7"), "no CUDA GPU is visible"),
    ("device-unknown", train("--device", "toaster"), "unknown device"),
    ("out-exists", replace(train(), "--out", "{ws}/adapter"), "already exists"),
    ("out-under-a-file", replace(train(), "--out", "{ws}/a_file/sub"), "is a file, not a directory"),
    ("out-is-a-file", replace(train(), "--out", "{ws}/a_file") + ["--overwrite"], "is a file, not a directory"),
    ("init-from-not-adapter", train("--init-from", "{ws}/datadir"), "adapter.json is missing"),
    ("compile-and-checkpointing", train("--compile", "--gradient-checkpointing"), "cannot be combined"),
    ("bf16-on-cpu", train("--bf16"), "needs a CUDA device"),
    ("eval-adapter-missing", evaluate("nope"), "adapter.json is missing"),
    ("eval-nan-weights", evaluate("nan"), "non-finite values"),
    ("eval-unknown-method", evaluate("unknown_method"),
     "unknown method 'telepathy'"),
    ("eval-string-version", evaluate("string_version"),
     "format_version"),
    ("eval-list-document", evaluate("list_doc"),
     "valid dictionary"),
    ("eval-missing-base", evaluate("no_base"), "base_model"),
    ("eval-truncated-json", evaluate("truncated_json"),
     "not valid JSON"),
    ("eval-wrong-count", evaluate("wrong_count"),
     "says 7 virtual tokens"),
    ("eval-wrong-kind", evaluate("wrong_kind"),
     "makes a soft_prompt"),
    ("eval-future-version", evaluate("future"), "upgrade softprompts"),
    ("eval-other-base", replace(evaluate("adapter"), "--model", "{ws}/qwen"),
     "was made for base model"),
    ("eval-label-not-in-adapter", evaluate("adapter", "{ws}/maybe.jsonl"),
     "label 'maybe'"),
    ("eval-table-bad-pair", ["eval", "--table", "{ws}/table", "--data", "sentiment"], "give NAME=FILE"),
    ("eval-table-unknown-task", ["eval", "--table", "{ws}/table", "--data", "nope={ws}/train.jsonl"], "no task 'nope'"),
    ("generate-zero-tokens", generate("--max-new-tokens", "0", "hi"),
     "--max-new-tokens must be >= 1"),
    ("generate-negative-temperature", generate("--temperature", "-1", "hi"),
     "temperature must be >= 0"),
    ("generate-top-p-0", generate("--top-p", "0", "hi"), "top_p must be in (0, 1]"),
    ("generate-bad-json-text", generate("{not json"), "looks like JSON"),
    ("generate-over-context", generate("--raw", "--max-new-tokens", "300", "hi"),
     "context limit is 256"),
    ("inspect-missing", ["inspect", "{ws}/nope"], "adapter.json is missing"),
    ("table-add-bad-name", ["table", "add", "{ws}/table", "--name", "a/b", "--adapter", "{ws}/adapter"],
     "invalid task name"),
    ("table-add-nan", ["table", "add", "{ws}/table", "--name", "broken", "--adapter", "{ws}/nan"], "non-finite"),
    ("table-add-existing", ["table", "add", "{ws}/table", "--name", "sentiment", "--adapter", "{ws}/adapter"],
     "already exists"),
    ("table-remove-missing", ["table", "remove", "{ws}/table", "--name", "nope"], "no task 'nope'"),
    ("table-list-not-a-table", ["table", "list", "{ws}/datadir"], "not a prompt table"),
    ("table-extract-existing", ["table", "extract", "{ws}/table", "--name", "sentiment", "--out", "{ws}/adapter"],
     "already exists"),
    ("export-nan", ["export", "--adapter", "{ws}/nan", "--out", "{ws}/peft-out"], "non-finite"),
    ("export-out-exists", ["export", "--adapter", "{ws}/adapter", "--out", "{ws}/adapter"], "already exists"),
    ("import-not-a-dir", ["import", "--peft", "{ws}/notes.txt", "--out", "{ws}/imported"], "is not a directory"),
    ("import-lora", ["import", "--peft", "{ws}/lora", "--out", "{ws}/imported"], "not weight adapters such as LoRA"),
    ("compare-steps-0", ["compare", "--model", "{ws}/llama", "--data", "{ws}/train.jsonl", *TEMPLATE, "--steps", "0",
                         "--out", "{ws}/cmp", "--no-progress"], "--steps must be positive"),
    ("compare-seeds-0", ["compare", "--model", "{ws}/llama", "--data", "{ws}/train.jsonl", *TEMPLATE, "--seeds", "0",
                         "--out", "{ws}/cmp", "--no-progress"], "--seeds must be at least 1"),
    ("compare-no-template", ["compare", "--model", "{ws}/llama", "--data", "{ws}/train.jsonl", "--out", "{ws}/cmp"],
     "required"),
    ("compare-out-under-file", ["compare", "--data", "{ws}/train.jsonl", *TEMPLATE, "--out", "{ws}/a_file/x"],
     "is a file, not a directory"),
    ("data-prepare-unknown", ["data", "prepare", "imagenet"], "unknown dataset 'imagenet'"),
    ("serve-missing-dir", ["serve", "--adapters", "{ws}/nope", "--model", "{ws}/llama"], "does not exist"),
    ("serve-max-running-0", ["serve", "--adapters", "{ws}", "--max-running", "0", "--model", "{ws}/llama"],
     "--max-running must be >= 1"),
    ("serve-prefill-chunk-0", ["serve", "--adapters", "{ws}", "--prefill-chunk", "0", "--model", "{ws}/llama"],
     "--prefill-chunk must be >= 1"),
    ("serve-timeout-inf", ["serve", "--adapters", "{ws}", "--request-timeout", "inf", "--model", "{ws}/llama"],
     "--request-timeout: expected a finite number"),
    ("serve-timeout-0", ["serve", "--adapters", "{ws}", "--request-timeout", "0", "--model", "{ws}/llama"],
     "--request-timeout must be > 0"),
    ("serve-max-kv-negative", ["serve", "--adapters", "{ws}", "--max-kv-mb", "-1", "--model", "{ws}/llama"],
     "--max-kv-mb must be > 0"),
]


@pytest.mark.parametrize("args, needle", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(ws, capsys, args, needle):
    before = tree_digest(ws)
    try:
        rc = main([a.replace("{ws}", str(ws)) for a in args])
    except SystemExit as exc:  # argparse's own errors (choices, types)
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and needle in lines[0], err
    assert tree_digest(ws) == before, "a failed command changed or left files"


def nan_adapter(base) -> sp.Adapter:
    adapter = sp.Adapter.from_method(sp.create_method(base, "prompt", num_virtual_tokens=2), base)
    adapter.artifact = sp.SoftPrompt(torch.full((2, 32), math.inf))
    return adapter


def _train_diverging(base, ws):
    spec = sp.TaskSpec("classify", "{text}", " {label}", ["neg", "pos"])
    method = sp.create_method(base, "prompt", num_virtual_tokens=2)
    examples = [Example(r["text"], " " + r["label"], r["label"]) for r in ROWS]
    sp.train(base, method, examples, spec, sp.TrainConfig(steps=4, lr=1e38, progress=False, checkpoint_every=1),
             out_dir=ws / "diverged")


# (case id, call(base, ws), exception class, text the message must contain)
API_CASES = [
    ("generate-negative-tokens", lambda b, w: sp.generate(b, "hi", max_new_tokens=-1), SoftpromptsError,
     "max_new_tokens must be >= 0"),
    ("generate-over-context", lambda b, w: sp.generate(b, "x" * 300, max_new_tokens=4), SoftpromptsError,
     "context limit is 256"),
    ("generate-empty-prompt", lambda b, w: sp.generate_ids(b, [[]], None, 2), SoftpromptsError, "at least one token"),
    ("method-zero-tokens", lambda b, w: sp.create_method(b, "prompt", num_virtual_tokens=0), SoftpromptsError,
     "positive integer"),
    ("method-unknown-option", lambda b, w: sp.create_method(b, "prompt", depth=3), SoftpromptsError,
     "unknown option(s) depth"),
    ("method-unknown", lambda b, w: sp.create_method(b, "telepathy"), SoftpromptsError, "unknown method"),
    ("method-labels-init-without-labels", lambda b, w: sp.create_method(b, "prompt", init="labels"), SoftpromptsError,
     "needs the task's class labels"),
    ("method-over-context", lambda b, w: sp.create_method(b, "deep", num_virtual_tokens=10_000), SoftpromptsError,
     "no room for real tokens"),
    ("train-config-nan-lr", lambda b, w: sp.TrainConfig(lr=math.nan).validate(), SoftpromptsError, "--lr"),
    ("train-empty-data", lambda b, w: sp.train(b, sp.create_method(b, "prompt", num_virtual_tokens=2), [],
                                               sp.TaskSpec("generate", "{a}", " {b}"), sp.TrainConfig(progress=False)),
     SoftpromptsError, "training data is empty"),
    ("train-update-overflows", _train_diverging, SoftpromptsError, "training stopped at step 1: the update overflowed"),
    ("save-non-finite", lambda b, w: sp.save_adapter(nan_adapter(b), w / "nan-out"), sp.AdapterError, "non-finite"),
    ("table-add-non-finite", lambda b, w: PromptTable(w / "t2").add("x", nan_adapter(b)), sp.AdapterError,
     "non-finite"),
    ("load-non-finite", lambda b, w: sp.load_adapter(w / "nan", b), sp.AdapterError, "non-finite"),
    ("load-unknown-method", lambda b, w: sp.load_adapter(w / "unknown_method"), sp.AdapterError, "telepathy"),
    ("load-base-bad-device", lambda b, w: sp.load_base(str(w / "llama"), device="cuda:7"), SoftpromptsError,
     "no CUDA GPU is visible"),
    ("load-base-bad-dtype", lambda b, w: sp.load_base(str(w / "llama"), dtype="int8"), SoftpromptsError,
     "unknown dtype"),
    ("template-positional", lambda b, w: Template("{0}", " {a}"), SoftpromptsError, "placeholder {0}"),
    ("task-spec-zero-prompt", lambda b, w: sp.TaskSpec("generate", "{a}", " {b}", max_prompt_tokens=0),
     SoftpromptsError, "--max-prompt-tokens"),
]


@pytest.mark.parametrize("call, error, needle", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_bad_input(ws, call, error, needle):
    base = tiny_base("llama")
    before = tree_digest(ws)
    with pytest.raises(error) as caught:
        call(base, ws)
    assert needle in str(caught.value)
    assert tree_digest(ws) == before


@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_a_nan_stops_training_keeps_the_last_checkpoint_and_writes_no_adapter(tmp_path, monkeypatch, poison):
    """From step 2 on the loss (or only its gradient) is NaN: training stops there with the reason, the step-1
    checkpoint stays, no adapter directory appears."""
    import softprompts.training.step as step

    real, calls = step.label_loss_sum, [0]

    def poisoned(base, artifact, batch):
        calls[0] += 1
        loss = real(base, artifact, batch)
        if calls[0] < 2:
            return loss
        if poison == "loss":
            return loss * math.nan
        loss.register_hook(lambda grad: grad * math.nan)  # a finite loss whose gradient is NaN
        return loss

    monkeypatch.setattr(step, "label_loss_sum", poisoned)
    base = tiny_base("llama")
    spec = sp.TaskSpec("classify", "{text}", " {label}", ["neg", "pos"])
    examples = [Example(r["text"], " " + r["label"], r["label"]) for r in ROWS]
    out = tmp_path / "run"
    with pytest.raises(loop_errors.NonFiniteError, match=f"step 2: the {'loss' if poison == 'loss' else 'gradient'}"):
        sp.train(base, sp.create_method(base, "prompt", num_virtual_tokens=2), examples, spec,
                 sp.TrainConfig(steps=4, lr=1e-2, progress=False, checkpoint_every=1), out_dir=out)
    saved = torch.load(sp.training.checkpoint_path(out), weights_only=False)
    assert saved["state"]["step"] == 1 and not out.exists()
    assert all(bool(torch.isfinite(v).all()) for v in saved["method"].values())


@pytest.fixture(scope="module")
def client(ws):
    from fastapi.testclient import TestClient

    from softprompts.serve.http import build_state, create_app

    served = ws / "served"
    served.mkdir()
    for name in ("adapter", "nan", "unknown_method"):
        shutil.copytree(ws / name, served / name)
    state = build_state(tiny_base("llama"), served, poll_s=0)
    with TestClient(create_app(state), raise_server_exceptions=False) as c:
        yield c


# (case id, method, path, request keyword arguments, status, text the error message must contain)
HTTP_CASES = [
    ("unknown-adapter", "post", "/v1/completions", {"json": {"model": "nope", "prompt": "x"}}, 404, "not found"),
    ("path-in-name", "post", "/v1/completions", {"json": {"model": "../adapter", "prompt": "x"}}, 400,
     "invalid adapter name"),
    ("hidden-name", "post", "/v1/adapters/.hidden/load", {}, 400, "invalid adapter name"),
    ("malformed-json", "post", "/v1/completions", {"content": b'{"model": "base",', "headers": {
        "content-type": "application/json"}}, 422, "not valid JSON"),
    ("no-content-type", "post", "/v1/completions", {"content": b'{"model": "base", "prompt": "x"}'}, 422,
     "Content-Type: application/json"),
    ("body-is-a-list", "post", "/v1/completions", {"json": [{"model": "base"}]}, 422, "JSON object"),
    ("missing-prompt", "post", "/v1/completions", {"json": {"model": "base"}}, 422, "'prompt'"),
    ("empty-prompt-list", "post", "/v1/completions", {"json": {"model": "base", "prompt": []}}, 422, "prompt"),
    ("max-tokens-0", "post", "/v1/completions", {"json": {"model": "base", "prompt": "x", "max_tokens": 0}}, 422,
     "max_tokens"),
    ("temperature-negative", "post", "/v1/completions", {"json": {"model": "base", "prompt": "x", "temperature": -1}},
     422, "temperature"),
    ("top-p-0", "post", "/v1/completions", {"json": {"model": "base", "prompt": "x", "top_p": 0}}, 422, "top_p"),
    ("n-17", "post", "/v1/completions", {"json": {"model": "base", "prompt": "x", "n": 17}}, 422, "'n'"),
    ("unknown-fields", "post", "/v1/completions", {"json": {"model": "base", "prompt": "x", "tools": [], "mystery": 1}},
     400, "unsupported fields 'mystery', 'tools'"),
    ("chat-unknown-field", "post", "/v1/chat/completions", {"json": {"model": "base", "tool_choice": "auto",
                                                                     "messages": [{"role": "user", "content": "x"}]}},
     400, "unsupported field 'tool_choice'"),
    ("penalty-nonzero", "post", "/v1/completions", {"json": {"model": "base", "prompt": "x", "presence_penalty": 0.5,
                                                             "logit_bias": {"1": 3}}}, 400,
     "presence_penalty, logit_bias: this server does not implement them"),
    ("best-of-more", "post", "/v1/completions", {"json": {"model": "base", "prompt": "x", "best_of": 3}}, 400,
     "best_of"),
    ("logprobs-over-20", "post", "/v1/completions", {"json": {"model": "base", "prompt": "x", "logprobs": 21}}, 422,
     "logprobs"),
    ("top-logprobs-alone", "post", "/v1/chat/completions", {"json": {"model": "base", "top_logprobs": 2,
                                                                     "messages": [{"role": "user", "content": "x"}]}},
     422, "top_logprobs needs logprobs"),
    ("echo-logprobs-marker", "post", "/v1/completions", {"json": {"model": "adapter", "prompt": "a<|virtual|>b",
                                                                  "echo": True, "logprobs": 1, "max_tokens": 0}}, 400,
     "without the marker"),
    ("over-context", "post", "/v1/completions", {"json": {"model": "adapter", "prompt": "x" * 250, "max_tokens": 10}},
     400, "context limit is 256"),
    ("empty-prompt-text", "post", "/v1/completions", {"json": {"model": "base", "prompt": ""}}, 400,
     "at least one token"),
    ("nan-adapter", "post", "/v1/completions", {"json": {"model": "nan", "prompt": "x"}}, 409, "non-finite"),
    ("unknown-method-adapter", "post", "/v1/completions", {"json": {"model": "unknown_method", "prompt": "x"}}, 409,
     "telepathy"),
    ("load-broken", "post", "/v1/adapters/nan/load", {}, 409, "non-finite"),
    ("load-unknown", "post", "/v1/adapters/nope/load", {}, 404, "no adapter directory"),
    ("delete-unknown", "delete", "/v1/adapters/nope", {}, 404, "not found"),
    ("classify-base", "post", "/v1/classify", {"json": {"model": "base", "texts": ["x"]}}, 400, "needs an adapter"),
    ("classify-duplicate-labels", "post", "/v1/classify", {"json": {"model": "adapter", "texts": ["x"],
                                                                    "labels": ["pos", "pos"]}}, 400, "unique"),
    ("classify-blank-label", "post", "/v1/classify", {"json": {"model": "adapter", "texts": ["x"],
                                                               "labels": ["pos", " "]}}, 400, "non-blank"),
    ("classify-one-label", "post", "/v1/classify", {"json": {"model": "adapter", "texts": ["x"], "labels": ["pos"]}},
     422, "labels"),
    ("classify-no-texts", "post", "/v1/classify", {"json": {"model": "adapter", "texts": []}}, 422, "texts"),
    ("classify-over-context", "post", "/v1/classify", {"json": {"model": "adapter", "texts": ["x" * 260]}}, 400,
     "label tokens"),
    ("classify-missing-field", "post", "/v1/classify", {"json": {"model": "adapter", "texts": [{"body": "x"}]}}, 400,
     "template field 'text'"),
    ("unknown-route", "get", "/v1/nothing", {}, 404, "Not Found"),
    ("wrong-method", "get", "/v1/completions", {}, 405, "Method Not Allowed"),
]


@pytest.mark.parametrize("method, path, kwargs, status, needle", [c[1:] for c in HTTP_CASES],
                         ids=[c[0] for c in HTTP_CASES])
def test_http_bad_input(ws, client, method, path, kwargs, status, needle):
    before = tree_digest(ws / "served")
    response = getattr(client, method)(path, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and needle in error["message"], error
    assert tree_digest(ws / "served") == before


def test_http_errors_are_counted_and_listed(ws, client):
    text = client.get("/metrics").text
    assert 'status="409"' in text and 'status="422"' in text and 'status="404"' in text
    listed = {e["id"]: e for e in client.get("/v1/adapters").json()["data"]}
    assert "non-finite" in listed["nan"]["error"] and listed["adapter"]["error"] is None


def test_the_suite_is_large_enough():
    assert len(CLI_CASES) + len(API_CASES) + len(HTTP_CASES) >= 100


def test_a_server_fault_is_a_json_500_and_counted(client, monkeypatch):
    """A fault inside the engine answers that request with the JSON error shape, and /metrics counts it."""
    def broken(requests):
        raise RuntimeError("simulated fault")

    monkeypatch.setattr(client.app.state.serve.engine, "score", broken)
    response = client.post("/v1/classify", json={"model": "adapter", "texts": ["x"]})
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error" and "RuntimeError" in response.json()["error"]["message"]
    assert 'endpoint="/v1/classify",status="500"' in client.get("/metrics").text
