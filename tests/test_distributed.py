"""Data-parallel training under ``torchrun`` on CPU (gloo, 2 processes, a tiny llama).

* 1 process vs ``torchrun --nproc_per_node 2 -m softprompts train``: same global batch and seed -> the same adapter
  within 1e-5 (not bitwise: with 2 ranks the gradient is a sum of two partial sums all-reduced by gloo, a different
  floating-point summation order than one process summing everything; Adam's ``g / sqrt(v)`` passes the ~1e-7
  relative differences on), the same dev metrics (each rank scores its shard of dev, outputs are gathered, the metric
  is computed on all of dev), only rank 0 writes files and logs.
* Resume after one rank is SIGKILLed mid-run (torchrun tears the group down): ``--resume`` ends at the same adapter as
  an uninterrupted 2-process run.
* Unit tests of the pieces: sharding keeps one global batch for any N, gathered evaluation == evaluation on all of dev
  (also when a rank's shard is empty), ``load_base(device_map=...)``.

What is NOT tested here (no GPU): NCCL, ``cuda:LOCAL_RANK`` placement, ``--device-map auto`` over several GPUs,
multi-node rendezvous. See docs/DISTRIBUTED.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import save_tiny, tiny_base

from softprompts.data.datasets import Example
from softprompts.evaluate import evaluate
from softprompts.tasks import TaskSpec
from softprompts.training import Distributed, TrainConfig, checkpoint_path
from softprompts.training.loop import dev_score

TOL = 1e-5  # max abs difference allowed between adapters trained with 1 and 2 processes (measured: ~1e-6)
STEPS = 8
WORDS = ["good fun", "bad", "great film, loved it", "awful", "fine", "terrible plot", "nice", "boring"]
NEG = {"bad", "awful", "terrible plot", "boring"}

# rank KILL_RANK SIGKILLs itself at its KILL_AT_CALL-th all_reduce_sum (2 per step: at the start of step 6, after
# rank 0 wrote the step-4 checkpoint) - deterministic, unlike racing a timer against a sub-second run
KILLER = """
import os, signal, sys
from softprompts.training import distributed
from softprompts.cli import main

rank, at = int(os.environ["KILL_RANK"]), int(os.environ["KILL_AT_CALL"])
reduce, calls = distributed.Distributed.all_reduce_sum, [0]

def all_reduce_sum(self, tensor):
    calls[0] += 1
    if self.rank == rank and calls[0] == at:
        os.kill(os.getpid(), signal.SIGKILL)
    return reduce(self, tensor)

distributed.Distributed.all_reduce_sum = all_reduce_sum
sys.exit(main())
"""


def _rows(n: int, shift: int) -> list[dict]:
    return [{"text": WORDS[(3 * i + shift) % 8] + "!" * (i % 3),
             "label": "neg" if WORDS[(3 * i + shift) % 8] in NEG else "pos"} for i in range(n)]


def _stable_tokenizer():
    """tiny.make_tokenizer's byte-level tokenizer with ids in sorted-character order: ``ByteLevel.alphabet()`` is a
    set, so its iteration order (and the ids) change with PYTHONHASHSEED; fixed ids keep these runs reproducible."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"<pad>": 256, "<eos>": 257})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A tiny llama directory and train/dev JSONL files."""
    root = tmp_path_factory.mktemp("dist")
    save_tiny("llama", root / "model")
    _stable_tokenizer().save_pretrained(root / "model")
    for name, rows in (("train", _rows(24, 0)), ("dev", _rows(7, 1))):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def train_args(work: Path, out: Path) -> list[str]:
    """Global batch 6 (3 per rank with 2 ranks), dev evaluation at steps 0/4/8, checkpoints every 2 steps."""
    return ["train", "--model", str(work / "model"), "--method", "ptuning", "--virtual-tokens", "4",
            "--data", str(work / "train.jsonl"), "--eval-data", str(work / "dev.jsonl"),
            "--template", "Review: {text}\nSentiment:", "--target", " {label}", "--steps", str(STEPS),
            "--batch-size", "6", "--lr", "0.03", "--warmup-ratio", "0", "--eval-every", "4",
            "--checkpoint-every", "2", "--seed", "0", "--no-progress", "--out", str(out)]


def torchrun(args: list[str], nproc: int = 2, script: Path | None = None, env: dict | None = None):
    """``torchrun --standalone --nproc_per_node N -m softprompts ARGS`` (or a script) on CPU/gloo."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    target = [str(script)] if script else ["-m", "softprompts"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *target, *args]
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=240)


def adapter_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter.safetensors"))


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def dev_points(record: dict) -> list:
    return [(p["step"], p.get("dev_accuracy")) for p in record["curve"] if "dev_accuracy" in p]


@pytest.fixture(scope="module")
def one_process(work) -> Path:
    """The reference: the same command in this process (no WORLD_SIZE: the single-process no-op path)."""
    from softprompts.cli import main

    out = work / "A1"
    assert main(train_args(work, out)) == 0
    return out


@pytest.fixture(scope="module")
def two_processes(work) -> tuple[Path, subprocess.CompletedProcess]:
    """The uninterrupted ``torchrun --nproc_per_node 2`` run."""
    out = work / "A2"
    proc = torchrun(train_args(work, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


@pytest.mark.slow  # torchrun: 2 processes (the shard and gather tests below stay in test-fast)
def test_two_processes_match_one_process(one_process, two_processes):
    """Same global batch and seed: 2 ranks (DDP over the adapter) end at the 1-process adapter within TOL."""
    out2, proc = two_processes
    ref, got = adapter_tensors(one_process), adapter_tensors(out2)
    diff = max_abs_diff(ref, got)
    print(f"1 vs 2 processes: max abs diff {diff:.3e} over {sum(t.numel() for t in ref.values())} values")
    assert diff <= TOL
    rec1 = json.loads((one_process / "training.json").read_text())
    rec2 = json.loads((out2 / "training.json").read_text())
    assert rec1["best_step"] == STEPS, "the kept adapter must be a trained one for this comparison to mean anything"
    assert rec2["best_step"] == rec1["best_step"] and rec2["steps_done"] == STEPS
    # gathered evaluation: every dev point is the metric over ALL of dev, identical to one process
    assert dev_points(rec2) == dev_points(rec1) and rec2["base_model_dev"] == rec1["base_model_dev"]
    assert rec2["data"]["dev_examples"] == 7 and rec2["base_model_dev"]["n"] == 7
    losses1 = [p["loss"] for p in rec1["curve"] if p["loss"] is not None]
    losses2 = [p["loss"] for p in rec2["curve"] if p["loss"] is not None]
    assert losses2 == pytest.approx(losses1, abs=1e-4)  # the global token-mean loss, all-reduced
    assert rec2["timings"]["tokens"] == rec1["timings"]["tokens"]  # tokens summed over ranks
    # only rank 0 logs and writes: one summary line, one output directory, no checkpoint left behind
    assert proc.stderr.count("saved ptuning adapter") == 1
    assert proc.stderr.count("base model without adapter") == 1
    assert not checkpoint_path(out2).exists()


@pytest.mark.slow
def test_resume_after_a_rank_is_killed(work, two_processes, tmp_path):
    """SIGKILL rank 1 at step 6 (last checkpoint: step 4); ``--resume`` ends where the uninterrupted run ended."""
    killer = tmp_path / "kill_rank.py"
    killer.write_text(KILLER)
    out = work / "A2-killed"
    proc = torchrun(train_args(work, out), script=killer, env={"KILL_RANK": "1", "KILL_AT_CALL": str(2 * 6 - 1)})
    assert proc.returncode != 0, "torchrun must report the killed rank"
    assert not out.exists()
    saved = torch.load(checkpoint_path(out), map_location="cpu", weights_only=False)
    assert saved["state"]["step"] == 4 and saved["world_size"] == 2 and len(saved["rank_rng"]) == 2

    resumed = torchrun([*train_args(work, out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "at step 4" in resumed.stderr
    reference, _ = two_processes
    diff = max_abs_diff(adapter_tensors(reference), adapter_tensors(out))
    print(f"killed+resumed vs uninterrupted (2 processes): max abs diff {diff:.3e}")
    assert diff <= TOL
    rec, ref = (json.loads((d / "training.json").read_text()) for d in (out, reference))
    assert rec["steps_done"] == STEPS and dev_points(rec) == dev_points(ref)
    assert not checkpoint_path(out).exists()


# ---------------------------------------------------------------- unit tests (no subprocesses)

SPEC = TaskSpec("classify", "Review: {text}\nSentiment:", " {label}", ["neg", "pos"], max_prompt_tokens=40)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_partition_one_global_batch(world):
    """Whatever N, the ranks' shards are a partition of the same global batch (sizes differ by at most 1)."""
    batch = list(range(7))
    shards = [Distributed(rank=r, world_size=world).shard(batch) for r in range(world)]
    assert sorted(x for s in shards for x in s) == batch
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_single_process_is_a_no_op():
    d = Distributed()
    t = torch.tensor([1.0, 2.0])
    assert d.is_main and not d.enabled and d.device is None
    assert d.all_reduce_sum(t) is t and t.tolist() == [1.0, 2.0]
    assert d.gather_objects("x") == ["x"] and d.broadcast_object(3) == 3
    module = torch.nn.Linear(2, 2)
    assert d.wrap(module) is module
    d.barrier()
    d.close()


class _SimulatedRank(Distributed):
    """Rank ``rank`` of ``world_size`` in one process: gather runs the other ranks' evaluations locally."""

    def __init__(self, rank: int, world_size: int, others) -> None:
        super().__init__(rank=rank, world_size=world_size)
        self.others = others  # rank -> that rank's outputs

    def gather_objects(self, obj) -> list:
        return [obj if r == self.rank else self.others(r) for r in range(self.world_size)]


@pytest.mark.parametrize("n_dev,world", [(7, 2), (5, 3), (1, 2)])
def test_gathered_evaluation_equals_evaluation_on_all_of_dev(n_dev, world):
    """Ranks score disjoint shards; the merged outputs give exactly the metric on all of dev (empty shards too)."""
    base = tiny_base("llama")
    dev = [Example(f"Review: {r['text']}\nSentiment:", f" {r['label']}", r["label"]) for r in _rows(n_dev, 1)]
    config = TrainConfig(progress=False)

    def outputs_of(rank: int) -> list:
        mine = Distributed(rank=rank, world_size=world).shard(dev)
        return evaluate(base, None, mine, SPEC, return_outputs=True)["outputs"] if mine else []

    full = evaluate(base, None, dev, SPEC)
    for rank in range(world):
        got = dev_score(base, None, dev, SPEC, config, _SimulatedRank(rank, world, outputs_of))
        assert got == full


def test_load_base_with_device_map(work, monkeypatch):
    """``device_map`` goes to ``from_pretrained`` (here all on CPU: the multi-GPU split is untested without GPUs)."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    from softprompts.model.load import load_base

    seen = []
    real = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **kw: seen.append(kw.get("device_map")) or real(*a, **kw))
    base = load_base(str(work / "model"), device_map={"": "cpu"})
    plain = load_base(str(work / "model"))
    assert seen == [{"": "cpu"}, None] and base.device.type == "cpu"
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(base.model(ids).logits, plain.model(ids).logits)
