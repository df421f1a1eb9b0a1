"""Encoder-decoder conformance (tiny random T5, T5 v1.1-style and BART built from configs): equivalences where one
exists, behaviour checks where the bidirectional encoder makes an exact check impossible.

Exact: a soft prompt of real token embeddings == those tokens in front of the encoder input; a decoder
self-attention prefix from a real decoder prefill == that text in front of the target; a cross-attention prefix
from an encoder output == that output in front of the encoder's; cached decoding == uncached; materialized ==
training module; save/load; padding and mixed batches == single rows. Encoder prefix (no exact reference): it
changes the output, only adapter parameters train.
"""

from __future__ import annotations

import pytest
import torch
from tiny import SEQ2SEQ_ARCHS, perturb, tiny_base

import softprompts as sp
import softprompts.evaluate
import softprompts.model.decode
import softprompts.model.encoder_decoder_score
from softprompts.model.encoder_decoder import (
    EncoderDecoderError,
    decode,
    encode,
    encoder_attentions,
    forward,
)
from softprompts.model.encoder_decoder_base import run_with_caches
from softprompts.model.encoder_decoder_score import right_pad
from softprompts.model.inject import VirtualContext

pytestmark = pytest.mark.injection

METHODS = list(sp.METHODS)
ATOL = 2e-4
_BASES: dict = {}


@pytest.fixture(params=SEQ2SEQ_ARCHS)
def base(request):
    if request.param not in _BASES:
        _BASES[request.param] = tiny_base(request.param)
    return _BASES[request.param]


def ids(base, text):
    return torch.tensor([base.tokenize(text)])


def decoder_input(base, text):
    return torch.tensor([[base.decoder_start_id, *base.tokenize(text)]])


def make(base, method, **options):
    options.setdefault("num_virtual_tokens", 4)
    options.setdefault("init_text", "task")
    return sp.create_method(base, method, **options)


def parts_context(base, enc=None, dec=None, cross=None) -> VirtualContext:
    """A context whose three KV parts are given separately (``None``: that part empty, zero slots)."""
    heads, dims = base.shapes.kv_heads, base.shapes.head_dims
    layout = base.layout
    given = [enc, dec, cross]
    width = max((part[0][0].shape[2] for part in given if part), default=0)
    layers = []
    for part, count, offset in ((enc, layout.encoder_layers, 0), (dec, layout.decoder_layers, layout.encoder_layers),
                                (cross, layout.decoder_layers, layout.encoder_layers + layout.decoder_layers)):
        if part is None:
            part = [(torch.zeros(1, heads[offset + i], 0, dims[offset + i]),) * 2 for i in range(count)]
        layers += part
    return VirtualContext(kv=layers, kv_mask=torch.ones(1, width, dtype=torch.long))


def test_shapes_are_probed_in_layout_order(base):
    config = base.model.config
    decoder_layers = getattr(config, "num_decoder_layers", None) or config.decoder_layers
    assert base.layout.decoder_layers == decoder_layers
    assert base.shapes.num_layers == base.layout.encoder_layers + 2 * decoder_layers
    assert base.shapes.encoder_layers == base.layout.encoder_layers > 0
    assert "encoder_layers" in base.shapes.to_json()
    assert "encoder_layers" not in tiny_base("llama").shapes.to_json()  # decoder-only fingerprints unchanged


def test_bare_forward_equals_hf(base):
    x, y = ids(base, "the input"), decoder_input(base, "out")
    ours = forward(base, VirtualContext(), x, None, y, None).logits
    assert torch.equal(ours, base.model(input_ids=x, decoder_input_ids=y).logits)


def test_soft_prompt_of_token_embeddings_equals_tokens_in_front_of_encoder(base):
    text, x, y = ids(base, "lead:"), ids(base, "the input"), decoder_input(base, "out")
    prompt = sp.SoftPrompt(base.embed(text[0]))
    ours = forward(base, VirtualContext.broadcast(prompt, 1), x, None, y, None).logits
    reference = base.model(input_ids=torch.cat([text, x], 1), decoder_input_ids=y).logits
    torch.testing.assert_close(ours, reference, atol=ATOL, rtol=1e-4)


def test_decoder_prefix_from_a_real_prefill_equals_that_text_before_the_target(base):
    x, lead, target = ids(base, "the input"), decoder_input(base, "so far"), ids(base, "next")
    _, dec_self, _ = run_with_caches(base, x, lead)  # the decoder's self-attention K/V of [start, "so far"] under x
    ctx = parts_context(base, dec=[(layer.keys, layer.values) for layer in dec_self.layers])
    ours = forward(base, ctx, x, None, target, None).logits
    reference = base.model(input_ids=x, decoder_input_ids=torch.cat([lead, target], 1)).logits[:, lead.shape[1]:]
    torch.testing.assert_close(ours, reference, atol=ATOL, rtol=1e-4)


def test_cross_prefix_from_an_encoder_output_equals_that_output_in_front(base):
    other, x, y = ids(base, "memory"), ids(base, "the input"), decoder_input(base, "out")
    _, _, cross = run_with_caches(base, other, y[:, :1])  # cross-attention K/V of the encoder output of "memory"
    ctx = parts_context(base, cross=[(layer.keys, layer.values) for layer in cross.layers])
    ours = forward(base, ctx, x, None, y, None).logits
    encoder = base.model.get_encoder()
    memory = torch.cat([encoder(input_ids=other).last_hidden_state, encoder(input_ids=x).last_hidden_state], 1)
    reference = base.model(encoder_outputs=(memory,), decoder_input_ids=y).logits
    torch.testing.assert_close(ours, reference, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_adapter_changes_output(base, method):
    artifact = perturb(make(base, method), scale=2.0).materialize()
    x, y = ids(base, "the input"), decoder_input(base, "out")
    ours = forward(base, VirtualContext.broadcast(artifact, 1), x, None, y, None).logits
    assert (ours - base.model(input_ids=x, decoder_input_ids=y).logits).abs().max() > 1e-2


def test_encoder_prefix_alone_changes_the_encoder_output(base):
    """The bidirectional encoder has no exact reference: its prefix must at least reach every encoder layer."""
    kv = perturb(make(base, "deep"), scale=2.0).materialize()
    enc, _, _ = base.layout.split(list(zip(kv.keys, kv.values, strict=True)))
    x = ids(base, "the input")
    bare = base.model.get_encoder()(input_ids=x).last_hidden_state
    for layer in range(base.layout.encoder_layers):  # a prefix at one layer only: that layer's hook is live
        part = [(k[None] * (i == layer), v[None] * (i == layer)) for i, (k, v) in enumerate(enc)]
        with torch.no_grad():
            state = encode(base, parts_context(base, enc=part), x, None, base.layout)
        assert (state.hidden - bare).abs().max() > 1e-3, layer


@pytest.mark.parametrize("method", METHODS)
def test_cached_decoding_equals_uncached(base, method):
    artifact = perturb(make(base, method)).materialize()
    x = ids(base, "the input")
    tokens = sp.generate_ids(base, [x[0].tolist()], artifact, max_new_tokens=6, stop_ids=set())[0]
    assert len(tokens) == 6
    y = torch.tensor([[base.decoder_start_id, *tokens]])
    full = forward(base, VirtualContext.broadcast(artifact, 1), x, None, y, None).logits
    assert full[0, :-1].argmax(-1).tolist() == tokens  # greedy from the cache == the uncached forward's argmax


@pytest.mark.parametrize("method", METHODS)
def test_materialized_equals_training_module_and_save_load(base, method, tmp_path):
    module = perturb(make(base, method))
    x, y = ids(base, "the input"), decoder_input(base, "out")
    live = forward(base, VirtualContext.broadcast(module(), 1), x, None, y, None).logits
    adapter = sp.Adapter.from_method(module, base)
    sp.save_adapter(adapter, tmp_path / "a")
    loaded = sp.load_adapter(tmp_path / "a", base)
    for name, tensor in adapter.artifact.tensors().items():
        assert torch.equal(loaded.artifact.tensors()[name], tensor)
    saved = forward(base, VirtualContext.broadcast(loaded.artifact, 1), x, None, y, None).logits
    torch.testing.assert_close(saved, live, atol=ATOL, rtol=1e-4)
    with pytest.raises(sp.AdapterMismatchError):
        sp.load_adapter(tmp_path / "a", tiny_base("llama"))


@pytest.mark.parametrize("method", METHODS)
def test_only_adapter_trains_and_loss_drops(base, method):
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    module = make(base, method)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-1 if method != "prefix" else 1e-2)
    prompts, targets = [base.tokenize("the input")], [base.tokenize("ok")]
    losses = []
    for _ in range(30):
        loss = sp.model.encoder_decoder_score.loss_sum(base, module(), prompts, targets)
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in base.model.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0]  # tiny random T5s saturate: the bar is that gradients reach it
    for k, v in base.model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("method", METHODS)
def test_padding_and_mixed_rows_equal_single_rows(base, method):
    """Rows of different prompt and target lengths and different adapters of one method: each row == alone."""
    arts = [perturb(make(base, method), seed=s).materialize() for s in (1, 2, 3)]
    prompts = [base.tokenize(t) for t in ["a longer input text", "short", "mid size"]]
    targets = [base.tokenize(t) for t in ["x", "longer out", "mid"]]
    enc, enc_mask = right_pad(prompts, base.pad_id, base.device)
    dec, dec_mask = right_pad([[base.decoder_start_id, *t] for t in targets], base.pad_id, base.device)
    left, left_mask = sp.model.decode.left_pad(prompts, base.pad_id, base.device)  # packed back to the left
    for enc_ids, mask in ((enc, enc_mask), (left, left_mask)):
        batched = forward(base, VirtualContext.from_rows(arts), enc_ids, mask, dec, dec_mask).logits
        for i, (art, p, t) in enumerate(zip(arts, prompts, targets, strict=True)):
            alone = forward(base, VirtualContext.broadcast(art, 1), torch.tensor([p]), None,
                            torch.tensor([[base.decoder_start_id, *t]]), None).logits[0]
            torch.testing.assert_close(batched[i, : len(t) + 1], alone, atol=ATOL, rtol=1e-4)


def test_generate_and_scores_with_mixed_rows_equal_alone(base):
    """Different kinds and lengths in one call (grouped into exact batches) == each alone."""
    arts = [perturb(make(base, "prefix", num_virtual_tokens=3)).materialize(), None,
            perturb(make(base, "prompt", num_virtual_tokens=5)).materialize(),
            perturb(make(base, "deep", num_virtual_tokens=2)).materialize()]
    prompts = [base.tokenize(t) for t in ["abc", "hello there", "x", "fourth row"]]
    together = sp.generate_ids(base, prompts, arts, max_new_tokens=5, stop_ids=set())
    targets = [base.tokenize(t) for t in ["yes", "no", "maybe", "ok"]]
    scores = sp.evaluate.target_logprobs(base, arts, prompts, targets)
    for art, p, t, out, score in zip(arts, prompts, targets, together, scores, strict=True):
        assert sp.generate_ids(base, [p], art, max_new_tokens=5, stop_ids=set())[0] == out
        assert sp.evaluate.target_logprobs(base, art, [p], [t])[0][0] == pytest.approx(score[0], abs=1e-4)


def test_sampling_is_seeded_per_row(base):
    art = perturb(make(base, "prompt")).materialize()
    sampling = sp.Sampling(temperature=1.0, seed=7)
    prompts = [base.tokenize("abc"), base.tokenize("longer prompt")]
    together = sp.generate_ids(base, prompts, art, max_new_tokens=6, sampling=sampling, stop_ids=set())
    assert together[1] == sp.generate_ids(base, prompts[1:], art, max_new_tokens=6, sampling=sampling,
                                          stop_ids=set())[0]


def test_a_model_whose_encoder_attention_we_cannot_reach_is_refused():
    base = tiny_base("t5")
    attention = encoder_attentions(base.model)[0]
    attention.layer_idx = None
    try:
        with pytest.raises(EncoderDecoderError, match="T5ForConditionalGeneration"):
            encoder_attentions(base.model)
    finally:
        attention.layer_idx = 0


def test_a_soft_prompt_has_no_fixed_kv_on_an_encoder_decoder(base):
    with pytest.raises(EncoderDecoderError, match="bidirectional encoder"):
        base.soft_prompt_to_kv(sp.SoftPrompt(base.embed(torch.tensor([1, 2]))))


def test_decode_keeps_the_cross_attention_prefix_across_steps(base):
    """The cache keeps [prefix; encoder output] for cross-attention after the first decoder call (is_updated)."""
    artifact = perturb(make(base, "prefix")).materialize()
    ctx = VirtualContext.broadcast(artifact, 1)
    x = ids(base, "the input")
    state = decode(base, ctx, encode(base, ctx, x, None, base.layout), decoder_input(base, ""), None, base.layout,
                   use_cache=True)
    cross = state.cache.cross_attention_cache.layers[0].keys
    assert cross.shape[2] == artifact.length + x.shape[1]
    torch.testing.assert_close(cross[0, :, : artifact.length], artifact.keys[base.layout.encoder_layers
                                                                              + base.layout.decoder_layers])


def test_text_api_and_the_decoder_only_path(base):
    art = perturb(make(base, "prefix")).materialize()
    logits = sp.next_token_logits(base, "the input", art)
    x, start = ids(base, "the input"), decoder_input(base, "")
    assert torch.equal(logits, forward(base, VirtualContext.broadcast(art, 1), x, None, start, None).logits[0, -1])
    assert isinstance(sp.generate(base, "the input", art, max_new_tokens=3), str)
    with pytest.raises(sp.SoftpromptsError, match="encoder-decoder"):
        sp.forward(base, art, x)  # the decoder-only injection refuses instead of failing inside the model
