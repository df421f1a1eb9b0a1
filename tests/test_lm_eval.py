"""EleutherAI's lm-evaluation-harness, run as its users run it (the ``lm_eval`` command, ``local-completions`` in its
default request mode: prompts sent as token ids, tokenized through the server's ``/tokenize``), scores an adapter
and the bare model through ``softprompts serve`` with exactly ``softprompts eval``'s accuracy; its
``local-chat-completions`` runs a generation task to the end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from live_server import live_server
from tiny import save_tiny

from softprompts.cli import main
from softprompts.model.load import load_base
from softprompts.serve.http import build_state

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.slow  # the lm_eval command on a live server (test_clients.py: its tokenizer probe, fast)
BUNDLED = Path(__file__).parents[1] / "src/softprompts/data/bundled/uci_sentiment"
PROMPT, TARGET = "Review: {text}\nSentiment:", " {label}"
CLASSIFY_TASK = """task: sp_sentiment
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Review: {{{{text}}}}\\nSentiment:"
doc_to_choice: [" negative", " positive"]
doc_to_target: "{{{{ [' negative', ' positive'].index(' ' + label) }}}}"
target_delimiter: ""
metric_list:
  - metric: acc
"""
GENERATE_TASK = """task: sp_answer
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Review: {{{{text}}}}"
doc_to_target: "{{{{label}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
metric_list:
  - metric: exact_match
"""


def short_rows(path: Path, n: int) -> list[str]:
    """The first ``n`` rows of ``path`` whose text is under 150 characters."""
    lines = [line + "\n" for line in path.read_text().split("\n") if line]  # not splitlines: texts hold U+0085
    return [line for line in lines if len(json.loads(line)["text"]) < 150][:n]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    model = save_tiny("llama", root / "model")
    data, train = root / "test.jsonl", root / "train.jsonl"
    data.write_text("".join(short_rows(BUNDLED / "test.jsonl", 24)))  # the tiny model's context: 256 byte tokens
    train.write_text("".join(short_rows(BUNDLED / "train.jsonl", 32)))
    adapters = root / "adapters"
    assert main(["train", "--model", str(model), "--method", "prefix", "--data", str(train),
                 "--template", PROMPT, "--target", TARGET, "--steps", "2", "--virtual-tokens", "3",
                 "--out", str(adapters / "sentiment"), "--no-progress"]) == 0
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "sp_sentiment.yaml").write_text(CLASSIFY_TASK.format(data=data))
    (tasks / "sp_answer.yaml").write_text(GENERATE_TASK.format(data=data))
    state = build_state(load_base(str(model)), adapters, max_running=8, poll_s=0)
    with live_server(state) as port:
        yield {"root": root, "model": model, "data": data, "adapter": adapters / "sentiment", "tasks": tasks,
               "url": f"http://127.0.0.1:{port}"}


def lm_eval(work, model_type: str, model: str, task: str, *extra: str) -> dict:
    """Run the ``lm_eval`` command against the live server; its results for ``task``."""
    out = work["root"] / f"out-{model_type}-{model}"
    endpoint = "chat/completions" if model_type == "local-chat-completions" else "completions"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(work["root"] / "datasets-cache")}
    command = [str(Path(sys.executable).with_name("lm_eval")), "run", "--model", model_type, "--model_args",
               f"model={model},base_url={work['url']}/v1/{endpoint},num_concurrent=1,max_retries=1",
               "--tasks", task, "--include_path", str(work["tasks"]), "--output_path", str(out), *extra]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    if model_type == "local-completions":  # its default: token ids, tokenized by the server
        assert "Using remote tokenizer" in done.stderr and "tokenized_requests" not in done.stderr
    result = json.loads(next(out.rglob("results_*.json")).read_text())
    return result["results"][task]


def softprompts_eval(capsys, *args: str) -> dict:
    assert main(["eval", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("model", ["sentiment", "base"])
def test_lm_eval_accuracy_equals_softprompts_eval(work, capsys, model):
    got = lm_eval(work, "local-completions", model, "sp_sentiment")
    if model == "base":
        want = softprompts_eval(capsys, "--model", str(work["model"]), "--data", str(work["data"]),
                                "--template", PROMPT, "--target", TARGET)
    else:
        want = softprompts_eval(capsys, "--adapter", str(work["adapter"]), "--data", str(work["data"]))
    assert want["n"] == 24
    assert got["acc,none"] == pytest.approx(want["accuracy"], abs=1e-9)


def test_lm_eval_chat_completions_runs_a_generation_task(work):
    got = lm_eval(work, "local-chat-completions", "base", "sp_answer", "--apply_chat_template")
    assert got["sample_len"] == 24 and 0.0 <= got["exact_match,none"] <= 1.0
