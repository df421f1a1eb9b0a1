"""Run every method (and optionally its PEFT counterpart) on the same data with the same budget, resumably.

Layout of ``OUT``::

    compare.json                 settings of this compare (a resumed compare must use the same ones)
    runs/base/result.json        the bare model: test metrics and latency (the "no adapter" reference)
    runs/<method>-seed<k>/       one of our runs: adapter/ (+ training.json), adapter.checkpoint.pt while training,
                                 result.json when finished
    runs/peft-<method>-seed<k>/  a PEFT run: peft_adapter/, result.json
    runs/fewshot-seed<k>/        the few-shot baseline (k demonstrations in the prompt, no training): result.json
    tune/<method>/, tune/lora/   with --tune N: each method's study (compare/tuning.py), run before its first run
    results.json, report.md, *.png

A run is finished when its ``result.json`` exists (written atomically, last). Re-running the same command skips
finished runs, resumes an interrupted training from the training loop's own checkpoint, and re-evaluates a run
whose adapter was saved but whose evaluation was interrupted.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from softprompts.adapter_io import WEIGHTS_FILE, load_adapter
from softprompts.compare.config import (
    RESULT_FILE,
    SETTINGS_FILE,
    CompareConfig,
    CompareData,
    carve_dev,
    machine_info,
)
from softprompts.compare.fewshot_run import FewShotRun
from softprompts.compare.latency import (
    measure_hf_latency,
    measure_latency,
    peak_memory_bytes,
    reset_peak_memory,
)
from softprompts.compare.peft_baseline import LORA
from softprompts.compare.peft_run import PeftRun
from softprompts.compare.preflight import model_problems, problems, refuse, train_config
from softprompts.compare.report import build_results, write_report
from softprompts.compare.tuning import Tuned, Tuning
from softprompts.data.templates import VIRTUAL
from softprompts.errors import SoftpromptsError
from softprompts.evaluate import evaluate
from softprompts.explain import ExplainConfig, explain
from softprompts.explain import write_report as write_explanation
from softprompts.files import atomic_json, read_json_or_none
from softprompts.methods import PromptMethod, build_method, method_class
from softprompts.model.load import load_base
from softprompts.model.placement import place
from softprompts.tasks import split_prompt
from softprompts.training import RECORD_FILE, TrainConfig, train


class Comparison:
    """One compare: ``run()`` does every missing run and returns the results dict written to results.json."""

    def __init__(self, config: CompareConfig, data: CompareData, out_dir: str | Path, base=None) -> None:
        data = carve_dev(data)  # no dev rows: carved from the training rows (config.py says when and how many)
        refuse(problems(config, data))  # before the model loads; model_problems once it has (preflight.py)
        self.methods = [method_class(m).name for m in config.methods]  # aliases -> names; the config stays as given
        self.config, self.data, self.out = config, data, Path(out_dir)
        self.base = base
        self.base_dev: dict | None = None  # the bare model's dev metrics (from the base run), shared by every run
        self.dev = data.dev[: config.eval_limit] if config.eval_limit else data.dev
        self.test = data.test[: config.test_limit] if config.test_limit else data.test
        self.skipped: list[str] = []
        self.ran: list[str] = []
        self.tuned: dict[str, Tuned] = {}  # with --tune: method (or "lora") -> the configuration its study chose

    # --- settings / budget ---------------------------------------------------------------------------------------

    def _settings(self) -> dict:
        c = self.config
        return {
            "model": c.model, "quantize": c.quantize, "dtype": c.dtype, "methods": self.methods, "seeds": c.seeds,
            "baseline": c.baseline, "lora": c.lora, "tune": c.tune,
            "shots": c.shots, "steps": c.steps,
            "minutes": c.minutes, "batch_size": c.batch_size, "lr": c.lr, "virtual_tokens": c.virtual_tokens,
            "eval_every": c.eval_every, "task": self.data.spec.to_json(), "data": self.data.description,
            "sizes": {"train": len(self.data.train), "dev": len(self.dev), "test": len(self.test)},
        }

    def _check_settings(self) -> dict:
        """Write compare.json, or check a resumed compare uses the same settings (methods/seeds may grow)."""
        path = self.out / SETTINGS_FILE
        settings = self._settings()
        old = read_json_or_none(path)
        if old is not None:
            fixed = [k for k in settings if k not in ("methods", "seeds", "baseline", "lora", "shots")]
            changed = [k for k in fixed if json.dumps(old.get(k), default=str) != json.dumps(settings[k], default=str)]
            if changed:
                raise SoftpromptsError(
                    f"{self.out} holds a compare with other settings ({', '.join(changed)} differ); resume with the "
                    "same flags or choose another --out"
                )
            settings["steps_per_method"] = old.get("steps_per_method", {})
        atomic_json(path, settings)
        return settings

    def _train_config(self, method: str, seed: int, steps: int) -> TrainConfig:
        """A run's training options; with ``--tune``, the learning rate its method's study chose."""
        config = train_config(self.config, method, seed, steps)
        tuned = self.tuned.get(method)
        return (replace(config, lr=tuned.lr) if tuned else config).validate()

    def _method(self, name: str, seed: int) -> PromptMethod:
        """A run's method; with ``--tune``, built with the options its study chose (P and the method's knobs)."""
        tuned = self.tuned.get(name)
        options = tuned.options if tuned else {"num_virtual_tokens": self.config.virtual_tokens}
        return build_method(self.base, name, self.data.spec, seed=seed, **options)

    def _steps_for(self, method: str, settings: dict) -> int:
        """``--steps``, or for ``--minutes`` the steps that fit: time 2 training steps of this method once."""
        if self.config.steps is not None:
            return self.config.steps
        if method == LORA:  # the budget of the first method's runs (LoRA has no method of ours to time)
            return self._steps_for(self.methods[0], settings)
        known = settings.setdefault("steps_per_method", {})
        if method not in known:
            probe = replace(self._train_config(method, 0, 2), progress=False, checkpoint_every=0)
            record = train(self.base, self._method(method, 0), self.data.train, self.data.spec, probe).record
            per_step = max(record["timings"]["train_seconds"] / 2, 1e-3)
            known[method] = max(1, int(self.config.minutes * 60 / per_step))
            atomic_json(self.out / SETTINGS_FILE, settings)
        return known[method]

    # --- runs -----------------------------------------------------------------------------------------------------

    def _prompt(self) -> str:
        return (self.test or self.dev or self.data.train)[0].prompt

    def _latency(self, adapter=None, at_input: bool = False) -> dict:
        """Latency of one prompt. The bare model reads it all as text; an adapter runs from its served form (placed
        after the prompt's lead and turned into its KV once, as the server does), or with ``at_input`` with the soft
        prompt recomputed in every prefill."""
        lead, ids = split_prompt(self.base, self._prompt())
        if adapter is None:
            return measure_latency(self.base, list(lead) + ids, None, self.config.latency_tokens,
                                   self.config.latency_repeats).to_json()
        artifact = place(self.base, adapter.artifact, lead) if at_input else self.base.served(adapter, lead)
        return measure_latency(self.base, ids, artifact, self.config.latency_tokens,
                               self.config.latency_repeats).to_json()

    def _base_run(self) -> dict:
        path = self.out / "runs" / "base" / RESULT_FILE
        done = read_json_or_none(path)
        peft = self.config.uses_peft
        if done is not None and (not peft or "latency_hf" in done):
            return done
        result = {"test": evaluate(self.base, None, self.test, self.data.spec) if self.test else {},
                  "dev": evaluate(self.base, None, self.dev, self.data.spec) if self.dev else {},
                  "latency": self._latency(None)}
        if peft:
            prompt = self._prompt().replace(VIRTUAL, "")
            result["latency_hf"] = measure_hf_latency(self.base.model, self.base, prompt,
                                                      self.config.latency_tokens, self.config.latency_repeats).to_json()
        atomic_json(path, result)
        return result

    def _our_run(self, method: str, seed: int, steps: int, run_dir: Path) -> dict:
        adapter_dir = run_dir / "adapter"
        run_dir.mkdir(parents=True, exist_ok=True)  # the checkpoint lives next to adapter/ while training
        measure = reset_peak_memory(self.base.device)
        started = time.perf_counter()
        if (adapter_dir / RECORD_FILE).is_file():  # trained, evaluation was interrupted: evaluate again
            adapter = load_adapter(adapter_dir, self.base)
            record = json.loads((adapter_dir / RECORD_FILE).read_text())
            trainable = record["trainable_parameters"]
        else:
            m = self._method(method, seed)
            trainable = m.num_trainable()
            config = replace(self._train_config(method, seed, steps), report_to=self.config.report_to,
                             report_dir=str(self.out), run_name=run_dir.name, run_group=f"compare-{self.out.name}")
            out = train(self.base, m, self.data.train, self.data.spec, config,
                        dev_examples=self.dev, out_dir=adapter_dir, resume=True, base_dev=self.base_dev)
            adapter, record = out.adapter, out.record
        test = evaluate(self.base, adapter, self.test, self.data.spec) if self.test else {}
        peak = peak_memory_bytes(self.base.device)
        metric = record["metric"].removeprefix("dev_")
        bare = self._latency(None)  # timed next to the adapter: the difference survives a drifting machine load
        latency = self._latency(adapter)
        latency_input = self._latency(adapter, at_input=True) if adapter.artifact.kind == "soft_prompt" else None
        return {
            "impl": "softprompts", "method": method, "seed": seed, "lr": record["train_config"]["lr"],
            "artifact": adapter.artifact.kind,
            "virtual_tokens": adapter.artifact.length, "steps": record["steps_done"], "trainable_params": trainable,
            "adapter_params": adapter.num_parameters, "adapter_bytes": (adapter_dir / WEIGHTS_FILE).stat().st_size,
            "best_dev": {metric: record["best_dev"]}, "best_step": record["best_step"], "test": test,
            "base_model_dev": record.get("base_model_dev"),
            "train_seconds": record["timings"]["train_seconds"],
            "tokens_per_second": record["timings"]["tokens_per_second"],
            "peak_memory_bytes": peak, "memory_measure": measure,
            "latency": latency, "latency_bare": bare, "latency_soft_prompt_at_input": latency_input,
            "curve": record["curve"], "issues": [], "wall_seconds": round(time.perf_counter() - started, 1),
        }

    def _peft_run(self, method: str, seed: int, steps: int, run_dir: Path) -> dict:
        """PEFT's run of ``method`` (``compare/peft_run.py``); our method is built for its config only."""
        ours = None if method == LORA else self._method(method, seed)
        run = PeftRun(self.base, self.data, self.dev, self.test, self.config, self._prompt())
        rank = self.tuned[LORA].options["r"] if method == LORA and LORA in self.tuned else None
        return run.run(method, seed, steps, run_dir, self._train_config(method, seed, steps), ours, lora_rank=rank)

    def _fewshot_run(self, method: str, seed: int, steps: int, run_dir: Path) -> dict:
        """The few-shot baseline (``compare/fewshot_run.py``), the bare model timed beside it."""
        bare = self._latency(None)
        return FewShotRun(self.base, self.data, self.dev, self.test, self.config).run(seed, self.base_dev, bare)

    # --- the compare --------------------------------------------------------------------------------------------

    def _jobs(self) -> list[tuple[str, str, int]]:
        """``(impl, method, seed)`` of every run: ours, then PEFT's (+ LoRA), then the few-shot baseline."""
        seeds = range(self.config.seeds)
        jobs = [("softprompts", m, s) for m in self.methods for s in seeds]
        if "peft" in self.config.baselines:  # a method PEFT has no counterpart of runs ours only (the report says so)
            jobs += [("peft", m, s) for m in self.methods if method_class(m).peft_type is not None for s in seeds]
        if self.config.runs_lora:  # the weight-adapter ceiling, on the same data, budget and batches
            jobs += [("peft", LORA, s) for s in seeds]
        if "fewshot" in self.config.baselines:
            jobs += [("fewshot", "fewshot", s) for s in seeds]
        return jobs

    def _finished(self, impl: str, run_dir: Path) -> dict | None:
        """The run's result when it is done (a few-shot run only for the same ``--shots``)."""
        done = read_json_or_none(run_dir / RESULT_FILE)
        if done is not None and impl == "fewshot" and done.get("shots_setting") != self.config.shots:
            return None
        return done

    def _tune(self, method: str, steps: int) -> Tuned | None:
        """With ``--tune N``: ``method``'s study (``compare/tuning.py``), searched once per compare; a finished one
        is read back without training."""
        if self.config.tune is None:
            return None
        if method not in self.tuned:
            tqdm.write(f"compare: tuning {method} ({self.config.tune} trials on dev)", file=sys.stderr)
            tuning = Tuning(self.base, self.data, self.dev, self.config, self.out, self.base_dev)
            self.tuned[method] = tuning.best(method, train_config(self.config, method, 0, steps).validate())
        return self.tuned[method]

    def _run_one(self, impl: str, method: str, seed: int, run_dir: Path, settings: dict) -> dict:
        """One run (with ``--tune``, in its method's tuned configuration); a failing PEFT run is reported in its
        result, any other failure raises."""
        steps = 0 if impl == "fewshot" else self._steps_for(method, settings)
        runner = {"peft": self._peft_run, "fewshot": self._fewshot_run}.get(impl, self._our_run)
        try:
            tuned = None if impl == "fewshot" else self._tune(method, steps)
            result = runner(method, seed, steps, run_dir)
            if tuned is not None:
                result["tuned"] = tuned.to_json()
        except SoftpromptsError:
            raise
        except Exception as exc:  # a failing run is reported, not fatal (PEFT breaks across versions)
            if impl != "peft":
                raise
            result = {"impl": impl, "method": method, "seed": seed, "error": f"{type(exc).__name__}: {exc}",
                      "issues": [f"PEFT run failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"]}
        result["load_average_1m"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_json(run_dir / RESULT_FILE, result)
        return result

    def _prepare(self) -> dict:
        """Settings checked, the base model loaded, and everything it can refuse refused (before any training)."""
        self.out.mkdir(parents=True, exist_ok=True)
        settings = self._check_settings()
        if self.base is None:
            self.base = load_base(self.config.model, device="auto", quantize=self.config.quantize,
                                  dtype=self.config.dtype)
        refuse(model_problems(self.base, self.config, self.data, self.dev, self.test))
        return settings

    def run(self) -> dict:
        """Do every unfinished run, then write results.json, the plots and report.md; returns the results."""
        settings = self._prepare()
        jobs = self._jobs()
        base_result = self._base_run()
        self.base_dev = base_result["dev"] or None
        runs = []
        overall = tqdm(jobs, desc="compare", disable=not self.config.progress, file=sys.stderr, position=0)
        for index, (impl, method, seed) in enumerate(overall, start=1):
            name = f"{'peft-' if impl == 'peft' else ''}{method}-seed{seed}"
            run_dir = self.out / "runs" / name
            done = self._finished(impl, run_dir)
            if done is not None:
                self.skipped.append(name)
                overall.set_description(f"compare: {name} done already")
                runs.append(done)
                continue
            overall.set_description(f"compare: run {index}/{len(jobs)} {name}")
            tqdm.write(f"compare: run {index}/{len(jobs)}: {name}", file=sys.stderr)
            runs.append(self._run_one(impl, method, seed, run_dir, settings))
            self.ran.append(name)
        overall.close()
        return self._finish(settings, base_result, runs)

    def _explain(self) -> dict[str, dict]:
        """With ``--explain N``: each of our methods' first-seed adapter explained on N dev (else test) rows
        (``softprompts.explain``), written under ``OUT/explain/<method>/``; a finished one is read back."""
        out: dict[str, dict] = {}
        rows = self.dev or self.test
        if not self.config.explain or not rows:
            return out
        for method in self.methods:
            adapter_dir = self.out / "runs" / f"{method}-seed0" / "adapter"
            target = self.out / "explain" / method
            done = read_json_or_none(target / "explain.json")
            if done is None and (adapter_dir / WEIGHTS_FILE).is_file():
                tqdm.write(f"compare: explaining {method} on {min(len(rows), self.config.explain)} rows",
                           file=sys.stderr)
                adapter = load_adapter(adapter_dir, self.base)
                found = explain(self.base, adapter, rows, self.data.spec, ExplainConfig(limit=self.config.explain),
                                adapter_dir)
                write_explanation(found, target, title=f"`{method}`")
                done = found.to_json()
            if done is not None:
                out[method] = {**done["summary"], "attention_share": done["attention_share"],
                               "report": f"explain/{method}/explain.md"}
        return out

    def _finish(self, settings: dict, base_result: dict, runs: list[dict]) -> dict:
        """results.json, the plots and report.md from every run."""
        results = build_results(self.config, settings, base_result, runs, machine_info(self.base.device),
                                {"train": len(self.data.train), "dev": len(self.dev), "test": len(self.test)})
        results["explain"] = self._explain()
        results["resume"] = {"skipped": self.skipped, "ran": self.ran}
        loads = [r.get("load_average_1m") for r in runs if r.get("load_average_1m") is not None]
        results["machine"]["load_average_1m"] = max(loads + [results["machine"]["load_average_1m"] or 0.0])
        atomic_json(self.out / "results.json", results)
        write_report(results, self.out)
        return results


def run_compare(config: CompareConfig, data: CompareData, out_dir: str | Path, base=None) -> dict:
    """Convenience wrapper: ``Comparison(config, data, out_dir, base).run()``."""
    return Comparison(config, data, out_dir, base).run()


__all__ = ["CompareConfig", "CompareData", "Comparison", "run_compare", "machine_info"]
