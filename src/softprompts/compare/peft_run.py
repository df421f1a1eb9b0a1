"""One PEFT run of a compare (``--baseline peft``): PEFT's counterpart of one of our methods, or LoRA as the ceiling,
trained on the same data, budget and batches as ours (``peft_baseline.run_peft``), then timed through transformers'
``generate`` beside the bare model (LoRA switched off for the bare timing, since it sits inside the base's modules).

The result has the keys of our runs (``runner.Comparison._our_run``), so the report compares them row for row;
``latency_via`` says the timing went through ``generate``, and ``issues`` carries what PEFT could not do.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from softprompts.compare.config import CompareConfig, CompareData
from softprompts.compare.latency import measure_hf_latency, peak_memory_bytes, reset_peak_memory
from softprompts.compare.peft_baseline import LORA, LORA_OPTIONS, PeftSpec, release, run_peft
from softprompts.compare.peft_eval import bare_model
from softprompts.data.templates import VIRTUAL
from softprompts.methods import PromptMethod, task_init_text
from softprompts.metrics import PRIMARY_METRIC
from softprompts.training import TrainConfig


class PeftRun:
    """``run(method, seed, steps, run_dir, train_config, ours, lora_rank)``: ``ours`` is our method of that name,
    built only for its config (PEFT gets the same P, encoder and init text); ``None`` for LoRA, whose rank is
    ``lora_rank`` (``None``: ``LORA_OPTIONS``'s)."""

    def __init__(self, base, data: CompareData, dev: list, test: list, config: CompareConfig, prompt: str) -> None:
        self.base, self.data, self.dev, self.test, self.config = base, data, dev, test, config
        self.prompt = prompt.replace(VIRTUAL, "")  # PEFT has no placement

    def _spec(self, method: str, train_config: TrainConfig, ours: PromptMethod | None,
              lora_rank: int | None) -> PeftSpec:
        hidden = self.base.shapes.hidden_size
        if method == LORA or ours is None:
            return PeftSpec(LORA, None, train_config, hidden_size=hidden, lora_rank=lora_rank or LORA_OPTIONS["r"])
        spec = self.data.spec
        init_text = task_init_text(spec.task, spec.labels) if ours.config.init == "text" else None
        return PeftSpec(method, ours.config, train_config, init_text=init_text, hidden_size=hidden)

    def _latency(self, model) -> dict:
        return measure_hf_latency(model, self.base, self.prompt, self.config.latency_tokens,
                                  self.config.latency_repeats).to_json()

    def run(self, method: str, seed: int, steps: int, run_dir: Path, train_config: TrainConfig,
            ours: PromptMethod | None, lora_rank: int | None = None) -> dict:
        peft_spec = self._spec(method, train_config, ours, lora_rank)
        primary = PRIMARY_METRIC[self.data.spec.task]
        measure = reset_peak_memory(self.base.device)
        started = time.perf_counter()
        bar = tqdm(total=steps, desc="train (peft)", disable=not self.config.progress, file=sys.stderr)
        try:
            res = run_peft(self.base, peft_spec, replace(self.data, dev=self.dev, test=self.test),
                           out_dir=run_dir / "peft_adapter", progress=bar)
        finally:
            bar.close()
        peak = peak_memory_bytes(self.base.device)
        try:
            with bare_model(res.model):
                bare = self._latency(self.base.model)
            latency = self._latency(res.model)
        finally:  # the base as it was for the runs after this one, whatever happened here
            release(res, self.base)
        return {
            "impl": "peft", "method": method, "seed": seed, "lr": train_config.lr, "artifact": None,
            "lora_rank": peft_spec.lora_rank if method == LORA else None, "steps": res.steps_done,
            "trainable_params": res.trainable_params, "adapter_params": res.saved_params,
            "adapter_bytes": res.saved_bytes, "best_dev": {primary: res.best_dev.get(primary)},
            "best_step": res.best_step, "test": res.test, "train_seconds": round(res.train_seconds, 3),
            "tokens_per_second": round(res.tokens_per_second, 1), "peak_memory_bytes": peak,
            "memory_measure": measure, "latency": latency, "latency_bare": bare,
            "latency_via": "transformers generate",
            "curve": res.curve, "issues": res.issues, "wall_seconds": round(time.perf_counter() - started, 1),
        }


__all__ = ["PeftRun"]
