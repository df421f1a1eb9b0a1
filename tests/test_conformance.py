"""Conformance matrix: every method x every tiny architecture, by equivalence rather than golden numbers.

Numbering follows the foundation issue: (1) soft prompt == real-token embeddings, (2) KV prefix == real prefill,
(3) soft prompt's KV == soft prompt, (4) cached decoding == uncached forward, (5) materialized == training module,
(6) save/load round-trip and base mismatch, (7) adapters change the output, (8) only the adapter trains,
(9) left/right padding == single rows.

The tests marked ``BOTH_FAMILIES`` run on the encoder-decoder models (tiny T5, T5 v1.1-style, BART) too: there the
model reads the input with its encoder and its decoder writes ``OUT`` (``logits``). The equivalences only one family
has stay with that family: here the decoder-only ones, in test_encoder_decoder.py the encoder-decoder ones.
"""

from __future__ import annotations

import pytest
import torch
from tiny import ALL_ARCHS, ARCHS, QUANTIZED_ARCHS, QUANTIZED_DECODERS, cached_base, perturb, tiny_base

import softprompts as sp
import softprompts.evaluate
import softprompts.model.encoder_decoder.score
from softprompts.model.decode_loop import decode_batch
from softprompts.model.decoder.inject import VirtualContext, forward
from softprompts.model.encoder_decoder import forward as encoder_decoder
from softprompts.model.encoder_decoder.base import EncoderDecoderBase
from softprompts.model.generation import GenerationRequest

pytestmark = pytest.mark.injection

METHODS = list(sp.METHODS)
ATOL = 2e-4
TEXT = "prefix!"  # 7 byte tokens
INPUT = "the input"
OUT = "out"  # what an encoder-decoder's decoder writes after its start token
BOTH_FAMILIES = pytest.mark.parametrize("base", ALL_ARCHS + QUANTIZED_ARCHS, indirect=True)


@pytest.fixture(params=ARCHS + QUANTIZED_DECODERS)
def base(request):
    """Every decoder-only tiny architecture, and the quantized bases (``--quantize``): the equivalences hold on a
    quantized base as they do on a full-precision one."""
    return cached_base(request.param)


def ids_of(base, text):
    return torch.tensor([base.tokenize(text)])


def logits(base, virtual, x, written: list[int] | None = None):
    """Our logits with ``virtual`` (an artifact or a method's output) in front of the input ``x`` ``[1, T]``, the model
    then writing ``written`` (default: nothing on a decoder-only base; ``OUT`` on an encoder-decoder one).
    Decoder-only: ``[1, T + len(written), V]`` over the input and the written tokens (the input is the prompt: DePT's
    embedding offsets stop there); encoder-decoder: the decoder's ``[1, 1 + len(written), V]`` from its start token."""
    if isinstance(base, EncoderDecoderBase):
        y = torch.tensor([[base.decoder_start_id, *(base.tokenize(OUT) if written is None else written)]])
        return encoder_decoder.forward(base, VirtualContext.broadcast(virtual, 1), x, None, y, None).logits
    return forward(base, virtual, torch.cat([x, torch.tensor([written or []], dtype=torch.long)], 1),
                   prompt_lengths=torch.tensor([x.shape[1]])).logits


def logits_plain(base, ids):
    """The HF model alone on ``ids`` (an encoder-decoder's decoder writing ``OUT``): the reference for ``logits``,
    whose positions are its last ones."""
    if isinstance(base, EncoderDecoderBase):
        y = torch.tensor([[base.decoder_start_id, *base.tokenize(OUT)]])
        return base.model(input_ids=ids, decoder_input_ids=y).logits
    return base.model(input_ids=ids).logits


def make(base, method, **options):
    options.setdefault("num_virtual_tokens", len(base.tokenize(TEXT)))
    options.setdefault("init_text", TEXT)
    return sp.create_method(base, method, **options)


# (1) (2) per method: text init at step 0 == the model run with that text in front.
@pytest.mark.parametrize("method", METHODS)
def test_text_init_equals_text_in_front(base, method):
    adapter = make(base, method)
    x = ids_of(base, INPUT)
    ours = forward(base, adapter(), x).logits
    reference = logits_plain(base, torch.cat([ids_of(base, TEXT), x], 1))[:, -x.shape[1] :]
    torch.testing.assert_close(ours, reference, atol=ATOL, rtol=1e-4)


@BOTH_FAMILIES
def test_soft_prompt_of_token_embeddings_equals_tokens(base):
    text, x = ids_of(base, TEXT), ids_of(base, INPUT)
    prompt = sp.SoftPrompt(base.embed(text[0]))
    ours = logits(base, prompt, x)
    reference = logits_plain(base, torch.cat([text, x], 1))[:, -ours.shape[1] :]
    torch.testing.assert_close(ours, reference, atol=ATOL, rtol=1e-4)


def test_kv_prefix_from_prefill_equals_text_in_front(base):
    text, x = ids_of(base, TEXT), ids_of(base, INPUT)
    prefix = base.text_to_kv(text[0])
    assert prefix.length == text.shape[1]
    assert [k.shape[0] for k in prefix.keys] == list(base.shapes.kv_heads)
    ours = forward(base, prefix, x).logits
    reference = logits_plain(base, torch.cat([text, x], 1))[:, -x.shape[1] :]
    torch.testing.assert_close(ours, reference, atol=ATOL, rtol=1e-4)


# (3) a soft prompt's precomputed KV is interchangeable with the soft prompt.
@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_soft_prompt_kv_equals_soft_prompt(base, method):
    prompt = perturb(make(base, method)).materialize()
    x = ids_of(base, INPUT)
    torch.testing.assert_close(
        forward(base, base.soft_prompt_to_kv(prompt), x).logits, forward(base, prompt, x).logits, atol=ATOL, rtol=1e-4
    )


# (4) cached step-by-step greedy decoding (the decode loop) == one uncached forward, at every step.
@BOTH_FAMILIES
@pytest.mark.parametrize("method", METHODS)
def test_cached_decoding_equals_uncached(base, method):
    artifact = perturb(make(base, method)).materialize()
    x = ids_of(base, INPUT)
    request = GenerationRequest(x[0].tolist(), artifact, 6, stop_ids=frozenset(), collect_logits=True)
    cached = decode_batch(base, [request])[0]
    assert len(cached.tokens) == len(cached.logits) == 6
    full = logits(base, artifact, x, written=cached.tokens)[0, -7:-1]  # the positions that chose each token
    for step, token in enumerate(cached.tokens):
        torch.testing.assert_close(cached.logits[step], full[step], atol=ATOL, rtol=1e-4)
        assert token == full[step].argmax().item()


# (5) the materialized adapter == the training-time module's output.
@BOTH_FAMILIES
@pytest.mark.parametrize("method", METHODS)
def test_materialized_equals_training_module(base, method):
    module = perturb(make(base, method))
    x = ids_of(base, INPUT)
    with torch.no_grad():
        live = logits(base, module(), x)
    saved = logits(base, module.materialize(), x)
    torch.testing.assert_close(saved, live, atol=1e-5, rtol=1e-5)


# building a method is deterministic for its seed and never touches the caller's random state
@BOTH_FAMILIES
@pytest.mark.parametrize("method", METHODS)
def test_building_a_method_leaves_the_callers_rng_alone(base, method):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = make(base, method, init="random", seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    second = make(base, method, init="random", seed=3)
    other = make(base, method, init="random", seed=4)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first.parameters(), other.parameters(), strict=True))


# (6) save -> load round-trips exactly; another base model is refused with both names.
@BOTH_FAMILIES
@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip(base, method, tmp_path):
    adapter = sp.Adapter.from_method(perturb(make(base, method)), base, task={"labels": ["a", "b"]})
    sp.save_adapter(adapter, tmp_path / "a")
    loaded = sp.load_adapter(tmp_path / "a", base)
    assert loaded.method == method and loaded.task == sp.TaskSpec(labels=["a", "b"])
    for name, tensor in adapter.artifact.tensors().items():
        assert torch.equal(loaded.artifact.tensors()[name], tensor)
    other = tiny_base("qwen2" if base.shapes.model_type != "qwen2" else "llama")
    with pytest.raises(sp.AdapterMismatchError, match=base.name) as err:
        sp.load_adapter(tmp_path / "a", other)
    assert other.name in str(err.value)


# (6b) the same shapes with other weights (another checkpoint): loads, with a warning naming both models
@BOTH_FAMILIES
def test_other_weights_load_with_a_warning(base, tmp_path):
    adapter = sp.Adapter.from_method(perturb(make(base, "prompt")), base)
    sp.save_adapter(adapter, tmp_path / "a")
    other_checkpoint = tiny_base(base.name.removeprefix("tiny-"), seed=1)
    assert other_checkpoint.weights_fingerprint() != base.weights_fingerprint()
    with pytest.warns(sp.BaseWeightsWarning, match="same shapes, other weights") as caught:
        loaded = sp.load_adapter(tmp_path / "a", other_checkpoint)
    assert base.weights_fingerprint() in str(caught[0].message)
    assert other_checkpoint.weights_fingerprint() in str(caught[0].message)
    assert torch.equal(loaded.artifact.embeds, adapter.artifact.embeds)


# (7) non-trivial values change the output (a silently ignored prefix would fail this).
@BOTH_FAMILIES
@pytest.mark.parametrize("method", METHODS)
def test_adapter_changes_output(base, method):
    artifact = perturb(make(base, method), scale=2.0).materialize()
    x = ids_of(base, INPUT)
    with_adapter = logits(base, artifact, x)
    without = logits_plain(base, x)
    assert (with_adapter - without).abs().max() > 1e-2


# (8) only the adapter trains; base weights bit-for-bit unchanged; loss goes down. Decoder-only: the next token after
# the input toward id 42, lr 3e-2, by a quarter in 15 steps. Encoder-decoder: the training loss of the target "ok"
# (``loss_sum``), by 5% in 30 steps, lr 1e-1 (1e-2 for a prefix): tiny random T5s saturate, the bar is that gradients
# reach the adapter.
@BOTH_FAMILIES
@pytest.mark.parametrize("method", METHODS)
def test_only_adapter_trains_and_loss_drops(base, method):
    before = {k: plain(v).clone() for k, v in base.model.state_dict().items()}
    module = make(base, method, num_virtual_tokens=4)
    x = ids_of(base, INPUT)
    if isinstance(base, EncoderDecoderBase):
        lr, steps, bar = 1e-1 if method != "prefix" else 1e-2, 30, 0.95
        prompts, targets = [base.tokenize(INPUT)], [base.tokenize("ok")]

        def loss_of(virtual):
            return sp.model.encoder_decoder.score.loss_sum(base, virtual, prompts, targets)
    else:
        lr, steps, bar = 3e-2, 15, 0.75

        def loss_of(virtual):
            return torch.nn.functional.cross_entropy(logits(base, virtual, x)[:, -1], torch.full((1,), 42))
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_of(module())
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in base.model.parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < bar * losses[0]
    for k, v in base.model.state_dict().items():
        assert torch.equal(plain(v), before[k]), k


def plain(weight: torch.Tensor) -> torch.Tensor:
    """A weight as a plain tensor: a torchao quantized weight's int8 values (its subclass has no ``equal``)."""
    return weight.qdata if hasattr(weight, "qdata") else weight


# (9) left- and right-padded batches == unpadded single rows.
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_matches_single_rows(base, method, side):
    artifact = perturb(make(base, method)).materialize()
    texts = ["a longer input text", "short", "mid size"]
    rows = [base.tokenize(t) for t in texts]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, sl], mask[i, sl] = torch.tensor(r), 1
    batched = forward(base, artifact, ids, mask).logits
    for i, r in enumerate(rows):
        single = forward(base, artifact, torch.tensor([r])).logits[0]
        sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        torch.testing.assert_close(batched[i, sl], single, atol=ATOL, rtol=1e-4)


def test_mixed_rows_equal_each_alone(base):
    """Rows with different artifacts and lengths in one batch == each run alone (what serving relies on)."""
    arts = [perturb(make(base, m, num_virtual_tokens=n)).materialize() for m, n in
            [("prompt", 3), ("prefix", 5), ("deep", 2), ("ptuning", 4)]] + [None]
    rows = [base.tokenize(t) for t in ["one", "second row", "3", "the fourth one", "plain"]]
    ids, mask = sp.model.padding.pad_rows(rows, 256, base.device)
    batched = forward(base, VirtualContext.from_rows(arts), ids, mask).logits
    for i, (art, r) in enumerate(zip(arts, rows, strict=True)):
        alone = forward(base, art, torch.tensor([r])).logits[0]
        torch.testing.assert_close(batched[i, -len(r):], alone, atol=ATOL, rtol=1e-4)


@BOTH_FAMILIES
def test_generate_and_scores_with_mixed_rows_equal_alone(base):
    """Different kinds and lengths in one call (an encoder-decoder groups them into exact batches) == each alone."""
    arts = [perturb(make(base, "prefix")).materialize(), None, perturb(make(base, "prompt")).materialize(),
            perturb(make(base, "prefix", num_virtual_tokens=3)).materialize(),
            perturb(make(base, "prompt", num_virtual_tokens=5)).materialize(),
            perturb(make(base, "deep", num_virtual_tokens=2)).materialize()]
    prompts = [base.tokenize(t) for t in ["abc", "hello there", "x", "abc", "x", "fourth row"]]
    together = sp.generate_ids(base, prompts, arts, max_new_tokens=5, stop_ids=set())
    targets = [base.tokenize(t) for t in ["yes", "no", "maybe", "yes", "maybe", "ok"]]
    scores = sp.evaluate.target_logprobs(base, arts, prompts, targets)
    for art, p, t, out, score in zip(arts, prompts, targets, together, scores, strict=True):
        assert sp.generate_ids(base, [p], art, max_new_tokens=5, stop_ids=set())[0] == out
        assert sp.evaluate.target_logprobs(base, art, [p], [t])[0][0] == pytest.approx(score[0], abs=1e-4)


# which kinds of method continue a saved artifact of each kind: a soft prompt continues as a soft prompt, as its
# exact KV prefix or as DePT's soft part (offsets at zero); a DePT artifact only as DePT (others would drop offsets)
CONTINUED_BY = {"soft_prompt": ("soft_prompt", "kv_prefix", "offset_prompt"), "kv_prefix": ("kv_prefix",),
                "offset_prompt": ("offset_prompt",)}


# continuing a saved adapter: step 0 of the new module reproduces it exactly, with the same method and with every
# other method that can continue that artifact; the others refuse it
@pytest.mark.parametrize("method", METHODS)
def test_init_from_saved_artifact_reproduces_it(base, method):
    saved = perturb(make(base, method)).materialize()
    continuers = [m for m, cls in sp.METHODS.items() if cls.artifact_kind in CONTINUED_BY[saved.kind]]
    assert method in continuers and (len(continuers) >= 2 or saved.kind == "offset_prompt")
    for other in set(sp.METHODS) - set(continuers):
        with pytest.raises(sp.SoftpromptsError):
            sp.create_method(base, other, init_artifact=saved)
    x = ids_of(base, INPUT)
    for other in continuers:
        continued = sp.create_method(base, other, init_artifact=saved)
        with torch.no_grad():
            torch.testing.assert_close(forward(base, continued(), x).logits, forward(base, saved, x).logits,
                                       atol=ATOL, rtol=1e-4)
