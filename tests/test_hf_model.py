"""``sp.wrap`` in the Hugging Face workflow: logits aligned with the input (no virtual positions), HF's loss
convention, ``generate`` like HF's, and ``transformers.Trainer`` (gradient accumulation, gradient checkpointing)
training the same adapter as our own loop on the same batches."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_base
from torch.utils.data import SequentialSampler

import softprompts as sp
from softprompts.data.datasets import build_examples
from softprompts.model.decode_loop import generate_ids
from softprompts.model.decoder.inject import forward
from softprompts.tasks import encode, epoch_batches

transformers = pytest.importorskip("transformers")
TOLERANCE = 1e-5  # fp32: the same sums in another order
# transformers 5.24 renamed TrainingArguments.gradient_checkpointing to activation_checkpointing
CHECKPOINTING = ("activation_checkpointing" if "activation_checkpointing" in
                 transformers.TrainingArguments.__dataclass_fields__ else "gradient_checkpointing")


def rows(n: int = 16) -> list[dict]:
    return [{"text": f"review {i} " + "good " * (i % 4), "label": ["negative", "positive"][i % 2]} for i in range(n)]


SPEC = sp.TaskSpec("classify", "Review: {text}\nSentiment:", " {label}", ["negative", "positive"])


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_logits_loss_and_generate_follow_hf_conventions(method):
    base = tiny_base("llama")
    model = sp.wrap(base, method, num_virtual_tokens=3, init_text="abc")
    assert [n for n, p in model.named_parameters() if p.requires_grad] == \
        [f"method.{n}" for n, p in model.method.named_parameters()]
    ids = torch.tensor([base.tokenize("hello there"), base.tokenize("hi you all!")[:11]])
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[0, :4] = -100
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    want = forward(base, model.method(), ids, mask).logits
    assert out.logits.shape == (*ids.shape, base.shapes.vocab_size)  # aligned with input_ids
    torch.testing.assert_close(out.logits, want)
    ce = torch.nn.functional.cross_entropy(want[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, ce)
    out.loss.backward()
    assert all(p.grad is not None for p in model.method.parameters())
    assert all(p.grad is None for p in base.model.parameters())

    left = torch.tensor([[base.pad_id, *base.tokenize("abcd")], base.tokenize("wxyz!")])
    left_mask = (torch.arange(5) >= torch.tensor([[1], [0]])).long()
    got = model.generate(left, attention_mask=left_mask, max_new_tokens=6, eos_token_id=[])
    rows_ = [base.tokenize("abcd"), base.tokenize("wxyz!")]
    new = generate_ids(base, rows_, model.method.materialize(), max_new_tokens=6, stop_ids=set())
    assert got[:, :5].tolist() == left.tolist() and got[:, 5:].tolist() == new
    with pytest.raises(TypeError, match="does not take num_beams"):
        model.generate(left, num_beams=2)


def test_state_dict_is_the_adapter_and_round_trips(tmp_path):
    base = tiny_base("qwen2")
    model = sp.wrap(base, "ptuning", num_virtual_tokens=2, init_text="ab")
    state = model.state_dict()
    assert state and all(k.startswith("method.") for k in state)
    other = sp.wrap(base, "ptuning", num_virtual_tokens=2, init_text="zz")
    other.load_state_dict(state)
    torch.testing.assert_close(other.method.materialize().embeds, model.method.materialize().embeds)
    saved = model.save_adapter(tmp_path / "a", task={"task": "generate"})
    back = sp.wrap(base, adapter=saved)
    torch.testing.assert_close(back.method.materialize().embeds, model.method.materialize().embeds)
    assert sp.load_adapter(saved, base).method == "ptuning"


class InOrder(transformers.Trainer):
    """Trainer reading the dataset in order (its default sampler shuffles): the batches our loop takes."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def pad_collator(pad_id: int):
    def collate(items: list[dict]) -> dict:
        width = max(len(x["input_ids"]) for x in items)
        ids = torch.full((len(items), width), pad_id)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        labels = torch.full((len(items), width), -100)
        for i, x in enumerate(items):  # right padding: the wrapper takes any, positions come from the mask
            n = len(x["input_ids"])
            ids[i, :n], mask[i, :n], labels[i, :n] = torch.tensor(x["input_ids"]), 1, torch.tensor(x["labels"])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


@pytest.mark.parametrize("method, checkpointing, arch", [("prompt", False, "llama"), ("deep", True, "llama"),
                                                         ("ptuning", True, "llama"), ("deep", True, "llama-nf4")])
def test_trainer_trains_the_adapter_our_loop_trains(tmp_path, method, checkpointing, arch):
    """``arch`` ``llama-nf4``: the wrapper on a quantized base (``load_base(..., quantize="nf4")``)."""
    base = tiny_base(arch)
    examples, _ = build_examples(rows(), SPEC.template, "classify", SPEC.labels)
    steps, batch, accum = 4, 4, 2
    config = sp.TrainConfig(steps=steps, batch_size=batch, grad_accum=accum, lr=0.05, warmup_ratio=0.0,
                            schedule="constant", max_grad_norm=0.0, eval_every=0, seed=0, progress=False)
    ours = sp.create_method(base, method, num_virtual_tokens=3, init_text="abc")
    result = sp.train(base, ours, examples, SPEC, config)

    encoded, _ = encode(base, examples, SPEC)
    lengths = [e.length for e in encoded]
    per_epoch = len(epoch_batches(len(encoded), lengths, batch, 0, 0))
    order = []
    for step in range(steps):  # the loop's global batch of each step, cut into its micro-batches
        epoch, index = divmod(step, per_epoch)
        global_batch = epoch_batches(len(encoded), lengths, batch, 0, epoch)[index]
        for k in range(accum):
            order += global_batch[k::accum]
    data = [{"input_ids": encoded[i].prompt_ids + encoded[i].target_ids,
             "labels": [-100] * len(encoded[i].prompt_ids) + encoded[i].target_ids} for i in order]
    model = sp.wrap(base, method, num_virtual_tokens=3, init_text="abc")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=steps, per_device_train_batch_size=batch // accum,
        gradient_accumulation_steps=accum, learning_rate=0.05, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=0.0, optim="adamw_torch", save_strategy="no", report_to=[],
        use_cpu=True, seed=0, logging_steps=1, remove_unused_columns=False, disable_tqdm=True,
        **{CHECKPOINTING: checkpointing})
    InOrder(model=model, args=args, train_dataset=data, data_collator=pad_collator(base.pad_id)).train()
    assert model.is_gradient_checkpointing == checkpointing
    got, want = model.method.materialize(), result.adapter.artifact
    start = sp.create_method(base, method, num_virtual_tokens=3, init_text="abc").materialize()
    for a, b, s in zip(_tensors(got), _tensors(want), _tensors(start), strict=True):
        assert (b - s).abs().max() > 1e-3  # it trained
        torch.testing.assert_close(a, b, atol=TOLERANCE, rtol=TOLERANCE)


def _tensors(artifact) -> list[torch.Tensor]:
    return [artifact.embeds] if hasattr(artifact, "embeds") else [*artifact.keys, *artifact.values]


def test_prefix_gradients_equal_our_step():
    """Prefix tuning's zero-initialized MLP: AdamW's first step moves elements whose gradients are ~1e-8 by
    +-lr whatever their size, so fp32 rounding between two correct paths (our fused head, the wrapper's full logits)
    grows to ~1e-2 in a few steps: compared here on the gradient of one accumulated step instead (same N)."""
    from softprompts.tasks import collate
    from softprompts.training.step import accumulate_step

    base = tiny_base("llama")
    examples, _ = build_examples(rows(8), SPEC.template, "classify", SPEC.labels)
    encoded, _ = encode(base, examples, SPEC)
    micro = [encoded[0:2], encoded[2:4]]
    count = sum(len(e.target_ids) for m in micro for e in m)
    ours = sp.create_method(base, "prefix", num_virtual_tokens=3, init_text="abc")
    loss_sum = accumulate_step(base, ours, ours.artifact_kind, [collate(m, base.pad_id) for m in micro], count)
    model = sp.wrap(base, "prefix", num_virtual_tokens=3, init_text="abc")
    collate_hf = pad_collator(base.pad_id)
    total = 0.0
    for m in micro:
        batch = collate_hf([{"input_ids": e.prompt_ids + e.target_ids,
                             "labels": [-100] * len(e.prompt_ids) + e.target_ids} for e in m])
        loss = model(**batch, num_items_in_batch=count).loss
        loss.backward()
        total += loss.item()
    assert total == pytest.approx(loss_sum / count, rel=1e-6)
    for a, b in zip(ours.parameters(), model.method.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-5)


def test_trl_sft_trainer_on_chat_rows(tmp_path):
    """TRL's SFTTrainer installs its fused LM head on the model and projects ``base_model``'s hidden states itself:
    its loss on a batch equals the wrapper's own (full logits), and training moves the soft prompt."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    base = tiny_base("llama")
    model = sp.wrap(base, "prompt", num_virtual_tokens=3, init_text="abc")
    chat = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
            for w in ["yes", "no", "maybe", "ok"] * 4]
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=3, per_device_train_batch_size=4,
                         learning_rate=0.05, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    before = model.method.materialize().embeds.clone()
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(chat),
                             processing_class=base.tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    fused = model(**batch, fused_lm_head=True)
    plain = model(**batch)
    torch.testing.assert_close(fused.loss, plain.loss, atol=1e-5, rtol=1e-5)
    assert fused.log_probs.shape == (batch["input_ids"].shape[0], batch["input_ids"].shape[1] - 1)
    trainer.train()
    assert (model.method.materialize().embeds - before).abs().max() > 1e-3
    assert "trl" in " ".join(getattr(model, "model_tags", []))
