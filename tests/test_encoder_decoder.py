"""Encoder-decoder conformance (tiny random T5, T5 v1.1-style and BART built from configs), what only this family
has: equivalences where one exists, behaviour checks where the bidirectional encoder makes an exact check impossible.
The equivalences both families share (a soft prompt of real token embeddings == those tokens in front of the input,
cached decoding == uncached, materialized == training module, save/load, adapters change the output, only the
adapter trains, mixed rows of a generate / score call == alone) run on these models in test_conformance.py.

Exact: a decoder self-attention prefix from a real decoder prefill == that text in front of the target; a
cross-attention prefix from an encoder output == that output in front of the encoder's; padded and mixed batches
(prompts and targets) == single rows. Encoder prefix (no exact reference): it reaches every encoder layer.
"""

from __future__ import annotations

import pytest
import torch
from tiny import SEQ2SEQ_ARCHS, cached_base, perturbed, tiny_base

import softprompts as sp
import softprompts.model.decode_loop
from softprompts.model.decoder.inject import VirtualContext
from softprompts.model.encoder_decoder.base import run_with_caches
from softprompts.model.encoder_decoder.forward import (
    EncoderDecoderError,
    decode,
    encode,
    encoder_attentions,
    forward,
)
from softprompts.model.padding import pad_rows

pytestmark = pytest.mark.injection

METHODS = list(sp.METHODS)
ATOL = 2e-4


@pytest.fixture(params=SEQ2SEQ_ARCHS)
def base(request):
    return cached_base(request.param)


def ids(base, text):
    return torch.tensor([base.tokenize(text)])


def decoder_input(base, text):
    return torch.tensor([[base.decoder_start_id, *base.tokenize(text)]])


def made(base, method, scale=0.5, seed=1):
    """A perturbed ``method`` of 4 virtual tokens started from "task", materialized."""
    return perturbed(base, method, 4, "task", scale, seed).materialize()


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


def test_encoder_prefix_alone_changes_the_encoder_output(base):
    """The bidirectional encoder has no exact reference: its prefix must at least reach every encoder layer."""
    kv = made(base, "deep", scale=2.0)
    enc, _, _ = base.layout.split(list(zip(kv.keys, kv.values, strict=True)))
    x = ids(base, "the input")
    bare = base.model.get_encoder()(input_ids=x).last_hidden_state
    for layer in range(base.layout.encoder_layers):  # a prefix at one layer only: that layer's hook is live
        part = [(k[None] * (i == layer), v[None] * (i == layer)) for i, (k, v) in enumerate(enc)]
        with torch.no_grad():
            state = encode(base, parts_context(base, enc=part), x, None, base.layout)
        assert (state.hidden - bare).abs().max() > 1e-3, layer


@pytest.mark.parametrize("method", METHODS)
def test_padding_and_mixed_rows_equal_single_rows(base, method):
    """Rows of different prompt and target lengths and different adapters of one method: each row == alone."""
    arts = [made(base, method, seed=s) for s in (1, 2, 3)]
    prompts = [base.tokenize(t) for t in ["a longer input text", "short", "mid size"]]
    targets = [base.tokenize(t) for t in ["x", "longer out", "mid"]]
    enc, enc_mask = pad_rows(prompts, base.pad_id, base.device, side="right")
    dec, dec_mask = pad_rows([[base.decoder_start_id, *t] for t in targets], base.pad_id, base.device, side="right")
    left, left_mask = pad_rows(prompts, base.pad_id, base.device)  # packed back to the left
    for enc_ids, mask in ((enc, enc_mask), (left, left_mask)):
        batched = forward(base, VirtualContext.from_rows(arts), enc_ids, mask, dec, dec_mask).logits
        for i, (art, p, t) in enumerate(zip(arts, prompts, targets, strict=True)):
            alone = forward(base, VirtualContext.broadcast(art, 1), torch.tensor([p]), None,
                            torch.tensor([[base.decoder_start_id, *t]]), None).logits[0]
            torch.testing.assert_close(batched[i, : len(t) + 1], alone, atol=ATOL, rtol=1e-4)


def test_sampling_is_seeded_per_row(base):
    art = made(base, "prompt")
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
    """Served as it is (every encoder state depends on the whole input); a prefix method cannot start from it."""
    prompt = sp.SoftPrompt(base.embed(torch.tensor([1, 2])))
    served = base.serving_artifact(prompt)
    assert isinstance(served, sp.SoftPrompt) and torch.equal(served.embeds, prompt.embeds)
    with pytest.raises(sp.SoftpromptsError, match="no KV of its own"):
        sp.create_method(base, "prefix", num_virtual_tokens=2, init_artifact=prompt)


def test_decode_keeps_the_cross_attention_prefix_across_steps(base):
    """The cache keeps [prefix; encoder output] for cross-attention after the first decoder call (is_updated)."""
    artifact = made(base, "prefix")
    ctx = VirtualContext.broadcast(artifact, 1)
    x = ids(base, "the input")
    state = decode(base, ctx, encode(base, ctx, x, None, base.layout), decoder_input(base, ""), None, base.layout,
                   use_cache=True)
    cross = state.cache.cross_attention_cache.layers[0].keys
    assert cross.shape[2] == artifact.length + x.shape[1]
    torch.testing.assert_close(cross[0, :, : artifact.length], artifact.keys[base.layout.encoder_layers
                                                                              + base.layout.decoder_layers])


def test_text_api_and_the_decoder_only_path(base):
    art = made(base, "prefix")
    logits = sp.next_token_logits(base, "the input", art)
    x, start = ids(base, "the input"), decoder_input(base, "")
    assert torch.equal(logits, forward(base, VirtualContext.broadcast(art, 1), x, None, start, None).logits[0, -1])
    assert isinstance(sp.generate(base, "the input", art, max_new_tokens=3), str)
    with pytest.raises(sp.SoftpromptsError, match="encoder-decoder"):
        sp.forward(base, art, x)  # the decoder-only injection refuses instead of failing inside the model
