"""Chat rows and virtual-token placement on every tiny architecture, by equivalence.

The reference is always the plain model reading token ids: a soft prompt made of the embeddings of real tokens,
placed at a point of the text, must give the logits of those tokens written at that point.
"""

from __future__ import annotations

import pytest
import torch
from tiny import decode_alone

import softprompts as sp
from softprompts.data.chat import PLACEMENTS, ChatFormat
from softprompts.data.datasets import build_examples
from softprompts.data.templates import VIRTUAL, Template
from softprompts.errors import DataError
from softprompts.model.placement import PlacementError, place, place_rows
from softprompts.tasks import TaskSpec, collate, encode
from softprompts.training.step import label_loss_sum, plain_label_loss_sum

pytestmark = pytest.mark.injection
ATOL = 2e-4
SOFT = "XYZ!"  # the soft prompt of the equivalence tests: the embeddings of these tokens
CHAT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "Hi"}]


def tokens_soft(base):
    ids = base.tokenize(SOFT)
    return ids, sp.SoftPrompt(base.embed(torch.tensor(ids)).detach())


def reference_logits(base, lead: list[int], soft_ids: list[int], rest: list[int]) -> torch.Tensor:
    """The plain model on lead + soft tokens + rest: logits of the ``rest`` positions."""
    ids = torch.tensor([lead + soft_ids + rest])
    return base.model(input_ids=ids).logits[0, -len(rest):]


def test_a_marker_places_the_soft_prompt_at_that_point(base):
    soft_ids, soft = tokens_soft(base)
    template = Template(f"Instruction: be kind.\n{VIRTUAL}Review: {{text}}\nSentiment:", " {label}")
    prompt, _ = template.render({"text": "fine", "label": "pos"})
    lead, marker, rest = prompt.partition(VIRTUAL)
    lead_ids, rest_ids = base.tokenize(lead), base.tokenize(rest)
    ours = sp.forward(base, place(base, soft, lead_ids), torch.tensor([rest_ids])).logits[0]
    torch.testing.assert_close(ours, reference_logits(base, lead_ids, soft_ids, rest_ids), atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_a_chat_placement_equals_those_tokens_in_the_rendered_chat(base, placement):
    soft_ids, soft = tokens_soft(base)
    chat = ChatFormat(base.tokenizer, placement, task="classify")
    prompt, target = chat.render({"messages": CHAT})
    assert prompt.replace(VIRTUAL, "") == base.tokenizer.apply_chat_template(CHAT[:-1], add_generation_prompt=True,
                                                                             tokenize=False)
    assert target == "Hi" and (VIRTUAL in prompt) == (placement != "start")
    lead, _, rest = prompt.rpartition(VIRTUAL)
    lead_ids, rest_ids = base.tokenize(lead), base.tokenize(rest)
    if placement == "user-start":
        assert lead.endswith("<|user|>\n") and rest.startswith("Hello there")
    if placement == "after-system":
        assert lead.endswith("Answer briefly.<eos>\n") and rest.startswith("<|user|>")
    ours = sp.forward(base, place(base, soft, lead_ids), torch.tensor([rest_ids])).logits[0]
    torch.testing.assert_close(ours, reference_logits(base, lead_ids, soft_ids, rest_ids), atol=ATOL, rtol=1e-4)


def test_the_training_loss_through_a_placement_is_the_text_loss(base):
    """Rows with different leads in one batch: the loss (fused and HF head) == the plain model's target loss on
    lead + soft tokens + prompt + target, summed over the target tokens only."""
    soft_ids, soft = tokens_soft(base)
    chat = ChatFormat(base.tokenizer, "user-start", task="generate")
    rows = [{"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]}
            for u, a in (("first question", "yes"), ("2nd", "no way"))]
    spec = TaskSpec.for_chat("generate", None, "user-start")
    encoded, _ = encode(base, build_examples(rows, chat, "generate")[0], spec)
    assert encoded[0].lead_ids != () and encoded[0].target_ids == base.tokenize("yes<eos>")
    batch = collate(encoded, base.pad_id)
    assert batch.leads == [e.lead_ids for e in encoded]
    reference = 0.0
    for e in encoded:
        ids = list(e.lead_ids) + soft_ids + e.prompt_ids + e.target_ids
        logits = base.model(input_ids=torch.tensor([ids])).logits[0, -len(e.target_ids) - 1 : -1]
        reference += torch.nn.functional.cross_entropy(logits, torch.tensor(e.target_ids), reduction="sum").item()
    for loss_fn in (label_loss_sum, plain_label_loss_sum):
        assert loss_fn(base, soft, batch).item() == pytest.approx(reference, rel=1e-4)


def test_a_placed_prompt_trains_only_its_own_parameters(base):
    method = sp.create_method(base, "prompt", num_virtual_tokens=3, init="random")
    chat = ChatFormat(base.tokenizer, "after-system", system="Be brief.", task="classify")
    rows = [{"messages": [{"role": "user", "content": t}, {"role": "assistant", "content": lab}]}
            for t, lab in (("good", "pos"), ("bad", "neg"))]
    encoded, _ = encode(base, build_examples(rows, chat, "classify")[0], TaskSpec.for_chat("classify", ["neg", "pos"]))
    loss = label_loss_sum(base, method(), collate(encoded, base.pad_id))
    loss.backward()
    assert method.embeds.grad is not None and method.embeds.grad.abs().sum() > 0
    assert all(p.grad is None for p in base.model.parameters())


def test_shared_leads_make_one_artifact_and_kv_prefixes_refuse_a_placement(base):
    soft = sp.create_method(base, "prompt", num_virtual_tokens=2).materialize()
    one = place_rows(base, soft, [(5, 6), (5, 6)])
    assert isinstance(one, sp.SoftPrompt) and one.length == 4
    assert isinstance(place_rows(base, soft, [(5, 6), (7,)]), sp.VirtualContext)
    assert place_rows(base, soft, [(), ()]) is soft and place_rows(base, soft, None) is soft
    prefix = sp.create_method(base, "prefix", num_virtual_tokens=2).materialize()
    with pytest.raises(PlacementError, match="in front of everything"):
        place(base, prefix, (5,))
    assert place(base, prefix, ()) is prefix


def test_the_served_kv_of_lead_and_soft_prompt_equals_recomputing_it(base):
    """The KV of [fixed text + soft prompt], computed once, gives what every request computing it gives."""
    from softprompts.serve import Engine, GenerationRequest

    engine = Engine(base)
    soft = sp.create_method(base, "prompt", num_virtual_tokens=3, init_text="abc").materialize()
    lead = tuple(base.tokenize("<|system|>\nBe brief.<eos>\n"))
    cached = engine.prepare(place(base, soft, lead))
    assert isinstance(cached, sp.KVPrefix) and cached.length == len(lead) + 3
    rows = [base.tokenize(t) for t in ("<|user|>\nhi<eos>\n<|assistant|>\n", "<|user|>\nwho?<eos>\n")]
    with_cache, recomputed = (decode_alone(engine, [GenerationRequest(r, art, 5, stop_ids=frozenset(),
                                                                      collect_logits=True) for r in rows])
                              for art in (cached, place(base, soft, lead)))
    for a, b in zip(with_cache, recomputed, strict=True):
        assert a.tokens == b.tokens
        for x, y in zip(a.logits, b.logits, strict=True):
            torch.testing.assert_close(x, y, atol=ATOL, rtol=1e-4)


def test_mixed_batch_of_placements_and_plain_rows_equals_each_alone(base):
    from softprompts.serve import Engine, GenerationRequest

    engine = Engine(base)
    soft = sp.create_method(base, "prompt", num_virtual_tokens=3, init_text="abc").materialize()
    prefix = engine.prepare(sp.create_method(base, "deep", num_virtual_tokens=2, init_text="xy").materialize())
    requests = [
        GenerationRequest(base.tokenize("plain completion"), engine.prepare(soft), 4, stop_ids=frozenset()),
        GenerationRequest(base.tokenize("Hello"), engine.prepare(place(base, soft, tuple(base.tokenize("<|user|>\n")))),
                          4, stop_ids=frozenset()),
        GenerationRequest(base.tokenize("<|user|>\nq<eos>\n"), prefix, 4, stop_ids=frozenset()),
        GenerationRequest(base.tokenize("base row"), None, 4, stop_ids=frozenset()),
    ]
    together = decode_alone(engine, requests)
    assert [decode_alone(engine, [r])[0].tokens for r in requests] == [t.tokens for t in together]


@pytest.mark.parametrize("row, needle", [
    ({"messages": [{"role": "user", "content": "q"}]}, "last message of"),
    ({"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]}, "role 'robot'"),
    ({"messages": [{"role": "user", "content": ["q"]}, {"role": "assistant", "content": "a"}]}, "must be a string"),
    ({"messages": "hello"}, "no 'messages' list"),
    ({"messages": [{"role": "user", "content": f"a{VIRTUAL}b"}, {"role": "assistant", "content": "a"}]},
     "placement marker"),
])
def test_bad_chat_rows_name_the_problem(base, row, needle):
    chat = ChatFormat(base.tokenizer, task="generate")
    with pytest.raises(DataError, match=needle):
        build_examples([{"messages": CHAT}, row], chat, "generate", source="chat.jsonl")


def test_a_model_without_chat_template_and_a_misplaced_marker_are_errors(base):
    from tiny import make_tokenizer

    plain = make_tokenizer()
    plain.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        ChatFormat(plain)
    with pytest.raises(DataError, match="after-system' needs a system message"):
        ChatFormat(base.tokenizer, "after-system").render({"messages": CHAT[1:]})
    with pytest.raises(DataError, match="at most once"):
        Template(f"{VIRTUAL}a{VIRTUAL}{{text}}", " {label}")
    with pytest.raises(DataError, match="placement marker"):
        Template(f"{VIRTUAL}{{text}}", " {label}").render({"text": f"x{VIRTUAL}", "label": "a"})
