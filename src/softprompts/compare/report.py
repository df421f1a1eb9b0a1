"""Aggregate runs over seeds, derive a recommendation from the numbers, and write ``report.md``.

Nothing here is canned: every sentence of the recommendation is computed from ``results.json``. The noise level a
quality difference is compared against is the larger seed standard deviation of the two methods when there are
several seeds; with one seed and an accuracy metric, the binomial standard error ``sqrt(p (1 - p) / n)`` of the
test set; otherwise the report says the difference cannot be compared to noise.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

SCALES = {"accuracy": 100.0, "macro_f1": 100.0}  # shown as percentages; generation metrics are already 0-100


def _stats(values: list[float]) -> dict | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def _label(impl: str, method: str) -> str:
    return method if impl == "softprompts" else f"peft:{method}"


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
        }
    return out


def _quality(entry: dict, primary: str) -> dict | None:
    """The number a method is judged by: test primary metric, or best dev when there is no test set."""
    return entry["test"].get(primary) or entry["best_dev"]


def _fmt_metric(value: float | None, metric: str) -> str:
    return "n/a" if value is None else f"{value * SCALES.get(metric, 1.0):.1f}"


def _fmt_stat(stat: dict | None, metric: str) -> str:
    if not stat:
        return "n/a"
    scale = SCALES.get(metric, 1.0)
    return f"{stat['mean'] * scale:.1f}" + (f" ± {stat['std'] * scale:.1f}" if stat["n"] > 1 else "")


def _bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _noise(a: dict, b: dict, primary: str, test_n: int) -> tuple[float | None, str]:
    """Noise level for a quality difference between a and b, and how it was obtained."""
    if a["n"] > 1 and b["n"] > 1:
        return max(a["std"], b["std"]), "the larger seed std"
    if primary == "accuracy" and test_n:
        p = a["mean"]
        return math.sqrt(max(p * (1 - p), 1e-12) / test_n), f"the binomial standard error on {test_n} test examples"
    return None, ""


def recommend(methods: dict[str, dict], base: dict, primary: str, test_n: int) -> dict:
    """The recommendation, as sentences and as structured fields, from our methods' numbers."""
    ours = {k: v for k, v in methods.items() if v["impl"] == "softprompts" and _quality(v, primary)}
    if not ours:
        finished = any(v["impl"] == "softprompts" and v["failed"] < v["seeds"] for v in methods.values())
        why = ("no quality was measured: give --eval-data and/or --test-data (or --dataset)" if finished
               else "no run of ours finished")
        return {"text": [f"No recommendation: {why}."], "winner": None}
    scale, unit = SCALES.get(primary, 1.0), (" points" if primary in SCALES else "")
    ranked = sorted(ours, key=lambda k: _quality(ours[k], primary)["mean"], reverse=True)
    best, lines = ranked[0], []
    qb = _quality(ours[best], primary)
    where = "test" if ours[best]["test"].get(primary) else "best dev"
    lines.append(f"**Quality:** `{best}` is best on {where} {primary} ({_fmt_stat(qb, primary)}).")
    winner = best
    if len(ranked) > 1:
        second = ranked[1]
        qs = _quality(ours[second], primary)
        gap = (qb["mean"] - qs["mean"]) * scale
        noise, how = _noise(qb, qs, primary, test_n)
        if noise is None:
            verdict = "no seed spread to compare it with (run --seeds 3 to tell)"
        elif gap > noise * scale:
            verdict = f"larger than {how} ({noise * scale:.1f}): a real difference"
        else:
            verdict = f"within {how} ({noise * scale:.1f}): a tie on this data"
        lines.append(f"It leads `{second}` by {gap:.1f}{unit}, {verdict}.")
        tie = noise is not None and gap <= noise * scale
    else:
        tie = False
    base_q = (base.get("test") or base.get("dev") or {}).get(primary)
    if base_q is not None:
        gain = (qb["mean"] - base_q) * scale
        lines.append(f"The bare model (no adapter) scores {_fmt_metric(base_q, primary)}: `{best}` "
                     f"{'adds' if gain >= 0 else 'loses'} {abs(gain):.1f}{unit}.")
    smallest = min(ours, key=lambda k: ours[k]["adapter_bytes"] or math.inf)
    sb, bb = ours[smallest]["adapter_bytes"], ours[best]["adapter_bytes"]
    if smallest == best:
        lines.append(f"**Size:** `{best}` is also the smallest saved adapter ({_bytes(bb)}).")
    else:
        qsm = _quality(ours[smallest], primary)
        lines.append(f"**Size:** `{smallest}` is the smallest saved adapter ({_bytes(sb)}, {bb / sb:.1f}x smaller "
                     f"than `{best}` at {_bytes(bb)}), scoring {_fmt_stat(qsm, primary)} "
                     f"({(qb['mean'] - qsm['mean']) * scale:.1f}{unit} below `{best}`).")
        noise, _ = _noise(qb, qsm, primary, test_n)
        if noise is not None and (qb["mean"] - qsm["mean"]) <= noise:
            winner = smallest
    lat = ours[best]
    if lat["ttft_ms"] and lat.get("ttft_overhead_ms"):
        lines.append(
            f"**Latency:** with `{best}` the first token takes {lat['ttft_ms']['mean']:.1f} ms "
            f"({lat['ttft_overhead_ms']['mean']:+.1f} ms vs the bare model timed beside it) and each further token "
            f"{lat['per_token_ms']['mean']:.1f} ms ({lat['per_token_overhead_ms']['mean']:+.1f} ms)."
        )
    kinds = _by_artifact(ours, primary)
    if len(kinds) == 2:
        (kp, p), (ks, s) = kinds["kv_prefix"], kinds["soft_prompt"]
        dq = (_quality(p, primary)["mean"] - _quality(s, primary)["mean"]) * scale
        lines.append(
            f"**KV prefix vs soft prompt** (best of each): `{kp}` vs `{ks}`: {dq:+.1f}{unit} quality, "
            f"{(p['adapter_bytes'] or 0) / max(s['adapter_bytes'] or 1, 1):.1f}x the size, "
            f"{_delta(p, s, 'ttft')} ms first token, {_delta(p, s, 'per_token')} ms per token (adapter overheads)."
        )
    if winner == best:
        why = "it has the best quality" + (" (though not by more than the noise)" if tie else "")
    else:
        why = f"it is within noise of `{best}` at {bb / sb:.1f}x smaller"
    lines.append(f"**Recommendation: `{winner}`** — {why}.")
    if base_q is not None and base_q >= _quality(ours[winner], primary)["mean"]:
        lines.append(f"**But:** the bare model without any adapter scores {_fmt_metric(base_q, primary)}, at least as "
                     f"well as `{winner}`: with this budget no method pays off here (train longer, on more data, or "
                     "check the learning rate before adopting one).")
    return {"text": lines, "winner": winner, "best_quality": best, "smallest": smallest}


def _delta(a: dict, b: dict, key: str) -> str:
    """Difference of the two adapters' latency overheads over the bare model (or raw latencies without them)."""
    oa, ob = a.get(f"{key}_overhead_ms"), b.get(f"{key}_overhead_ms")
    if oa and ob:
        return f"{oa['mean'] - ob['mean']:+.1f}"
    return f"{a[f'{key}_ms']['mean'] - b[f'{key}_ms']['mean']:+.1f}"


def _by_artifact(ours: dict[str, dict], primary: str) -> dict[str, tuple[str, dict]]:
    kinds: dict[str, tuple[str, dict]] = {}
    for label, entry in ours.items():
        kind = entry.get("artifact")
        if kind and (kind not in kinds or _quality(entry, primary)["mean"] > _quality(kinds[kind][1], primary)["mean"]):
            kinds[kind] = (label, entry)
    return kinds


def peft_comparison(methods: dict[str, dict], primary: str) -> list[str]:
    """One line per method run both ways: our quality vs PEFT's, and PEFT's detected failures."""
    lines = []
    for label, entry in methods.items():
        if entry["impl"] != "peft":
            continue
        ours = methods.get(entry["method"])
        if entry["failed"] == entry["seeds"]:
            lines.append(f"- `{label}`: failed ({'; '.join(entry['issues'])})")
            continue
        qp = _quality(entry, primary)
        text = f"- `{entry['method']}`: PEFT {_fmt_stat(qp, primary)}"
        if ours and _quality(ours, primary):
            qo = _quality(ours, primary)
            text += (f" vs ours {_fmt_stat(qo, primary)} "
                     f"({(qo['mean'] - qp['mean']) * SCALES.get(primary, 1.0):+.1f} for ours)")
        if entry["issues"]:
            text += ". **Detected:** " + "; ".join(entry["issues"])
        lines.append(text + ".")
    return lines


def build_results(config, settings: dict, base: dict, runs: list[dict], machine: dict, sizes: dict) -> dict:
    """The results.json document."""
    from softprompts.evaluate import PRIMARY_METRIC

    task = settings["task"]
    primary = PRIMARY_METRIC[task["task"]]
    methods = aggregate(runs, primary)
    test_n = (base.get("test") or {}).get("n", 0)
    return {
        "primary_metric": primary, "task": task, "data": settings.get("data"), "sizes": sizes,
        "settings": {k: v for k, v in settings.items() if k not in ("task", "data")}, "machine": machine,
        "base_model": base, "methods": methods, "runs": runs,
        "recommendation": recommend(methods, base, primary, test_n),
        "peft_comparison": peft_comparison(methods, primary),
    }


def _table(results: dict) -> list[str]:
    primary = results["primary_metric"]
    metrics = sorted({k for m in results["methods"].values() for k in m["test"]})
    head = (["method", "trainable params", "adapter params", "adapter bytes", f"best dev {primary}"]
            + [f"test {k}" for k in metrics]
            + ["train s", "tokens/s", "peak mem", "TTFT ms", "ms/token", "+TTFT ms", "+ms/token"])
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = results["base_model"]
    base_row = ["no adapter", "0", "0", "0", _fmt_metric((base.get("dev") or {}).get(primary), primary)]
    base_row += [_fmt_metric((base.get("test") or {}).get(k), k) for k in metrics]
    base_row += ["", "", "", f"{base['latency']['ttft_ms']:.1f}", f"{base['latency']['per_token_ms']:.1f}", "0", "0"]
    rows.append("| " + " | ".join(base_row) + " |")
    for label, m in results["methods"].items():
        if m["failed"] == m["seeds"]:
            rows.append(f"| {label} | failed |" + " |" * (len(head) - 2))
            continue

        def mean(key: str, fmt: str = "{:.1f}", m=m) -> str:
            return fmt.format(m[key]["mean"]) if m.get(key) else "n/a"

        row = [label, f"{m['trainable_params']:,}", f"{m['adapter_params']:,}", _bytes(m["adapter_bytes"]),
               _fmt_stat(m["best_dev"], primary)]
        row += [_fmt_stat(m["test"].get(k), k) for k in metrics]
        row += [mean("train_seconds"), mean("tokens_per_second", "{:.0f}"),
                _bytes(m["peak_memory_bytes"]["mean"]) if m["peak_memory_bytes"] else "n/a",
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
    budget = f"{s['steps']} steps" if s.get("steps") else f"{s['minutes']} min per run ({s.get('steps_per_method')})"
    lines = [
        f"# softprompts compare: {results['data'].get('dataset') or task['task']} on `{s['model']}`", "",
        f"Task `{task['task']}`, template `{task['prompt']!r}` -> `{task['target']!r}`"
        + (f", labels {task['labels']}" if task.get("labels") else "") + ".",
        f"Data: {results['sizes']['train']} train / {results['sizes']['dev']} dev / {results['sizes']['test']} test "
        f"examples" + "".join(f", {k} `{v}`" for k, v in (results["data"] or {}).items() if v not in (None, "None"))
        + ".",
        f"Budget: {budget}, batch {s['batch_size']}, {s['seeds']} seed(s), learning rate "
        f"{s['lr'] if s.get('lr') else 'per-method default'}; PEFT runs use the same steps, lr, schedule and batches.",
        f"Machine: {m['processor']}, {m['cpu_count']} CPUs ({m['torch_threads']} torch threads), device {m['device']}"
        f"{', ' + m['gpu'] if m.get('gpu') else ''}; torch {m['torch']}, transformers {m['transformers']}, "
        f"peft {m.get('peft')}; commit {m.get('commit')}.", *_load_warning(m), "",
        "## Results", "",
        f"Metrics are mean ± std over seeds; accuracy/F1 in %. Latency: batch 1, median of repeats; +TTFT and "
        f"+ms/token are the adapter's cost over the bare model timed right beside it in the same run; "
        f"ours through the softprompts decode loop (soft prompts served as their KV), PEFT through transformers "
        f"`generate` (bare model through `generate`: TTFT {results['base_model'].get('latency_hf', {}).get('ttft_ms', float('nan')):.1f} ms, "
        f"{results['base_model'].get('latency_hf', {}).get('per_token_ms', float('nan')):.1f} ms/token). "
        f"Peak memory: {next(iter(results['runs']), {}).get('memory_measure', 'n/a')}.", "",
        *_table(results), "",
    ]
    if results["peft_comparison"]:
        lines += ["## Side by side with Hugging Face PEFT", "", *results["peft_comparison"], ""]
    lines += ["## Plots", "", *[f"![{p}]({p})" for p in plots], ""]
    lines += ["## Recommendation", "", *results["recommendation"]["text"], ""]
    return "\n".join(lines)


def write_report(results: dict, out_dir: str | Path) -> Path:
    """Plots (PNG) and report.md into ``out_dir``."""
    from softprompts.compare.plots import write_plots

    out_dir = Path(out_dir)
    plots = write_plots(results, out_dir)
    path = out_dir / "report.md"
    path.write_text(render_report(results, plots))
    return path
