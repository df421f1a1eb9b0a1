"""The in-place decoding cache (``model/decoder/kv_cache.py``): the same states as concatenation, and a decode through
it that equals one forward over the whole sequence (every step's logits) and HF ``generate``'s greedy tokens, across
reallocations, rows leaving and padding trimmed."""

from __future__ import annotations

import pytest
import torch
from test_engine import artifacts
from tiny import tiny_base

from softprompts.model.decoder.decode import DecodeBatch
from softprompts.model.decoder.inject import forward
from softprompts.model.decoder.kv_cache import MIN_ROOM, GrowingLayer, grow_in_place, merged_layer
from softprompts.model.generation import GenerationRequest
from softprompts.model.probe import new_cache

pytestmark = pytest.mark.injection  # it subclasses HF's cache layer: also run on the second transformers version
ATOL = 1e-4


def test_growing_layer_holds_what_concatenation_holds():
    layer = GrowingLayer()
    gen = torch.Generator().manual_seed(0)
    chunks = [torch.randn(3, 2, n, 4, generator=gen) for n in (5, 1, 70, 1, 1, 200)]
    reference = None
    capacities = []
    for chunk in chunks:
        keys, values = layer.update(chunk, -chunk)
        reference = chunk if reference is None else torch.cat([reference, chunk], dim=-2)
        assert torch.equal(keys, reference) and torch.equal(values, -reference)
        capacities.append(layer.capacity)
    assert layer.get_seq_length() == reference.shape[-2] and len(set(capacities)) > 2  # it reallocated
    assert layer.capacity <= reference.shape[-2] * 1.25 + MIN_ROOM + 1
    layer.batch_select_indices(torch.tensor([2, 0]))
    assert torch.equal(layer.keys, reference[[2, 0]]) and layer.capacity == capacities[-1]
    layer.drop_front(10)
    assert torch.equal(layer.keys, reference[[2, 0], :, 10:])
    more = torch.randn(2, 2, 3, 4, generator=gen)
    keys, _ = layer.update(more, more)
    assert torch.equal(keys, torch.cat([reference[[2, 0], :, 10:], more], dim=-2))


def test_merged_layer_equals_left_padded_concatenation():
    gen = torch.Generator().manual_seed(1)
    parts = []
    for batch, length in [(2, 5), (1, 9), (3, 1)]:
        layer = GrowingLayer()
        layer.update(torch.randn(batch, 2, length, 4, generator=gen), torch.randn(batch, 2, length, 4, generator=gen))
        parts.append(layer)
    merged = merged_layer(parts)

    def padded(t):
        return torch.cat([t.new_zeros(t.shape[0], t.shape[1], 9 - t.shape[2], t.shape[3]), t], dim=2)

    assert torch.equal(merged.keys, torch.cat([padded(p.keys) for p in parts]))
    assert torch.equal(merged.values, torch.cat([padded(p.values) for p in parts]))
    assert merged.capacity == 9 + MIN_ROOM and merged.get_seq_length() == 9


def test_grow_in_place_converts_full_attention_layers_only():
    base = tiny_base("gemma3")  # sliding-window and full-attention layers
    cache = new_cache(base.model)
    out = base.model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True, **{base.cache_keyword: cache})
    cache = getattr(out, base.cache_keyword)
    before = [layer.keys.clone() for layer in cache.layers]
    grow_in_place(cache)
    kinds = [type(layer).__name__ for layer in cache.layers]
    assert kinds.count("GrowingLayer") == 1 and len(kinds) == 2
    for layer, keys in zip(cache.layers, before, strict=True):
        assert torch.equal(layer.keys, keys)


@pytest.mark.parametrize("with_artifact", [False, True], ids=["bare", "adapter"])
def test_decode_equals_one_forward_over_the_sequence(base, with_artifact):
    """150 greedy tokens (several reallocations past the first headroom): step t's logits == the logits a single
    forward over prompt + the first t tokens gives at its last position."""
    art = artifacts(base)[2] if with_artifact else None  # a KV prefix
    prompt = base.tokenize("growing caches")
    req = GenerationRequest(prompt, art, 150 - (art.length if art else 0), stop_ids=frozenset(), collect_logits=True)
    result = DecodeBatch(base, frozenset())
    out = result.add([req])[0]
    while len(result):
        result.step()
    full = torch.tensor([prompt + out.tokens[:-1]])
    logits = forward(base, art, full).logits[0, len(prompt) - 1 :]  # [new tokens, V]
    assert len(out.logits) == logits.shape[0] == req.max_new_tokens
    for step, got in enumerate(out.logits):
        torch.testing.assert_close(got, logits[step], atol=ATOL, rtol=1e-4)


def test_greedy_tokens_equal_hf_generate(base):
    prompts = [base.tokenize(t) for t in ("same len a", "same len b", "same len c")]
    batch = DecodeBatch(base, frozenset())
    results = batch.add([GenerationRequest(p, None, 24, stop_ids=frozenset()) for p in prompts])
    while len(batch):
        batch.step()
    ids = torch.tensor(prompts)
    with torch.no_grad():
        hf = base.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                                 min_new_tokens=24, do_sample=False, pad_token_id=base.pad_id)
    assert [r.tokens for r in results] == hf[:, ids.shape[1] :].tolist()
