"""Cartridges: self-study on a corpus, the teacher's targets with the chunk cached, distillation into a KV prefix with
a frozen first token, exact resume, composition, and the command line with its errors (tiny Llama, byte tokens)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import save_tiny, tiny_base

import softprompts as sp
from softprompts.cli import main
from softprompts.compose import compose
from softprompts.data.corpus import chunk_documents, read_corpus
from softprompts.errors import DataError, SoftpromptsError
from softprompts.model.decoder.inject import forward
from softprompts.model.head_loss import head_cross_entropy_sum
from softprompts.model.soft_targets import SoftTargets, soft_cross_entropy_sum, top_k_targets
from softprompts.tasks import collate
from softprompts.training import SelfStudyConfig, TrainConfig, checkpoint_path, loop, self_study, train_cartridge
from softprompts.training.cartridge import self_study_path
from softprompts.training.distill import student_rows, teacher_targets
from softprompts.training.self_study import ContextFormat, generate_conversations

CORPUS = """# Kervaunt

The capital of Kervaunt is Pellidrune.

It was founded in 1614 by Odrenna Vasquill.

The island's currency is the drell, worth 40 pips.

Mount Grevakh rises 1,287 metres above the sea.
"""
OTHER = "Zentrow Ferries sail to Cadrevine twice a day.\n\nThe trip takes three hours and forty minutes.\n"


def study(**changes) -> SelfStudyConfig:
    options = dict(conversations=6, chunk_tokens=64, question_tokens=6, answer_tokens=8, batch_size=4, top_k=5)
    return SelfStudyConfig(**{**options, **changes})


def config(steps: int = 6, **changes) -> TrainConfig:
    options = dict(steps=steps, lr=5e-2, batch_size=4, eval_every=0, checkpoint_every=0, progress=False, seed=3)
    return TrainConfig(**{**options, **changes})


@pytest.fixture(scope="module")
def base():
    return tiny_base("llama")


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "kervaunt.md"
    path.write_text(CORPUS)
    return path


def conversations_of(base, corpus, **changes):
    chunks = chunk_documents(read_corpus([corpus]), base.tokenize, base.tokenizer.decode, study().chunk_tokens)
    fmt = ContextFormat(base.tokenizer)
    return chunks, fmt, generate_conversations(base, chunks, fmt, study(**changes), progress=False)


def test_soft_targets_through_the_fused_head_equal_autograd_and_a_hard_target_is_the_cross_entropy():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=True).requires_grad_(False)
    hidden = torch.randn(2, 3, 8, requires_grad=True)
    labels = torch.tensor([[-100, 4, 5], [1, 2, 3]])
    soft = top_k_targets(torch.randn(2, 3, 50), 7)
    fused = head_cross_entropy_sum(hidden, head, labels, soft=soft, chunk_bytes=4 * 50 * 2)  # 2 rows a chunk
    fused.backward()
    fused_grad, hidden.grad = hidden.grad.clone(), None
    reference = soft_cross_entropy_sum(head(hidden), labels, soft)
    reference.backward()
    assert fused.item() == pytest.approx(reference.item(), rel=1e-5)
    assert torch.allclose(fused_grad, hidden.grad, atol=1e-6)
    one_hot = SoftTargets(labels.clamp(min=0)[..., None], torch.ones(2, 3, 1))
    hard = torch.nn.functional.cross_entropy(head(hidden).flatten(0, 1), labels.flatten(), reduction="sum")
    assert head_cross_entropy_sum(hidden, head, labels, soft=one_hot).item() == pytest.approx(hard.item(), rel=1e-5)


def test_top_k_targets_renormalize_the_teachers_most_likely_tokens():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    soft = top_k_targets(logits, 2)
    assert soft.ids.tolist() == [[1, 3]]
    expected = torch.tensor([3.0, 2.0]).softmax(-1)
    assert torch.allclose(soft.probs[0], expected) and soft.probs.sum().item() == pytest.approx(1.0)


def test_chunking_keeps_paragraphs_and_documents_apart(base, corpus, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text(OTHER)
    chunks = chunk_documents(read_corpus([corpus, other]), base.tokenize, base.tokenizer.decode, 64)
    assert all(len(base.tokenize(c.text)) <= 64 for c in chunks)
    assert {c.source for c in chunks} == {str(corpus), str(other)}
    assert all("Zentrow" not in c.text for c in chunks if c.source == str(corpus))
    assert "\n\n".join(c.text for c in chunks if c.source == str(corpus)) == CORPUS.strip()


def test_self_study_is_seeded_and_visits_every_chunk(base, corpus):
    chunks, _, first = conversations_of(base, corpus)
    _, _, again = conversations_of(base, corpus)
    _, _, other_seed = conversations_of(base, corpus, seed=1)
    assert first == again and first != other_seed
    assert {c.chunk for c in first} == set(range(len(chunks)))
    assert all(c.answer_ids and len(c.answer_ids) <= study().answer_tokens + 1 for c in first)
    recite = [c for c in first if c.kind == "recite"]
    assert all(c.question == self_study.RECITE_QUESTION for c in recite)


def test_the_teacher_with_its_chunk_cached_equals_the_chunk_in_the_prompt(base, corpus):
    chunks, fmt, conversations = conversations_of(base, corpus)
    targets = teacher_targets(base, chunks, conversations, fmt, top_k=5, batch_size=4, progress=False)
    for conv, soft in zip(conversations, targets, strict=True):
        context = fmt.context_text(chunks[conv.chunk].text)
        prompt = base.tokenize(context) + base.tokenize(fmt.teacher_prompt(context, chunks[conv.chunk].text,
                                                                          conv.question))
        ids = torch.tensor([prompt + conv.answer_ids])
        n = len(conv.answer_ids)
        logits = forward(base, None, ids, torch.ones_like(ids)).logits[0, -n - 1 : -1]  # the chunk as real tokens
        reference = top_k_targets(logits, 5)
        assert soft.ids.shape == (n, 5)
        assert torch.equal(soft.ids, reference.ids)
        assert torch.allclose(soft.probs, reference.probs, atol=1e-5)


def test_distillation_moves_the_student_toward_the_teacher_and_never_the_frozen_token(base, corpus, tmp_path):
    out = tmp_path / "cartridge"
    result = train_cartridge(base, [corpus], config(steps=8), study(), out_dir=out, num_virtual_tokens=8)
    fmt = ContextFormat(base.tokenizer)
    start = base.text_to_kv(base.tokenize(fmt.context_text(CORPUS.strip()))[:8])  # the corpus's first 8 tokens
    trained = result.adapter.artifact
    for layer in range(start.num_layers):
        assert torch.equal(trained.keys[layer][:, :1], start.keys[layer][:, :1].to(trained.keys[layer].dtype))
        assert torch.equal(trained.values[layer][:, :1], start.values[layer][:, :1])
        assert not torch.allclose(trained.keys[layer][:, 1:], start.keys[layer][:, 1:])
    chunks, _, conversations = conversations_of(base, corpus)
    rows = student_rows(base, conversations, fmt, teacher_targets(base, chunks, conversations, fmt, 5, 4, False))
    batch = collate(rows, base.pad_id, base.device)
    with torch.no_grad():
        before, after = (base.label_loss_sum(a, batch).item() for a in (start, trained))
    assert after < before
    saved = [json.loads(line) for line in (out / "self_study.jsonl").read_text().splitlines()]
    assert [row["messages"][0]["content"] for row in saved] == [c.question for c in conversations]
    summary = json.loads((out / "cartridge.json").read_text())
    kv_bytes = summary["kv_bytes"]
    assert summary["virtual_tokens"] == 8 and kv_bytes["cartridge"] < kv_bytes["corpus_in_context"]
    assert not self_study_path(out).exists() and not checkpoint_path(out).exists()
    loaded = sp.load_adapter(out, base)
    assert loaded.method == "cartridge" and loaded.task.chat is not None
    answer = sp.generate(base, "What is the capital of Kervaunt?", loaded, max_new_tokens=4)  # the user's message
    assert answer == sp.generate(base, fmt.student_prompt("What is the capital of Kervaunt?"), loaded,
                                 max_new_tokens=4, raw=True)  # rendered as the cartridge was trained


def test_resume_after_an_interruption_is_exact_and_does_not_generate_again(base, corpus, tmp_path, monkeypatch):
    full = train_cartridge(base, [corpus], config(checkpoint_every=1), study(), out_dir=tmp_path / "full",
                           num_virtual_tokens=8)
    save = loop._Run.save_checkpoint

    def save_then_stop(run):
        save(run)
        if run.state.step == 3:
            raise KeyboardInterrupt

    out = tmp_path / "killed"
    monkeypatch.setattr(loop._Run, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train_cartridge(base, [corpus], config(checkpoint_every=1), study(), out_dir=out, num_virtual_tokens=8)
    monkeypatch.setattr(loop._Run, "save_checkpoint", save)
    assert checkpoint_path(out).is_file() and self_study_path(out).is_file() and not out.exists()

    def must_not_run(*args, **kwargs):
        raise AssertionError("resume must reuse the saved conversations")

    monkeypatch.setattr(self_study, "generate_conversations", must_not_run)
    resumed = train_cartridge(base, [corpus], config(checkpoint_every=1), study(), out_dir=out, resume=True,
                              num_virtual_tokens=8)
    for a, b in zip(full.adapter.artifact.tensors().values(), resumed.adapter.artifact.tensors().values(),
                    strict=True):
        assert torch.equal(a, b)
    assert (out / "self_study.jsonl").read_text() == (tmp_path / "full" / "self_study.jsonl").read_text()


def test_saved_conversations_are_reused_only_for_their_corpus_and_recipe(base, corpus, tmp_path, monkeypatch):
    first = train_cartridge(base, [corpus], config(steps=2), study(), out_dir=tmp_path / "a", num_virtual_tokens=8)
    saved = tmp_path / "a" / "self_study.jsonl"
    monkeypatch.setattr(self_study, "generate_conversations", lambda *a, **k: pytest.fail("must reuse"))
    again = train_cartridge(base, [corpus], config(steps=2), study(), out_dir=tmp_path / "b", num_virtual_tokens=8,
                            self_study_data=saved)
    assert torch.equal(first.adapter.artifact.keys[0], again.adapter.artifact.keys[0])
    other = tmp_path / "other.md"
    other.write_text(OTHER * 3)
    with pytest.raises(DataError, match="another corpus"):
        train_cartridge(base, [other], config(steps=2), study(), out_dir=tmp_path / "c", num_virtual_tokens=8,
                        self_study_data=saved)
    with pytest.raises(DataError, match="other self-study options"):
        train_cartridge(base, [corpus], config(steps=2), study(temperature=1.0), out_dir=tmp_path / "d",
                        num_virtual_tokens=8, self_study_data=saved)


def kv_adapter(base, seed: int, length: int):
    method = sp.create_method(base, "cartridge", num_virtual_tokens=length, init="random", seed=seed)
    return sp.Adapter.from_method(method, base)


def test_composition_is_the_two_prefixes_side_by_side(base):
    a, b = kv_adapter(base, 0, 3), kv_adapter(base, 1, 5)
    both = compose([a, b])
    assert both.num_virtual_tokens == 8 and both.method == "cartridge"
    for layer in range(a.artifact.num_layers):
        assert torch.equal(both.artifact.keys[layer], torch.cat([a.artifact.keys[layer], b.artifact.keys[layer]], 1))
        assert torch.equal(both.artifact.values[layer],
                           torch.cat([a.artifact.values[layer], b.artifact.values[layer]], 1))
    ids = torch.tensor([base.tokenize("Where is Pellidrune?")])
    concatenated = sp.KVPrefix([torch.cat([x, y], 1) for x, y in zip(a.artifact.keys, b.artifact.keys, strict=True)],
                               [torch.cat([x, y], 1) for x, y in zip(a.artifact.values, b.artifact.values,
                                                                     strict=True)])
    assert torch.equal(forward(base, both.artifact, ids).logits, forward(base, concatenated, ids).logits)
    soft = sp.Adapter.from_method(sp.create_method(base, "prompt", num_virtual_tokens=2), base)
    with pytest.raises(sp.AdapterError, match="holds a soft prompt"):
        compose([a, soft], names=["a", "s"])
    with pytest.raises(sp.AdapterError, match="at least two"):
        compose([a])
    other = kv_adapter(tiny_base("qwen2"), 0, 3)
    with pytest.raises(sp.AdapterMismatchError):
        compose([a, other])


def test_bad_corpora_are_clear_errors(base, corpus, tmp_path):
    empty, binary, latin = tmp_path / "empty.txt", tmp_path / "binary.txt", tmp_path / "latin.txt"
    empty.write_text("  \n")
    binary.write_bytes(b"abc\0def")
    latin.write_bytes("caf\xe9".encode("latin-1"))
    for path, message in [(tmp_path / "missing.md", "does not exist"), (empty, "is empty"), (binary, "binary"),
                          (latin, "not UTF-8"), (tmp_path / "x.pdf", "plain text or markdown")]:
        if path.suffix == ".pdf":
            path.write_bytes(b"%PDF")
        with pytest.raises(DataError, match=message):
            train_cartridge(base, [path], config(), study(), num_virtual_tokens=8)
    short = tmp_path / "short.md"
    short.write_text("Pellidrune.")
    with pytest.raises(DataError, match="is not smaller"):
        train_cartridge(base, [short], config(), study(), num_virtual_tokens=100)
    with pytest.raises(DataError, match="virtual tokens with a conversation do not fit"):
        train_cartridge(base, [corpus], config(), study(), num_virtual_tokens=200)
    with pytest.raises(DataError, match="does not fit the model's context"):
        train_cartridge(base, [corpus], config(), study(chunk_tokens=240, answer_tokens=64), num_virtual_tokens=8)
    with pytest.raises(SoftpromptsError, match="must be a positive integer"):
        train_cartridge(base, [corpus], config(), study(conversations=0), num_virtual_tokens=8)
    with pytest.raises(SoftpromptsError, match="encoder-decoder"):
        train_cartridge(tiny_base("t5"), [corpus], config(), study(), num_virtual_tokens=8)


def test_the_command_line_trains_evaluates_and_composes_cartridges(tmp_path, corpus, capsys):
    model = save_tiny("llama", tmp_path / "tiny")
    common = ["--model", str(model), "--corpus", str(corpus), "--conversations", "4", "--chunk-tokens", "64",
              "--question-tokens", "6", "--answer-tokens", "8", "--teacher-top-k", "4", "--virtual-tokens", "8",
              "--steps", "2", "--batch-size", "2", "--no-progress"]
    questions = tmp_path / "questions.jsonl"
    questions.write_text(json.dumps({"messages": [{"role": "user", "content": "Capital of Kervaunt?"},
                                                  {"role": "assistant", "content": "Pellidrune"}]}) + "\n")
    assert main(["train", *common, "--out", str(tmp_path / "a")]) == 0, capsys.readouterr().err
    assert "saved cartridge adapter" in capsys.readouterr().err
    assert main(["train", *common, "--seed", "1", "--eval-data", str(questions), "--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    assert main(["eval", "--adapter", str(tmp_path / "a"), "--model", str(model), "--data", str(questions),
                 "--json"]) == 0
    assert "exact_match" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["compose", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "ab")]) == 0
    assert "16 virtual tokens" in capsys.readouterr().out
    assert sp.load_adapter(tmp_path / "ab", tiny_base("llama")).num_virtual_tokens == 16
    assert main(["table", "add", str(tmp_path / "table"), "--name", "kervaunt", "--adapter", str(tmp_path / "a")]) == 0
    assert main(["eval", "--adapter", f"{tmp_path / 'table'}#kervaunt", "--model", str(model), "--data",
                 str(questions), "--json"]) == 0
    assert main(["train", *common, "--data", str(questions), "--out", str(tmp_path / "c")]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["compose", str(tmp_path / "a"), "--out", str(tmp_path / "d")]) == 2
    assert "at least two" in capsys.readouterr().err
