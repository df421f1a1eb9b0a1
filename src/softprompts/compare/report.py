"""Aggregate runs over seeds into ``results.json`` and write ``report.md`` (tables, load warning, plots).

Nothing here is canned: the recommendation and the PEFT comparison (``compare/recommend.py``) are computed from
the aggregated numbers.
"""

from __future__ import annotations

import math
from pathlib import Path

from softprompts.compare import fewshot_report
from softprompts.compare.plots import write_plots
from softprompts.compare.recommend import (
    fmt_bytes,
    fmt_metric,
    fmt_stat,
    lora_ceiling,
    peft_comparison,
    recommend,
)
from softprompts.compare.recommend import stats as _stats
from softprompts.metrics import PRIMARY_METRIC


def _label(impl: str, method: str) -> str:
    return {"softprompts": method, "fewshot": "fewshot"}.get(impl, f"{impl}:{method}")


def _overhead(run: dict, key: str) -> float | None:
    bare = run.get("latency_bare")
    return run["latency"][key] - bare[key] if bare else None


def aggregate(runs: list[dict], primary: str) -> dict[str, dict]:
    """Per ``method`` / ``peft:method``: mean ± std over seeds of every measured number."""
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(_label(r["impl"], r["method"]), []).append(r)
    out = {}
    for label, rs in groups.items():
        ok = [r for r in rs if "error" not in r]
        first = ok[0] if ok else rs[0]
        test_metrics = sorted({k for r in ok for k in r.get("test", {}) if k != "n"})
        out[label] = {
            "impl": first["impl"], "method": first["method"], "artifact": first.get("artifact"),
            "seeds": len(rs), "failed": len(rs) - len(ok),
            "trainable_params": first.get("trainable_params"), "adapter_params": first.get("adapter_params"),
            "adapter_bytes": first.get("adapter_bytes"), "steps": first.get("steps"),
            "best_dev": _stats([r["best_dev"].get(primary) for r in ok]),
            "test": {k: _stats([r["test"].get(k) for r in ok]) for k in test_metrics},
            "test_n": first.get("test", {}).get("n", 0),
            "train_seconds": _stats([r["train_seconds"] for r in ok]),
            "tokens_per_second": _stats([r["tokens_per_second"] for r in ok]),
            "peak_memory_bytes": _stats([r["peak_memory_bytes"] for r in ok]),
            "ttft_ms": _stats([r["latency"]["ttft_ms"] for r in ok]),
            "per_token_ms": _stats([r["latency"]["per_token_ms"] for r in ok]),
            # adapter cost: minus the bare model timed right beside it in the same run (robust to load drift)
            "ttft_overhead_ms": _stats([_overhead(r, "ttft_ms") for r in ok]),
            "per_token_overhead_ms": _stats([_overhead(r, "per_token_ms") for r in ok]),
            "latency_via": first.get("latency_via", "softprompts decode loop"),
            "issues": sorted({i for r in rs for i in r.get("issues", [])}),
            "virtual_tokens": first.get("virtual_tokens"), "lr": first.get("lr"), "lora_rank": first.get("lora_rank"),
            "tuned": first.get("tuned"),  # --tune: the configuration its study chose (the same for every seed)
        }
        if first["impl"] == "fewshot" and ok:
            out[label]["fewshot"] = fewshot_report.summarize(ok)
    return out


def build_results(config, settings: dict, base: dict, runs: list[dict], machine: dict, sizes: dict) -> dict:
    """The results.json document."""
    task = settings["task"]
    primary = PRIMARY_METRIC[task["task"]]
    methods = aggregate(runs, primary)
    test_n = (base.get("test") or {}).get("n", 0)
    recommendation = recommend(methods, base, primary, test_n)
    tuned = {label: m["tuned"] for label, m in methods.items()  # a PEFT counterpart ran in our method's choice
             if m.get("tuned") and (m["impl"] == "softprompts" or m["method"] == "lora")}
    if tuned:  # the same sentences, said of tuned runs
        recommendation["text"].insert(0, _tuned_note(settings.get("tune"), methods))
    return {
        "primary_metric": primary, "task": task, "data": settings.get("data"), "sizes": sizes,
        "settings": {k: v for k, v in settings.items() if k not in ("task", "data")}, "machine": machine,
        "base_model": base, "methods": methods, "runs": runs,
        "recommendation": recommendation, "tuning": tuned,
        "peft_comparison": peft_comparison(methods, primary, "peft" in config.baselines),
        "lora_ceiling": lora_ceiling(methods, primary),
    }


def _tuned_note(trials: int | None, methods: dict[str, dict]) -> str:
    """The recommendation's first line with ``--tune``: which runs it speaks of."""
    lora = " and PEFT LoRA" if (methods.get("peft:lora") or {}).get("tuned") else ""
    return (f"**Tuned runs:** every method{lora} ran in the configuration its own search of {trials} trials chose "
            "on dev (section Tuning): the numbers here are those configurations', not the defaults'.")


def tuning_section(results: dict) -> list[str]:
    """``## Tuning``: per method, the budget, the configuration chosen and the trial's dev metric."""
    tuned = results.get("tuning") or {}
    if not tuned:
        return []
    primary = results["primary_metric"]
    lines = ["## Tuning", "",
             f"Before its runs, each method was tuned on dev with {results['settings'].get('tune')} trials (Optuna "
             "TPE over the learning rate, virtual tokens and the method's own knobs; weak trials stopped by successive "
             "halving at the dev evaluations before the last step; the same steps, batch and schedule as the runs), "
             "PEFT LoRA (learning rate and rank) with the same budget when it ran; every run used its method's best "
             "configuration. The dev numbers of tuned runs are optimistic (the search chose on them): compare test "
             "numbers. Studies: `tune/<method>/` (`tune.md`, `trials.png`, `study.db`).", "",
             f"| method | trials (pruned) | best trial | dev {primary} | tuned configuration |",
             "|---|---:|---:|---:|---|"]
    for label, t in tuned.items():
        config = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in t["params"].items())
        lines.append(f"| {label} | {t['finished']} ({t['pruned']}) | {t['trial']} | "
                     f"{fmt_metric(t['value'], primary)} | {config} |")
    return lines + [""]


def _table(results: dict) -> list[str]:
    primary = results["primary_metric"]
    metrics = sorted({k for m in results["methods"].values() for k in m["test"]})
    head = (["method", "trainable params", "adapter params", "adapter bytes", f"best dev {primary}"]
            + [f"test {k}" for k in metrics]
            + ["train s", "tokens/s", "peak mem", "TTFT ms", "ms/token", "+TTFT ms", "+ms/token"])
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = results["base_model"]
    base_row = ["no adapter", "0", "0", "0", fmt_metric((base.get("dev") or {}).get(primary), primary)]
    base_row += [fmt_metric((base.get("test") or {}).get(k), k) for k in metrics]
    base_row += ["", "", "", f"{base['latency']['ttft_ms']:.1f}", f"{base['latency']['per_token_ms']:.1f}", "0", "0"]
    rows.append("| " + " | ".join(base_row) + " |")
    for label, m in results["methods"].items():
        if m["failed"] == m["seeds"]:
            rows.append(f"| {label} | failed |" + " |" * (len(head) - 2))
            continue
        if m["impl"] == "fewshot":
            rows += ["| " + " | ".join(row) + " |" for row in fewshot_report.table_rows(label, m, metrics, primary)]
            continue

        def mean(key: str, fmt: str = "{:.1f}", m=m) -> str:
            return fmt.format(m[key]["mean"]) if m.get(key) else "n/a"

        row = [label + (" (tuned)" if m.get("tuned") else ""), f"{m['trainable_params']:,}",
               f"{m['adapter_params']:,}", fmt_bytes(m["adapter_bytes"]),
               fmt_stat(m["best_dev"], primary)]
        row += [fmt_stat(m["test"].get(k), k) for k in metrics]
        row += [mean("train_seconds"), mean("tokens_per_second", "{:.0f}"),
                fmt_bytes(m["peak_memory_bytes"]["mean"]) if m["peak_memory_bytes"] else "n/a",
                mean("ttft_ms"), mean("per_token_ms"), mean("ttft_overhead_ms", "{:+.1f}"),
                mean("per_token_overhead_ms", "{:+.1f}")]
        rows.append("| " + " | ".join(row) + " |")
    return rows


def _load_warning(machine: dict) -> list[str]:
    """A warning when the machine was busier than its core count: timings are then inflated and noisy."""
    load, cpus = machine.get("load_average_1m"), machine.get("cpu_count") or 1
    if load is None or load <= cpus:
        return []
    return ["", f"**Warning:** the 1-minute load average reached {load:.1f} on {cpus} CPUs during this compare: "
            "other processes shared the machine, so seconds, tokens/s and latencies are inflated and noisy "
            "(compare them within this report only, and rerun on an idle machine for absolute numbers)."]


def render_report(results: dict, plots: list[str]) -> str:
    """report.md as text."""
    s, m, task = results["settings"], results["machine"], results["task"]
    hf = results["base_model"].get("latency_hf", {})  # the bare model timed through HF generate (with PEFT)
    budget = f"{s['steps']} steps" if s.get("steps") else f"{s['minutes']} min per run ({s.get('steps_per_method')})"
    lr = (f"tuned per method ({s['tune']} trials each)" if s.get("tune") else
          s["lr"] if s.get("lr") else "per-method default")
    lines = [
        f"# softprompts compare: {results['data'].get('dataset') or task['task']} on `{s['model']}`", "",
        f"Task `{task['task']}`, template `{task['prompt']!r}` -> `{task['target']!r}`"
        + (f", labels {task['labels']}" if task.get("labels") else "") + ".",
        f"Data: {results['sizes']['train']} train / {results['sizes']['dev']} dev / {results['sizes']['test']} test "
        f"examples" + "".join(f", {k} `{v}`" for k, v in (results["data"] or {}).items() if v not in (None, "None"))
        + ".",
        f"Budget: {budget}, batch {s['batch_size']}, {s['seeds']} seed(s), learning rate {lr}; PEFT runs use the same "
        "steps, lr, schedule and batches.",
        f"Machine: {m['processor']}, {m['cpu_count']} CPUs ({m['torch_threads']} torch threads), device {m['device']}"
        f"{', ' + m['gpu'] if m.get('gpu') else ''}; torch {m['torch']}, transformers {m['transformers']}, "
        f"peft {m.get('peft')}; commit {m.get('commit')}.", *_load_warning(m), "",
        "## Results", "",
        f"Metrics are mean ± std over seeds; accuracy/F1 in %. Latency: batch 1, median of repeats; +TTFT and "
        f"+ms/token are the adapter's cost over the bare model timed right beside it in the same run; "
        f"ours through the softprompts decode loop (soft prompts served as their KV), PEFT through transformers "
        f"`generate` (bare model through `generate`: TTFT {hf.get('ttft_ms', math.nan):.1f} ms, "
        f"{hf.get('per_token_ms', math.nan):.1f} ms/token). "
        f"Peak memory: {next(iter(results['runs']), {}).get('memory_measure', 'n/a')}.", "",
        *_table(results), "",
        *tuning_section(results),
    ]
    if results["peft_comparison"]:
        lines += ["## Side by side with Hugging Face PEFT", "", *results["peft_comparison"], ""]
    if results.get("lora_ceiling"):
        lines += ["## How far from a weight adapter (PEFT LoRA)", "", *results["lora_ceiling"], ""]
    lines += fewshot_report.section(results)
    lines += explain_section(results.get("explain") or {})
    lines += ["## Plots", "", *[f"![{p}]({p})" for p in plots], ""]
    lines += ["## Recommendation", "", *results["recommendation"]["text"], ""]
    return "\n".join(lines)


def explain_section(explained: dict[str, dict]) -> list[str]:
    """``--explain``: where each method acts (``softprompts explain``), one row per method."""
    if not explained:
        return []
    lines = ["## Where each method acts (softprompts explain)", "",
             "Attention share: the weight real tokens put on the virtual positions (a soft prompt measured as the KV "
             "it is served as). Layers for 90 % of the gain: the fewest first layers that keep 90 % of the adapter's "
             "gain over the bare model when the virtual positions are hidden from the others.", "",
             "| method | saved params | layers for 90 % of the gain | share first | share middle | share last | "
             "details |", "|---|---|---|---|---|---|---|"]
    for method, e in explained.items():
        saved = e.get("saved_parameters")
        saved_text = f"{saved:,}" if isinstance(saved, int) else "–"
        lines.append(f"| {method} | {saved_text} | {e['layers_for_90pct_gain']} | {e['share_first']:.2f} | "
                     f"{e['share_middle']:.2f} | {e['share_last']:.2f} | [{e['report']}]({e['report']}) |")
    return lines + [""]


def write_report(results: dict, out_dir: str | Path) -> Path:
    """Plots (PNG) and report.md into ``out_dir``."""
    out_dir = Path(out_dir)
    plots = write_plots(results, out_dir)
    path = out_dir / "report.md"
    path.write_text(render_report(results, plots))
    return path
