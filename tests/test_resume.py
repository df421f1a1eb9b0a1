"""Kill training with SIGKILL mid-run, resume, and get bitwise the adapter of an uninterrupted run (CPU, same seed)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from tiny import save_tiny

import softprompts.training.loop as loop
from softprompts.cli import main
from softprompts.training import checkpoint_path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model = save_tiny("llama", root / "tiny")
    rows = [{"text": ("good " if i % 2 else "bad ") + "x" * (i % 7), "label": "pos" if i % 2 else "neg"}
            for i in range(24)]
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, model, data


def command(model, data, out, *extra) -> list[str]:
    return [sys.executable, "-m", "softprompts", "train", "--model", str(model), "--method", "prefix",
            "--data", str(data), "--eval-data", str(data), "--template", "Review: {text}\\nSentiment:",
            "--target", " {label}", "--steps", "16", "--batch-size", "4", "--grad-accum", "2", "--lr", "1e-2",
            "--eval-every", "3", "--checkpoint-every", "1", "--virtual-tokens", "3", "--seed", "7", "--out", str(out),
            "--no-progress", *extra]


def env() -> dict:
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.mark.slow  # 4 CLI subprocesses; test_interrupted_run_resumes_to_the_same_adapter is its in-process twin
def test_sigkill_then_resume_is_bitwise_identical(setup):
    root, model, data = setup
    full = root / "full"
    subprocess.run(command(model, data, full), check=True, env=env(), capture_output=True)

    killed = root / "killed"
    ckpt = checkpoint_path(killed)
    for delay in (0.3, 0.1, 0.03, 0.0):  # a fast machine finishes 16 tiny steps in well under 0.3 s: try shorter
        shutil.rmtree(killed, ignore_errors=True)
        ckpt.unlink(missing_ok=True)
        proc = subprocess.Popen(command(model, data, killed), env=env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.005)
        time.sleep(delay)  # land somewhere in the middle of a later step (or a checkpoint write)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if ckpt.exists() and not killed.exists():
            break
    assert ckpt.exists() and not killed.exists(), "the kill must happen mid-run for this test to mean anything"
    step = torch.load(ckpt, weights_only=False)["state"]["step"]
    assert 0 < step < 16

    other = command(model, data, killed, "--resume")
    other[other.index("--lr") + 1] = "5e-2"
    refused = subprocess.run(other, env=env(), capture_output=True, text=True)
    assert refused.returncode == 2 and "another training configuration" in refused.stderr
    assert "Traceback" not in refused.stderr and ckpt.exists()

    done = subprocess.run(command(model, data, killed, "--resume"), env=env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"resuming from {ckpt} at step" in done.stderr
    assert not ckpt.exists()

    assert_same_run(full, killed)


def assert_same_run(full, resumed) -> None:
    """The resumed run wrote bitwise the adapter of the uninterrupted one and the same record, timings aside (curve,
    best step and metric, base model's dev metrics, counts, configuration: the run's state through the checkpoint)."""
    a, b = load_file(str(full / "adapter.safetensors")), load_file(str(resumed / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def untimed(directory) -> dict:
        record = json.loads((directory / "training.json").read_text())
        curve = [{k: v for k, v in p.items() if k != "seconds"} for p in record.pop("curve")]
        record["timings"].pop("train_seconds"), record["timings"].pop("eval_seconds")
        record["timings"].pop("tokens_per_second")
        return {**record, "curve": curve}

    ra, rb = untimed(full), untimed(resumed)
    assert ra == rb and ra["steps_done"] == 16 and ra["timings"]["tokens"] > 0


def test_interrupted_run_resumes_to_the_same_adapter(setup, monkeypatch, capsys):
    """The SIGKILL test's in-process twin (test-fast): the same CLI run stops right after its checkpoint of step 5
    (exit 130, the checkpoint kept, no adapter written); a resume with another --lr is refused (exit 2, no
    traceback); a resume with the same flags ends at bitwise the adapter, curve and best step of the uninterrupted
    run."""
    root, model, data = setup
    full, stopped = root / "full-in-process", root / "stopped-in-process"
    assert main(command(model, data, full)[3:]) == 0
    save = loop._Run.save_checkpoint

    def save_then_stop(run):
        save(run)
        if run.state.step == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop._Run, "save_checkpoint", save_then_stop)
    assert main(command(model, data, stopped)[3:]) == 130
    monkeypatch.setattr(loop._Run, "save_checkpoint", save)
    ckpt = checkpoint_path(stopped)
    assert ckpt.is_file() and not stopped.exists()
    assert torch.load(ckpt, weights_only=False)["state"]["step"] == 5
    other = command(model, data, stopped, "--resume")[3:]
    other[other.index("--lr") + 1] = "5e-2"
    capsys.readouterr()
    assert main(other) == 2 and ckpt.is_file()
    err = capsys.readouterr().err
    assert "another training configuration" in err and "Traceback" not in err
    assert main(command(model, data, stopped, "--resume")[3:]) == 0
    assert f"resuming from {ckpt} at step 5" in capsys.readouterr().err and not ckpt.exists()
    assert_same_run(full, stopped)
