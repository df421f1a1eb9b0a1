"""``--dtype``: the auto rule (bfloat16 where the hardware multiplies it natively), the flag on every command that
loads a base, a bad name refused, vLLM given the dtype the default engine resolves, and the engine's mixed-batch
equivalence at bfloat16 (docs/BENCHMARKS.md, section Y, measures the quality cost on the real model)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from test_engine import check_mixed_equals_alone
from tiny import save_tiny, tiny_base

from softprompts.cli import build_parser, main
from softprompts.cli.arguments import DTYPE_CHOICES
from softprompts.model import load
from softprompts.model.load import ModelLoadError, auto_dtype, resolve_dtype

CPU = torch.device("cpu")


@pytest.mark.parametrize(("flags", "expected", "said"), [
    ({"avx512f", "avx512_bf16", "amx_bf16"}, torch.bfloat16, "amx_bf16, avx512_bf16"),
    ({"avx512f", "avx512_bf16"}, torch.bfloat16, "avx512_bf16"),
    ({"fp", "asimd", "bf16"}, torch.bfloat16, "bf16"),  # aarch64 FEAT_BF16
    ({"avx512f", "avx2"}, torch.float32, "bf16 would be emulated"),
    (set(), torch.float32, "bf16 would be emulated"),  # no /proc/cpuinfo (macOS)
])
def test_auto_on_a_cpu_is_bf16_only_with_native_bf16(monkeypatch, flags, expected, said):
    monkeypatch.setattr(load, "cpu_flags", lambda: frozenset(flags))
    choice = auto_dtype(CPU)
    assert choice.dtype is expected and said in choice.reason and choice.name == str(expected)[6:]
    assert resolve_dtype("auto", CPU) is expected and resolve_dtype("auto") is expected  # None: the CPU


@pytest.mark.parametrize("bf16", [True, False])
def test_auto_on_cuda_follows_the_gpus_bf16_support(monkeypatch, bf16):
    monkeypatch.setattr(load, "cpu_flags", lambda: frozenset({"avx512_bf16"}))  # the CPU's flags do not count
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    choice = auto_dtype(torch.device("cuda"))
    assert choice.dtype is (torch.bfloat16 if bf16 else torch.float32) and "cuda" in choice.reason
    assert auto_dtype(torch.device("mps")).dtype is torch.float32


def test_names_resolve_and_the_default_stays_float32():
    assert resolve_dtype(None) is torch.float32
    for name in DTYPE_CHOICES:  # every name the command line takes loads
        assert resolve_dtype(name, CPU).is_floating_point
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype(torch.float16) is torch.float16


@pytest.mark.parametrize("name", ["fp33", "int8", "float8_e4m3fn", "Tensor", "bool"])
def test_a_dtype_that_makes_no_sense_is_one_clear_error(name):
    with pytest.raises(ModelLoadError, match="unknown dtype .*use auto, float32, bfloat16 or float16"):
        resolve_dtype(name)


def test_the_command_line_refuses_a_bad_dtype_before_loading(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["serve", "--adapters", "x", "--dtype", "fp33"])
    assert exit_.value.code == 2 and "invalid choice: 'fp33'" in capsys.readouterr().err


# each command that loads a base, with the arguments it needs besides --dtype
COMMANDS = {
    "serve": ["--adapters", "x"],
    "eval": ["--data", "x"],
    "generate": ["text"],
    "train": ["--data", "x", "--out", "y"],
    "tune": ["--data", "x", "--eval-data", "x", "--out", "y"],
    "compare": ["--dataset", "x", "--out", "y"],
    "explain": ["--adapter", "x", "--data", "x", "--out", "y"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("dtype", ["auto", "bfloat16", "float32"])
def test_every_command_that_loads_a_base_takes_dtype(command, dtype):
    args = build_parser().parse_args([command, *COMMANDS[command], "--dtype", dtype])
    assert args.dtype == dtype
    assert build_parser().parse_args([command, *COMMANDS[command]]).dtype is None  # the default: float32


def test_vllm_gets_the_dtype_the_default_engine_resolves(monkeypatch, tmp_path, capsys):
    """``serve --engine vllm --dtype auto`` hands vLLM the name ``auto`` resolves to here, and says why."""
    from softprompts.cli import serve_vllm
    from softprompts.interop import vllm_launch

    seen = {}
    monkeypatch.setattr(load, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(vllm_launch, "check_vllm_installed", lambda: None)
    monkeypatch.setattr(serve_vllm, "_kv_cache_option", lambda args, path, dtype: [])
    monkeypatch.setattr(vllm_launch, "vllm_command", lambda config, path, host, port, dtype, extra: (
        seen.update(config=config.dtype, launch=dtype) or (["vllm"], {})))
    monkeypatch.setattr(serve_vllm, "supervise", lambda argv, env: 0)
    for flag, expected in [("auto", "bfloat16"), (None, "float32"), ("float16", "float16")]:
        argv = ["serve", "--engine", "vllm", "--adapters", str(tmp_path)] + (["--dtype", flag] if flag else [])
        args: argparse.Namespace = build_parser().parse_args(argv)
        args.extra_args = []
        assert serve_vllm.run_vllm(args) == 0
        assert seen == {"config": expected, "launch": expected}
    assert "--dtype auto: bfloat16, the CPU has avx512_bf16" in capsys.readouterr().err


@pytest.mark.injection  # make test-alt: on the second transformers version too
def test_mixed_batch_rows_equal_alone_at_bf16():
    """The engine's equivalence at bfloat16 weights: greedy tokens identical, logits within bf16's resolution."""
    base = tiny_base("llama")
    base.model.to(torch.bfloat16)
    assert base.dtype is torch.bfloat16
    check_mixed_equals_alone(base, atol=0.1, rtol=0.02)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("tiny-llama"))


def spy_dtypes(monkeypatch, flags: set[str]) -> list[torch.dtype]:
    """The dtypes ``load_base`` resolves from now on (``cpu_flags`` set to ``flags``)."""
    loaded: list[torch.dtype] = []
    resolve = load.resolve_dtype
    monkeypatch.setattr(load, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(load, "resolve_dtype", lambda *a, **k: loaded.append(resolve(*a, **k)) or loaded[-1])
    return loaded


def task_args(directory) -> list[str]:
    data = directory / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in [("good", "pos"), ("bad", "neg")]))
    return ["--template", "Review: {text}\nSentiment:", "--target", " {label}", "--data", str(data)]


@pytest.mark.parametrize(("flags", "expected"), [({"avx512_bf16"}, torch.bfloat16), (set(), torch.float32)])
def test_eval_and_generate_load_the_base_in_the_dtype_asked(monkeypatch, tmp_path, tiny_dir, capsys, flags, expected):
    """``eval`` and ``generate`` with ``--dtype auto`` load the base in what ``auto`` picks, and say why; the bare
    model is then scored / decoded in that dtype (a float32 default otherwise)."""
    loaded = spy_dtypes(monkeypatch, flags)
    assert main(["eval", "--model", str(tiny_dir), *task_args(tmp_path), "--dtype", "auto", "--json"]) == 0
    assert main(["generate", "--model", str(tiny_dir), "--raw", "--max-new-tokens", "2", "--dtype", "auto", "hi"]) == 0
    assert main(["generate", "--model", str(tiny_dir), "--raw", "--max-new-tokens", "2", "hi"]) == 0
    assert loaded == [expected, expected, torch.float32]
    assert capsys.readouterr().err.count(f"--dtype auto: {str(expected)[6:]}") == 2


def test_train_takes_dtype_and_its_adapter_evaluates_on_float32(monkeypatch, tmp_path, tiny_dir):
    """``train --dtype bfloat16``: the frozen base loads in bfloat16 (the method's parameters stay float32), and the
    adapter it saves evaluates on the float32 base ``eval`` loads by default; without the flag training is float32."""
    loaded = spy_dtypes(monkeypatch, set())
    common = ["--model", str(tiny_dir), "--method", "prompt", "--virtual-tokens", "2", *task_args(tmp_path),
              "--steps", "2", "--batch-size", "2", "--no-progress", "--checkpoint-every", "0"]
    assert main(["train", *common, "--dtype", "bfloat16", "--out", str(tmp_path / "bf16")]) == 0
    assert main(["train", *common, "--out", str(tmp_path / "fp32")]) == 0
    assert main(["eval", "--adapter", str(tmp_path / "bf16"), "--data", str(tmp_path / "data.jsonl")]) == 0
    assert loaded == [torch.bfloat16, torch.float32, torch.float32]


def test_one_checkpoint_has_one_weights_fingerprint_in_float32_and_bfloat16():
    """An adapter trained on the float32 base loads on the same checkpoint at bfloat16 (``--dtype auto``) without a
    weights warning; another checkpoint still warns; a file written before the ``w2:`` form (the legacy fingerprint)
    still matches the float32 base it was made on and warns on another checkpoint."""
    import dataclasses
    import warnings

    import softprompts as sp
    from softprompts.adapter import Adapter

    fp32, other = tiny_base("llama"), tiny_base("llama", seed=1)
    bf16 = tiny_base("llama")
    bf16.model.to(torch.bfloat16)
    assert fp32.weights_fingerprint() == bf16.weights_fingerprint() != other.weights_fingerprint()
    assert fp32.weights_fingerprint().startswith("w2:")
    adapter = Adapter(sp.SoftPrompt(torch.zeros(2, fp32.shapes.hidden_size)), "prompt", {}, fp32.name, fp32.shapes,
                      fp32.weights_fingerprint())
    legacy = dataclasses.replace(adapter, base_weights_fingerprint=fp32.legacy_weights_fingerprint())
    with warnings.catch_warnings():
        warnings.simplefilter("error", sp.BaseWeightsWarning)
        adapter.check_base(bf16)
        adapter.check_base(fp32)
        legacy.check_base(fp32)
    for made, used in ((adapter, other), (legacy, other)):
        with pytest.warns(sp.BaseWeightsWarning, match="same shapes, other weights"):
            made.check_base(used)


class Loaded(Exception):
    """Raised by the spy once the base's dtype is resolved: what the command asked for is all the test needs."""


@pytest.mark.parametrize("dtype", ["bfloat16", None])
def test_compare_and_explain_load_the_base_in_the_dtype_asked(monkeypatch, tmp_path, tiny_dir, dtype):
    """``compare`` and ``explain`` hand ``--dtype`` to the base they load (float32 without it)."""
    seen: list[torch.dtype] = []
    resolve = load.resolve_dtype

    def spy(*a, **k):
        seen.append(resolve(*a, **k))
        raise Loaded

    flag = ["--dtype", dtype] if dtype else []
    monkeypatch.setattr(load, "resolve_dtype", spy)
    common = task_args(tmp_path)
    data = common[-1]
    with pytest.raises(Loaded):
        main(["compare", "--model", str(tiny_dir), *common, "--eval-data", data, "--test-data", data,
              "--methods", "prompt", "--steps", "1", "--out", str(tmp_path / "cmp"), *flag])
    adapter = tmp_path / "adapter"
    monkeypatch.setattr(load, "resolve_dtype", resolve)
    assert main(["train", "--model", str(tiny_dir), "--method", "prompt", "--virtual-tokens", "2", *common,
                 "--steps", "1", "--batch-size", "2", "--no-progress", "--checkpoint-every", "0",
                 "--out", str(adapter)]) == 0
    monkeypatch.setattr(load, "resolve_dtype", spy)
    with pytest.raises(Loaded):
        main(["explain", "--adapter", str(adapter), "--data", data, "--out", str(tmp_path / "ex"), *flag])
    expected = torch.bfloat16 if dtype else torch.float32
    assert seen == [expected, expected]
