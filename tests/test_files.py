"""files.py: a reader polling an adapter or a table while another process (or thread) replaces it in a loop finds a
whole version (never nothing, never the json of one save with the weights of another); killed writers' temporaries are
cleaned by the next write of the same target."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from tiny import tiny_base

import softprompts as sp
from softprompts.files import atomic_directory, read_files, remove_stale
from softprompts.table import PromptTable

ROUNDS = 150


def write_versions(kind: str, target: str, a: str, b: str, ready: Callable[[], object]) -> None:
    """The writer: replace ``target`` (an adapter, or a table's one task) ``ROUNDS`` times, alternating the adapters
    saved at ``a`` and ``b``; ``ready()`` once both are loaded. Run in another process (``WRITER``) or a thread."""
    versions = [sp.load_adapter(a), sp.load_adapter(b)]
    ready()
    for i in range(ROUNDS):
        if kind == "adapter":
            sp.save_adapter(versions[i % 2], target, overwrite=True)
        else:
            table = PromptTable(target)
            table.add("task", versions[i % 2])
            table.save()


WRITER = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from test_files import write_versions; "
          "write_versions(*sys.argv[1:5], ready=lambda: print('ready', flush=True))")


def version(base, value: float, directory: Path) -> Path:
    """An adapter whose every embedding value and whose task prompt both say ``value``."""
    adapter = sp.Adapter.from_method(sp.create_method(base, "prompt", num_virtual_tokens=4), base,
                                     task={"prompt": f"v{value:g}"})
    adapter.artifact = sp.SoftPrompt(torch.full((4, 32), value))
    return sp.save_adapter(adapter, directory)


def read_while_written(kind: str, target: Path, writing: Future) -> tuple[int, list[str], set[float]]:
    """Read ``target`` until the writer is done (at least once): reads, failures, the versions seen."""
    seen, reads, failures = set(), 0, []
    while not writing.done() or reads == 0:
        try:
            adapter = sp.load_adapter(target) if kind == "adapter" else PromptTable.load(target).adapter("task")
            seen.add(consistent(adapter))
        except (sp.SoftpromptsError, OSError) as exc:
            failures.append(f"{type(exc).__name__}: {exc}")
        reads += 1
    return reads, failures, seen


def consistent(adapter) -> float:
    value = float(adapter.task.prompt[1:])
    assert torch.all(adapter.artifact.embeds == value), "json of one save with the weights of another"
    return value


@pytest.mark.skipif(sys.platform != "linux", reason="the atomic directory exchange is Linux-only")
@pytest.mark.parametrize("kind", ["adapter", "table"])
@pytest.mark.parametrize("writer", ["thread", pytest.param("process", marks=pytest.mark.slow)])  # process: seconds
def test_reader_always_sees_one_whole_version(tmp_path, kind, writer):
    """The reader polls while the writer (another process, or a thread of this one: the same files, the same
    exchange, test-fast) replaces the target ``ROUNDS`` times."""
    base = tiny_base("llama")
    a, b = version(base, 1.0, tmp_path / "a"), version(base, 2.0, tmp_path / "b")
    target = tmp_path / "target"
    if kind == "adapter":
        sp.save_adapter(sp.load_adapter(a), target)
    else:
        table = PromptTable(target)
        table.add("task", sp.load_adapter(a))
        table.save()
    with ThreadPoolExecutor(1) as pool:
        if writer == "process":
            proc = subprocess.Popen([sys.executable, "-c", WRITER, kind, str(target), str(a), str(b)],
                                    stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            assert proc.stdout.readline().strip() == "ready"
            done = pool.submit(lambda: proc.wait() == 0 or pytest.fail("the writer failed"))
        else:
            ready = threading.Event()
            done = pool.submit(write_versions, kind, str(target), str(a), str(b), ready.set)
            assert ready.wait(60)
        reads, failures, seen = read_while_written(kind, target, done)
        done.result()  # the writer's own error, if any
    assert failures == [], f"{len(failures)} of {reads} reads failed, first: {failures[0]}"
    assert seen == {1.0, 2.0} and reads > 20  # both versions were read while the writer swapped them
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "target"]  # no temporaries left


def test_replacing_without_the_exchange_still_leaves_a_whole_directory(tmp_path, monkeypatch):
    monkeypatch.setattr("softprompts.files.exchange", lambda a, b: False)
    target = tmp_path / "t"
    for text in ("old", "new"):
        atomic_directory(target, lambda tmp, text=text: (tmp / "f").write_text(text), overwrite=True)
    assert (target / "f").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["t"]


def test_read_files_reads_one_version_and_names_a_missing_file(tmp_path):
    target = tmp_path / "t"
    atomic_directory(target, lambda tmp: [(tmp / n).write_text(n) for n in ("x", "y")])
    assert read_files(target, ["x", "y"]) == {"x": b"x", "y": b"y"}
    with pytest.raises(FileNotFoundError, match="z"):
        read_files(target, ["x", "z"])


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporaries_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    base = tiny_base("llama")
    target = tmp_path / "adapter"
    gone, alive = dead_pid(), os.getppid()
    (tmp_path / f".adapter.tmp-{gone}-abc").mkdir()  # a directory a killed save left
    (tmp_path / f".adapter.old-{gone}-def").mkdir()
    (tmp_path / f".adapter.tmp-{alive}-ghi").mkdir()  # a writer that still runs: not ours to remove
    (tmp_path / f".other.tmp-{gone}-jkl").mkdir()  # another target's
    version(base, 1.0, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["adapter", f".adapter.tmp-{alive}-ghi", f".other.tmp-{gone}-jkl"])
    checkpoint = tmp_path / "run.checkpoint.pt"
    (tmp_path / f".run.checkpoint.pt.tmp-{gone}-x").write_bytes(b"half")
    from softprompts.training.run import atomic_save

    atomic_save({"step": 3}, checkpoint)
    assert not (tmp_path / f".run.checkpoint.pt.tmp-{gone}-x").exists()
    assert torch.load(checkpoint)["step"] == 3
    assert remove_stale(target) == []


def test_resume_in_another_environment_says_what_changed(tmp_path, capsys):
    """The checkpoint records threads, device, dtype and versions; a resume with other threads warns."""
    from softprompts.data.datasets import Example

    base = tiny_base("llama")
    spec = sp.TaskSpec("classify", "{t}", " {l}", ["a", "b"])
    examples = [Example(f"x{i}", " a" if i % 2 else " b", "a" if i % 2 else "b") for i in range(8)]
    out = tmp_path / "run"
    config = sp.TrainConfig(steps=4, lr=1e-2, batch_size=2, progress=False, checkpoint_every=1)
    import softprompts.training.loop as loop

    real = loop.check_step

    def stop_at_three(step, *args):
        if step == 3:
            raise KeyboardInterrupt
        real(step, *args)

    loop.check_step = stop_at_three
    try:
        with pytest.raises(KeyboardInterrupt):
            sp.train(base, sp.create_method(base, "prompt", num_virtual_tokens=2), examples, spec, config,
                     out_dir=out)
    finally:
        loop.check_step = real
    saved = torch.load(sp.training.checkpoint_path(out), weights_only=False)
    assert saved["environment"]["torch_threads"] == torch.get_num_threads()
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        capsys.readouterr()
        record = sp.train(base, sp.create_method(base, "prompt", num_virtual_tokens=2), examples, spec, config,
                          out_dir=out, resume=True).record
    finally:
        torch.set_num_threads(threads)
    assert f"torch_threads: {threads} -> {threads + 1}" in capsys.readouterr().err
    assert record["environment"]["torch_threads"] == threads + 1 and record["steps_done"] == 4
