"""DePT (``methods/dept.py``, the ``OffsetPrompt`` artifact) on tiny random models, by equivalence.

Beyond the conformance matrix (which runs it like every method, T5 and BART included): offsets of zero are the soft
prompt alone; the injection is the model fed ``[E; e(x) + A·B]`` by hand (after a placement's lead, which gets none);
a target token never gets an offset, in the loss and in scores; the saved adapter gives the training-time output;
each row of a mixed batch (DePT beside soft prompts, KV prefixes and no adapter) == that row alone, raw and served;
a prompt prefilled in chunks == at once; gradients reach ``E``, ``A`` and ``B`` with two learning rates; a table holds
it; PEFT export refuses it; ``softprompts train --method dept`` then ``eval`` through the CLI; bad options are one
error.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_train import SPEC, examples, quiet
from tiny import ARCHS, cached_base, perturb, save_tiny, saved_table

import softprompts as sp
from softprompts.cli import main
from softprompts.interop import export_peft
from softprompts.interop.peft_export import PeftExportError
from softprompts.methods import MethodError
from softprompts.model.artifacts import EmbeddingOffsets, OffsetPrompt, SoftPrompt, VirtualContext
from softprompts.model.decoder import score as decoder_score
from softprompts.model.decoder.chunked_prefill import ChunkedPrefill
from softprompts.model.decoder.inject import forward
from softprompts.model.generation import GenerationRequest, GenerationResult
from softprompts.model.padding import pad_rows, prompt_target_rows
from softprompts.model.placement import place
from softprompts.tasks import Batch

ATOL = 2e-4
TEXT = "classify it"
INPUT = "a fine film"
TASK = {"task": "generate", "prompt": "{text}", "target": " {label}"}


def dept(base, n: int = 4, scale: float = 0.5, seed: int = 3, **options):
    """A DePT module moved off its init (B perturbed: the offsets are live)."""
    options.setdefault("init_text", TEXT)
    options.setdefault("offset_positions", 12)
    options.setdefault("rank", 3)
    return perturb(sp.create_method(base, "dept", num_virtual_tokens=n, **options), scale=scale, seed=seed)


def ids(base, text: str) -> torch.Tensor:
    return torch.tensor([base.tokenize(text)])


def by_hand(base, artifact: OffsetPrompt, x: torch.Tensor, lead: tuple[int, ...] = ()) -> torch.Tensor:
    """The HF model on ``inputs_embeds = [e(lead); E; e(x_i) + (A·B)_i for i < S, then e(x_i)]`` (logits of x)."""
    embeds = base.embed(x[0])  # [T, d]
    dense = artifact.offsets.dense()[: embeds.shape[0]]
    embeds = torch.cat([embeds[: dense.shape[0]] + dense.to(embeds.dtype), embeds[dense.shape[0]:]])
    full = torch.cat([base.embed(torch.tensor(list(lead), dtype=torch.long)), artifact.prompt.embeds, embeds])
    return base.model(inputs_embeds=full[None]).logits[:, -x.shape[1]:]


@pytest.mark.parametrize("arch", ARCHS)
def test_zero_offsets_are_the_soft_prompt_alone(arch):
    """At init (B = 0) DePT's logits equal prompt tuning's from the same init, bit for bit."""
    base = cached_base(arch)
    ours = sp.create_method(base, "dept", num_virtual_tokens=5, init_text=TEXT)
    plain = sp.create_method(base, "prompt", num_virtual_tokens=5, init_text=TEXT)
    assert torch.equal(ours().embeds, plain().embeds) and not ours().offsets.dense().any()
    x = ids(base, INPUT)
    with torch.no_grad():
        assert torch.equal(forward(base, ours(), x).logits, forward(base, plain(), x).logits)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_injection_is_the_model_fed_offset_embeddings_by_hand(arch):
    """The offsets land on the first S real tokens after the virtual positions; with a placement lead, the lead
    sits in the soft part and gets none (the offsets still start at the first real token after the virtual ones)."""
    base = cached_base(arch)
    artifact = dept(base, offset_positions=5).materialize()
    x = ids(base, INPUT)  # 11 tokens: 5 get an offset
    with torch.no_grad():
        torch.testing.assert_close(forward(base, artifact, x).logits, by_hand(base, artifact, x), atol=ATOL,
                                   rtol=1e-4)
        lead = tuple(base.tokenize("Q: "))
        placed = place(base, artifact, lead)
        assert isinstance(placed, OffsetPrompt) and placed.length == len(lead) + artifact.length
        torch.testing.assert_close(forward(base, placed, x).logits, by_hand(base, artifact, x, lead), atol=ATOL,
                                   rtol=1e-4)


def offsets_changed(artifact: OffsetPrompt, rows: slice) -> OffsetPrompt:
    """``artifact`` with the offsets' rows ``rows`` (positions) moved by a large amount (``A``'s rows)."""
    a = artifact.offsets.a.clone()
    a[rows] += 3.0
    return OffsetPrompt(artifact.prompt, EmbeddingOffsets(a, artifact.offsets.b))


def test_target_tokens_get_no_offset():
    """Changing the offsets at positions past every row's prompt changes neither the training loss (fused and
    plain heads) nor rank-classification scores; changing one inside the prompts changes both. The same change
    does reach a row read whole (no prompt length), so the test sees a leak."""
    base = cached_base("llama")
    artifact = dept(base, offset_positions=16).materialize()
    prompts = [base.tokenize("good film"), base.tokenize("bad")]  # 9 and 3 tokens
    targets = [base.tokenize(" pos"), base.tokenize(" neg!")]
    ids_, mask, labels, positions = prompt_target_rows(prompts, targets, base.pad_id, base.device)
    batch = Batch(ids_, mask, labels, positions)
    beyond, inside = offsets_changed(artifact, slice(9, 16)), offsets_changed(artifact, slice(1, 2))

    def losses(art):
        with torch.no_grad():
            return (decoder_score.label_loss_sum(base, art, batch).item(),
                    decoder_score.plain_label_loss_sum(base, art, batch).item())

    def scores(art):
        return [s.tolist() for s in base.row_label_scores(art, prompts, [[t, t[:1]] for t in targets])]

    assert losses(beyond) == losses(artifact) and scores(beyond) == scores(artifact)
    assert losses(inside)[0] != pytest.approx(losses(artifact)[0], abs=1e-3)
    assert scores(inside) != scores(artifact)
    whole = forward(base, artifact, ids_, mask).logits
    assert (forward(base, beyond, ids_, mask).logits - whole).abs().max() > 1e-2


@pytest.mark.parametrize("arch", ["llama", "gemma3", "t5"])
def test_saved_adapter_equals_training_time_output(arch, tmp_path):
    """Saved and loaded == the training module's output; on disk the soft prompt and the two factors, not [S, d]."""
    from test_conformance import logits as any_logits

    base = cached_base(arch)
    module = dept(base)
    directory = sp.save_adapter(sp.Adapter.from_method(module, base, task=TASK), tmp_path / "dept")
    loaded = sp.load_adapter(directory, base)
    assert loaded.method == "dept" and loaded.artifact.kind == "offset_prompt"
    meta = json.loads((directory / "adapter.json").read_text())
    assert meta["artifact"] == "offset_prompt" and meta["method_config"]["rank"] == 3
    d = base.shapes.hidden_size
    shapes = {k: tuple(v.shape) for k, v in loaded.artifact.tensors().items()}
    assert shapes == {"soft_prompt": (4, d), "offsets.a": (12, 3), "offsets.b": (3, d)}
    assert loaded.num_parameters == 4 * d + 3 * (12 + d) == module.num_trainable()
    x = ids(base, INPUT)
    with torch.no_grad():
        torch.testing.assert_close(any_logits(base, loaded.artifact, x), any_logits(base, module(), x),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("served", [False, True])
def test_mixed_rows_equal_each_alone(served):
    """DePT rows (two adapters, other P and S) beside a soft prompt, a KV prefix, a deep prompt and no adapter: each
    row == that row alone, with and without prompt lengths; ``served``: each artifact in its served form (a soft
    prompt's KV, DePT's soft part as KV beside its offsets) == the raw artifact alone."""
    base = cached_base("llama")
    raw = [dept(base, n=3, offset_positions=4).materialize(), perturb(sp.create_method(base, "prompt",
           num_virtual_tokens=2)).materialize(), None, perturb(sp.create_method(base, "prefix",
           num_virtual_tokens=5)).materialize(), dept(base, n=6, offset_positions=9, seed=5).materialize(),
           perturb(sp.create_method(base, "deep", num_virtual_tokens=2)).materialize()]
    arts = [base.serving_artifact(a) for a in raw] if served else raw
    rows = [base.tokenize(t) for t in ["one two", "second row", "3", "the fourth one", "a fine long film", "x y"]]
    ids_, mask = pad_rows(rows, base.pad_id, base.device)
    lengths = torch.tensor([len(r) - 1 for r in rows])  # the last token of each row is "target"
    with torch.no_grad():
        batched = forward(base, VirtualContext.from_rows(arts), ids_, mask).logits
        cut = forward(base, VirtualContext.from_rows(arts), ids_, mask, prompt_lengths=lengths).logits
        for i, (art, r) in enumerate(zip(raw, rows, strict=True)):
            alone = forward(base, art, torch.tensor([r])).logits[0]
            torch.testing.assert_close(batched[i, -len(r):], alone, atol=ATOL, rtol=1e-4)
            alone = forward(base, art, torch.tensor([r]), prompt_lengths=lengths[i:i + 1]).logits[0]
            torch.testing.assert_close(cut[i, -len(r):], alone, atol=ATOL, rtol=1e-4)
    together = sp.generate_ids(base, rows, arts, max_new_tokens=4, stop_ids=set())
    for art, r, out in zip(raw, rows, together, strict=True):
        assert sp.generate_ids(base, [r], art, max_new_tokens=4, stop_ids=set())[0] == out


def test_a_prompt_prefilled_in_chunks_equals_at_once():
    """The offsets continue across chunks (chunks of 2 over S = 7 offsets): the state's logits equal one forward."""
    base = cached_base("llama")
    artifact = dept(base, offset_positions=7).materialize()
    prompt = base.tokenize(INPUT)
    request = GenerationRequest(prompt, artifact, 1, stop_ids=frozenset())
    chunked = ChunkedPrefill(base, request, 2, GenerationResult([], "length", len(prompt)))
    while not chunked.done:
        chunked.advance()
    with torch.no_grad():
        at_once = forward(base, artifact, torch.tensor([prompt])).logits[0, -1]
    torch.testing.assert_close(chunked.state.logits[0, -1], at_once, atol=ATOL, rtol=1e-4)


def test_gradients_reach_the_prompt_and_both_factors_at_two_rates():
    """From B = 0 only E and B get a gradient at step 0 (dL/dA = dL/d(AB) B^T = 0); after one step all three do.
    The optimizer's groups: E at lr, A and B at lr * offset_lr_ratio. Training leaves the base bit for bit."""
    base = cached_base("llama")
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    method = sp.create_method(base, "dept", num_virtual_tokens=4, init_text=TEXT, offset_positions=8, rank=2,
                              offset_lr_ratio=0.5)
    groups = method.parameter_groups(0.02)
    assert [g["lr"] for g in groups] == [0.02, 0.01]
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in method.parameters())
    x = ids(base, INPUT)
    optimizer = torch.optim.AdamW(groups)
    for step in range(2):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(forward(base, method(), x).logits[:, -1], torch.tensor([42]))
        loss.backward()
        grads = {name: p.grad.abs().sum().item() for name, p in method.named_parameters()}
        assert grads["embeds"] > 0 and grads["b"] > 0 and (grads["a"] > 0) == (step > 0)
        optimizer.step()
    b = method.b.detach().clone()
    sp.train(base, method, examples(16), SPEC, quiet(steps=2, lr=5e-2, batch_size=8, warmup_ratio=0))
    assert not torch.equal(method.b, b)
    assert all(torch.equal(v, before[k]) for k, v in base.model.state_dict().items())


def test_bad_options_are_one_error_listing_each():
    base = cached_base("llama")
    with pytest.raises(MethodError) as err:
        sp.create_method(base, "dept", rank=0, offset_positions=0, offset_lr_ratio=float("nan"))
    message = str(err.value)
    for needle in ("rank must be a positive integer", "offset_positions must be a positive integer",
                   "offset_lr_ratio must be a finite positive number"):
        assert needle in message
    assert set(sp.METHODS["dept"].config_class.search_choices()) == {"num_virtual_tokens", "rank", "offset_lr_ratio"}


def test_continuing_a_saved_adapter_needs_its_shapes():
    base = cached_base("llama")
    saved = dept(base).materialize()
    continued = sp.create_method(base, "dept", init_artifact=saved, offset_positions=12, rank=3)
    assert all(torch.equal(x, y) for x, y in zip(continued().tensors().values(), saved.tensors().values(),
                                                  strict=True))
    with pytest.raises(MethodError, match="offset_positions 12 and rank 3"):
        sp.create_method(base, "dept", init_artifact=saved)


def test_in_a_prompt_table(tmp_path):
    """A DePT task beside prompt tuning and a prefix in one table: each row of the table's mixed context == alone."""
    base = cached_base("llama")
    adapters = {"dept": sp.Adapter.from_method(dept(base), base, task=TASK),
                "pt": sp.Adapter.from_method(perturb(sp.create_method(base, "prompt", num_virtual_tokens=3)), base,
                                             task=TASK),
                "pre": sp.Adapter.from_method(perturb(sp.create_method(base, "prefix", num_virtual_tokens=5)), base,
                                              task=TASK)}
    table = saved_table(tmp_path / "t", base, adapters)
    assert table.artifact("dept").kind == "offset_prompt"
    rows = ["dept", "pt", None, "pre", "dept"]
    tokens = [base.tokenize(t) for t in ["good", "bad film", "plain", "x", "a fine film"]]
    ids_, mask = pad_rows(tokens, base.pad_id, base.device)
    with torch.no_grad():
        mixed = forward(base, table.context(rows), ids_, mask).logits
        for i, (name, t) in enumerate(zip(rows, tokens, strict=True)):
            alone = forward(base, adapters[name].artifact if name else None, torch.tensor([t])).logits[0]
            torch.testing.assert_close(mixed[i, -len(t):], alone, atol=ATOL, rtol=1e-4)


def test_peft_export_refuses_naming_why(tmp_path):
    base = cached_base("llama")
    adapter = sp.Adapter.from_method(dept(base), base, task=TASK)
    with pytest.raises(PeftExportError, match="PEFT has no DePT.*drop its embedding offsets"):
        export_peft(adapter, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_offset_prompt_tensor_files_are_checked():
    good = OffsetPrompt(SoftPrompt(torch.zeros(2, 8)), EmbeddingOffsets(torch.zeros(5, 2), torch.zeros(2, 8)))
    back = sp.model.artifacts.artifact_from_tensors("offset_prompt", good.tensors())
    assert isinstance(back, OffsetPrompt) and back.offsets.positions == 5 and back.num_parameters() == 16 + 10 + 16
    with pytest.raises(ValueError, match="hidden size"):
        sp.model.artifacts.artifact_from_tensors("offset_prompt", {**good.tensors(), "offsets.b": torch.zeros(2, 4)})
    with pytest.raises(ValueError, match="exactly the tensors"):
        sp.model.artifacts.artifact_from_tensors("offset_prompt", {"soft_prompt": torch.zeros(2, 8)})


TEMPLATE = ["--template", "Review: {text}\\nSentiment:", "--target", " {label}"]


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory) -> tuple:
    """``(model directory, data file)``: a saved tiny Llama and 12 labelled rows, for the command line."""
    root = tmp_path_factory.mktemp("dept-cli")
    rows = [{"text": ("nice " if i % 2 else "poor ") + "y" * (i % 5), "label": "pos" if i % 2 else "neg"}
            for i in range(12)]
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return save_tiny("llama", root / "llama"), data


def test_train_then_eval_through_the_cli(cli_env, tmp_path, capsys):
    """``softprompts train --method dept`` writes an offset-prompt adapter; ``eval`` scores it; ``export --format
    peft`` refuses it with the reason (exit 2, no traceback)."""
    model, data = cli_env
    out = tmp_path / "adapter"
    assert main(["train", "--model", str(model), "--method", "dept", "--data", str(data), "--eval-data", str(data),
                 *TEMPLATE, "--steps", "3", "--eval-every", "3", "--virtual-tokens", "2", "--out", str(out),
                 "--no-progress"]) == 0
    meta = json.loads((out / "adapter.json").read_text())
    assert meta["method"] == "dept" and meta["artifact"] == "offset_prompt" and meta["num_virtual_tokens"] == 2
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out), "--data", str(data), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["n"] == 12 and 0 <= metrics["accuracy"] <= 1
    assert main(["export", "--adapter", str(out), "--format", "peft", "--out", str(tmp_path / "peft")]) == 2
    assert "PEFT has no DePT" in capsys.readouterr().err


def test_compare_recommendation_counts_dept_as_a_soft_prompt():
    """compare's "KV prefix vs soft prompt" line takes DePT's artifact (a soft prompt + offsets) as a soft prompt:
    with prompt tuning and DePT alone it has no KV prefix to weigh (it raised KeyError before); beside a prefix
    DePT is the best soft prompt when it leads prompt tuning."""
    from test_compare import _entry

    from softprompts.compare.report import recommend

    base = {"test": {"accuracy": 0.70, "n": 500}}
    softs = {"prompt": _entry("prompt", "soft_prompt", [0.80], 1000),
             "dept": _entry("dept", "offset_prompt", [0.84], 1100)}
    assert "KV prefix vs soft prompt" not in "\n".join(recommend(softs, base, "accuracy", 500)["text"])
    mixed = {**softs, "prefix": _entry("prefix", "kv_prefix", [0.90], 10000)}
    text = "\n".join(recommend(mixed, base, "accuracy", 500)["text"])
    assert "`prefix` vs `dept`" in text


def test_a_wrapped_model_stops_the_offsets_at_the_labels():
    """``sp.wrap`` (Trainer, TRL): with labels (-100 on the prompt, left padding) the offsets reach the prompt only,
    as in our own loss: its logits == ours with each row's prompt length; without labels every token is prompt."""
    base = cached_base("llama")
    model = sp.wrap(base, "dept", num_virtual_tokens=3, init_text="abc", offset_positions=16, rank=2)
    perturb(model.method)
    prompts, targets = [base.tokenize("good film"), base.tokenize("bad")], [base.tokenize(" yes"), base.tokenize(" no")]
    ids_, mask = pad_rows([p + t for p, t in zip(prompts, targets, strict=True)], base.pad_id, base.device)
    labels = ids_.masked_fill(mask == 0, -100)
    for i, target in enumerate(targets):
        labels[i, : ids_.shape[1] - len(target)] = -100
    lengths = torch.tensor([len(p) for p in prompts])
    with torch.no_grad():
        artifact = model.method()
        wrapped = model(ids_, attention_mask=mask, labels=labels).logits
        torch.testing.assert_close(wrapped, forward(base, artifact, ids_, mask, prompt_lengths=lengths).logits)
        assert (wrapped - forward(base, artifact, ids_, mask).logits).abs().max() > 1e-3
        torch.testing.assert_close(model(ids_, attention_mask=mask).logits, forward(base, artifact, ids_, mask).logits)


def test_tune_searches_its_rank_and_offset_rate(cli_env, tmp_path):
    """``softprompts tune --method dept``: a trial queued with rank 4 and offset_lr_ratio 0.3 trains with them
    (``P*d + r*(S + d)`` parameters) and records them in its training record."""
    optuna = pytest.importorskip("optuna")
    model, data = cli_env
    out = tmp_path / "tune"
    out.mkdir()
    study = optuna.create_study(storage=f"sqlite:///{out / 'study.db'}", study_name="softprompts-tune",
                                direction="maximize")
    study.enqueue_trial({"lr": 1e-2, "num_virtual_tokens": 3, "rank": 4, "offset_lr_ratio": 0.3})
    assert main(["tune", "--model", str(model), "--method", "dept", "--data", str(data), "--eval-data", str(data),
                 *TEMPLATE, "--virtual-tokens-choices", "2,3", "--trials", "1", "--steps", "2", "--eval-every", "1",
                 "--out", str(out)]) == 0
    (trial,) = optuna.load_study(study_name="softprompts-tune", storage=f"sqlite:///{out / 'study.db'}").trials
    assert trial.params == {"lr": 1e-2, "num_virtual_tokens": 3, "rank": 4, "offset_lr_ratio": 0.3}
    config = json.loads((out / "trials" / "000" / "training.json").read_text())["method_config"]
    assert config["rank"] == 4 and config["offset_lr_ratio"] == 0.3
    d = sp.load_base(str(model)).shapes.hidden_size
    assert trial.user_attrs["trainable_parameters"] == 3 * d + 4 * (256 + d)


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_encoder_decoder_offsets_go_on_the_encoder_input(arch):
    """DePT's original setting: the encoder reads ``[E; e(x) + A·B]`` (every encoder token is prompt); the decoder's
    tokens get none. Ours == the HF model fed those encoder embeddings by hand."""
    from softprompts.model.encoder_decoder import forward as encoder_decoder

    base = cached_base(arch)
    artifact = dept(base, offset_positions=5).materialize()
    x = ids(base, INPUT)
    y = torch.tensor([[base.decoder_start_id, *base.tokenize("out")]])
    embeds = base.embed(x[0])
    embeds = torch.cat([embeds[:5] + artifact.offsets.dense().to(embeds.dtype), embeds[5:]])
    with torch.no_grad():
        ours = encoder_decoder.forward(base, VirtualContext.broadcast(artifact, 1), x, None, y, None).logits
        theirs = base.model(inputs_embeds=torch.cat([artifact.prompt.embeds, embeds])[None],
                            decoder_input_ids=y).logits
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=1e-4)
