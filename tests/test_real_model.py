"""The real commands on the embedded SmolLM2 with the bundled sentiment data (short: 20 steps, 64 examples)."""

from __future__ import annotations

import json

import pytest

from softprompts.cli import main
from softprompts.data.datasets import bundled_path

pytestmark = pytest.mark.slow


def head(split: str, n: int, path) -> str:
    lines = bundled_path("uci_sentiment", split).read_text().splitlines()[:n]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_train_eval_generate_on_smollm2(tmp_path, capsys):
    train = head("train", 64, tmp_path / "train.jsonl")
    test = head("test", 64, tmp_path / "test.jsonl")
    out = tmp_path / "adapter"
    rc = main(["train", "--method", "prompt", "--data", train, "--eval-data", test, "--template",
               "Review: {text}\\nSentiment:", "--target", " {label}", "--labels", "negative,positive",
               "--steps", "20", "--eval-every", "10", "--out", str(out), "--no-progress"])
    assert rc == 0
    record = json.loads((out / "training.json").read_text())
    bare = record["base_model_dev"]["accuracy"]
    assert bare > 0.7  # SmolLM2-Instruct already knows sentiment (0.90 on the full test split)

    capsys.readouterr()
    assert main(["eval", "--adapter", str(out), "--data", test, "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["n"] == 64
    assert metrics["accuracy"] >= bare - 0.05 and metrics["accuracy"] > 0.75
    assert metrics["accuracy"] == pytest.approx(record["best_dev"])  # the kept adapter is the best one on dev

    assert main(["generate", "--adapter", str(out), "--max-new-tokens", "3", "A wonderful, moving film."]) == 0
    text = capsys.readouterr().out.strip()
    assert text and "positive" in text.lower()


def test_trainer_on_smollm2_with_sp_wrap(tmp_path):
    """``transformers.Trainer`` trains a soft prompt on SmolLM2 through ``sp.wrap``: the loss on the training rows
    falls, the saved adapter loads in our format and classifies at least as well as before training."""
    import torch
    import transformers

    import softprompts as sp
    from softprompts.data.datasets import build_examples, load_records
    from softprompts.evaluate import evaluate

    base = sp.load_base("smollm2-135m")
    spec = sp.TaskSpec("classify", "Review: {text}\nSentiment:", " {label}", ["negative", "positive"])
    model = sp.wrap(base, "prompt", num_virtual_tokens=8, init_text="Classify the sentiment of the review.")
    rows = load_records(bundled_path("uci_sentiment", "train"))[:64]
    data = []
    for row in rows:
        prompt, target = base.tokenize(f"Review: {row['text']}\nSentiment:"), base.tokenize(f" {row['label']}")
        data.append({"input_ids": prompt + target, "labels": [-100] * len(prompt) + target})

    def collate(items):
        width = max(len(x["input_ids"]) for x in items)
        out = {"input_ids": torch.full((len(items), width), base.pad_id),
               "attention_mask": torch.zeros((len(items), width), dtype=torch.long),
               "labels": torch.full((len(items), width), -100)}
        for i, x in enumerate(items):
            n = len(x["input_ids"])
            out["input_ids"][i, :n], out["attention_mask"][i, :n] = torch.tensor(x["input_ids"]), 1
            out["labels"][i, :n] = torch.tensor(x["labels"])
        return out

    def loss_now() -> float:
        with torch.no_grad():
            return sum(model(**collate(data[i : i + 16])).loss.item() for i in range(0, 64, 16)) / 4

    before = loss_now()
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "t"), max_steps=12, per_device_train_batch_size=4,
                                          gradient_accumulation_steps=2, learning_rate=3e-2, report_to=[],
                                          use_cpu=True, save_strategy="no", disable_tqdm=True,
                                          remove_unused_columns=False)
    transformers.Trainer(model=model, args=args, train_dataset=data, data_collator=collate).train()
    after = loss_now()
    assert after < before
    saved = model.save_adapter(tmp_path / "adapter", task={"task": "classify", "labels": spec.labels})
    adapter = sp.load_adapter(saved, base)
    test = load_records(bundled_path("uci_sentiment", "test"))[:64]
    examples, _ = build_examples(test, spec.template, "classify", spec.labels)
    bare = evaluate(base, None, examples, spec)["accuracy"]
    tuned = evaluate(base, adapter, examples, spec)["accuracy"]
    assert tuned >= bare - 0.05
