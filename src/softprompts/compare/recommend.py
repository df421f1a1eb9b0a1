"""The recommendation and the PEFT comparison of a compare, computed from the aggregated numbers, and the number
formatting the report shares with them.

Noise: a quality gap ``d = mean_a - mean_b`` is measured in standard errors of the difference,
``SE = sqrt(s_a^2 / k_a + s_b^2 / k_b)`` over ``k`` seeds with sample std ``s`` (Welch's), or with one seed and an
accuracy metric ``SE = sqrt(p_a (1 - p_a) / n + p_b (1 - p_b) / n)`` (binomial, ``n`` test examples); otherwise the
text says it cannot be compared to noise. ``d >= 2 SE`` is called a real difference (about 95 % under a normal
approximation; with 3 seeds Student's t asks for about 2.8 SE, so 2-2.8 SE is suggestive rather than certain),
anything less a tie, and then the smaller adapter is recommended.
"""

from __future__ import annotations

import math
import statistics

from softprompts.metrics import binomial_difference_se

SCALES = {"accuracy": 100.0, "macro_f1": 100.0}  # shown as percentages; generation metrics are already 0-100


def stats(values: list) -> dict | None:
    """Mean, sample std, count and the values of the finite numbers among ``values`` (None when there are none)."""
    values = [v for v in values if isinstance(v, int | float) and math.isfinite(v)]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def quality(entry: dict, primary: str) -> dict | None:
    """The number a method is judged by: test primary metric, or best dev when there is no test set."""
    return entry["test"].get(primary) or entry["best_dev"]


def fmt_metric(value: float | None, metric: str) -> str:
    return "n/a" if value is None else f"{value * SCALES.get(metric, 1.0):.1f}"


def fmt_stat(stat: dict | None, metric: str) -> str:
    if not stat:
        return "n/a"
    scale = SCALES.get(metric, 1.0)
    return f"{stat['mean'] * scale:.1f}" + (f" ± {stat['std'] * scale:.1f}" if stat["n"] > 1 else "")


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


REAL_DIFFERENCE_SE = 2.0  # a gap of at least this many standard errors of the difference is called real


def _difference_se(a: dict, b: dict, primary: str, test_n: int) -> tuple[float | None, str]:
    """Standard error of the difference of a's and b's mean quality (unscaled), and how it was obtained."""
    if a["n"] > 1 and b["n"] > 1:
        return (math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"]),
                f"over {min(a['n'], b['n'])} seeds")
    if primary == "accuracy" and test_n:
        return binomial_difference_se(a["mean"], b["mean"], test_n), f"binomial, {test_n} test examples"
    return None, ""


def _within_noise(a: dict, b: dict, primary: str, test_n: int) -> bool:
    se, _ = _difference_se(a, b, primary, test_n)
    return se is not None and a["mean"] - b["mean"] < REAL_DIFFERENCE_SE * se


def recommend(methods: dict[str, dict], base: dict, primary: str, test_n: int) -> dict:
    """The recommendation, as sentences and as structured fields, from our methods' numbers."""
    ours = {k: v for k, v in methods.items() if v["impl"] == "softprompts" and quality(v, primary)}
    if not ours:
        finished = any(v["impl"] == "softprompts" and v["failed"] < v["seeds"] for v in methods.values())
        why = ("no quality was measured: give --eval-data and/or --test-data (or --dataset)" if finished
               else "no run of ours finished")
        return {"text": [f"No recommendation: {why}."], "winner": None}
    scale, unit = SCALES.get(primary, 1.0), (" points" if primary in SCALES else "")
    ranked = sorted(ours, key=lambda k: quality(ours[k], primary)["mean"], reverse=True)
    best, lines = ranked[0], []
    qb = quality(ours[best], primary)
    where = "test" if ours[best]["test"].get(primary) else "best dev"
    lines.append(f"**Quality:** `{best}` is best on {where} {primary} ({fmt_stat(qb, primary)}).")
    winner = best
    tie = len(ranked) > 1 and _within_noise(qb, quality(ours[ranked[1]], primary), primary, test_n)
    if len(ranked) > 1:
        lines.append(_lead_line(ours, best, ranked[1], primary, test_n))
    base_q = (base.get("test") or base.get("dev") or {}).get(primary)
    if base_q is not None:
        gain = (qb["mean"] - base_q) * scale
        lines.append(f"The bare model (no adapter) scores {fmt_metric(base_q, primary)}: `{best}` "
                     f"{'adds' if gain >= 0 else 'loses'} {abs(gain):.1f}{unit}.")
    smallest = min(ours, key=lambda k: ours[k]["adapter_bytes"] or math.inf)
    sb, bb = ours[smallest]["adapter_bytes"], ours[best]["adapter_bytes"]
    if smallest == best:
        lines.append(f"**Size:** `{best}` is also the smallest saved adapter ({fmt_bytes(bb)}).")
    else:
        qsm = quality(ours[smallest], primary)
        lines.append(f"**Size:** `{smallest}` is the smallest saved adapter ({fmt_bytes(sb)}, {bb / sb:.1f}x smaller "
                     f"than `{best}` at {fmt_bytes(bb)}), scoring {fmt_stat(qsm, primary)} "
                     f"({(qb['mean'] - qsm['mean']) * scale:.1f}{unit} below `{best}`).")
        if _within_noise(qb, qsm, primary, test_n):
            winner = smallest
    lat = ours[best]
    if lat["ttft_ms"] and lat.get("ttft_overhead_ms"):
        lines.append(
            f"**Latency:** with `{best}` the first token takes {lat['ttft_ms']['mean']:.1f} ms "
            f"({lat['ttft_overhead_ms']['mean']:+.1f} ms vs the bare model timed beside it) and each further token "
            f"{lat['per_token_ms']['mean']:.1f} ms ({lat['per_token_overhead_ms']['mean']:+.1f} ms)."
        )
    lines += _kinds_line(ours, primary)
    if winner == best:
        why = "it has the best quality" + (" (though not by more than the noise)" if tie else "")
    else:
        why = f"it is within noise of `{best}` at {bb / sb:.1f}x smaller"
    few_lines, few_wins = weigh_fewshot(methods, best, primary, test_n)
    lines += few_lines
    if few_wins:
        winner, why = "fewshot", (f"demonstrations in the prompt match or beat the best trained method, `{best}`, "
                                  "with no training and no more positions per request (serve them as a KV prefix "
                                  "made from their text)")
    lines.append(f"**Recommendation: `{winner}`** — {why}.")
    lines += _against_lora(methods, ours[best], best, primary, test_n)
    if base_q is not None and base_q >= quality(methods[winner], primary)["mean"]:
        lines.append(f"**But:** the bare model without any adapter scores {fmt_metric(base_q, primary)}, at least as "
                     f"well as `{winner}`: with this budget no method pays off here (train longer, on more data, or "
                     "check the learning rate before adopting one).")
    return {"text": lines, "winner": winner, "best_quality": best, "smallest": smallest}


def _against_lora(methods: dict[str, dict], ours: dict, best: str, primary: str, test_n: int) -> list[str]:
    """When PEFT LoRA ran: whether it is the better choice, by the same noise rule (a real difference is LoRA's
    quality; a tie is the prompt method's size and batching)."""
    lora = methods.get("peft:lora")
    ql, qb = (quality(lora, primary) if lora else None), quality(ours, primary)
    if not ql or not qb:
        return []
    scale, unit = SCALES.get(primary, 1.0), (" points" if primary in SCALES else "")
    gap = (ql["mean"] - qb["mean"]) * scale
    size = (lora.get("adapter_bytes") or 0) / max(ours.get("adapter_bytes") or 1, 1)
    se, how = _difference_se(ql, qb, primary, test_n)
    if se is None:
        return [f"**Against LoRA:** LoRA scores {fmt_stat(ql, primary)}, {gap:+.1f}{unit} against `{best}`; no noise "
                "estimate to weigh that by (run --seeds 3)."]
    if gap / scale >= REAL_DIFFERENCE_SE * se:
        return [f"**When LoRA is the better choice:** here, for quality: LoRA scores {fmt_stat(ql, primary)}, "
                f"{gap:.1f}{unit} above `{best}`, a real difference ({gap / scale / se:.1f} standard errors, {how}). "
                f"Choose it when that matters more than a {size:.0f}x larger adapter that cannot share a batch with "
                "other tasks' adapters; else tune the prompt methods (`--tune N`) or train longer."]
    if -gap / scale >= REAL_DIFFERENCE_SE * se:
        return [f"**Against LoRA:** `{best}` scores {-gap:.1f}{unit} above LoRA ({fmt_stat(ql, primary)}), a real "
                f"difference ({-gap / scale / se:.1f} standard errors, {how}), with a {size:.0f}x smaller adapter that "
                "shares batches with other tasks' adapters: the prompt method is the better choice here (LoRA at "
                "this budget and learning rate did not reach it; `--tune N` tunes both alike)."]
    return [f"**Against LoRA:** LoRA ({fmt_stat(ql, primary)}) is within noise of `{best}` ({gap:+.1f}{unit}, "
            f"{abs(gap) / scale / se:.1f} standard errors, {how}): `{best}` gives that quality with a {size:.0f}x "
            "smaller adapter that shares batches with other tasks' adapters."]


def _lead_line(ours: dict[str, dict], best: str, second: str, primary: str, test_n: int) -> str:
    """How far ``best`` leads ``second``, in standard errors of the difference."""
    scale, unit = SCALES.get(primary, 1.0), (" points" if primary in SCALES else "")
    qb, qs = quality(ours[best], primary), quality(ours[second], primary)
    gap = (qb["mean"] - qs["mean"]) * scale
    se, how = _difference_se(qb, qs, primary, test_n)
    if se is None:
        verdict = "no seed spread to compare it with (run --seeds 3 to tell)"
    else:
        z = gap / max(se * scale, 1e-12)
        verdict = (f"{z:.1f} standard errors of the difference ({how}; SE {se * scale:.1f}): "
                   + ("a real difference" if z >= REAL_DIFFERENCE_SE else
                      f"under {REAL_DIFFERENCE_SE:.0f}, a tie on this data"))
    return f"It leads `{second}` by {gap:.1f}{unit}, {verdict}."


def _kinds_line(ours: dict[str, dict], primary: str) -> list[str]:
    """The best KV prefix against the best soft prompt, when both kinds ran."""
    kinds = _by_artifact(ours, primary)
    if "kv_prefix" not in kinds or "soft_prompt" not in kinds:
        return []
    scale, unit = SCALES.get(primary, 1.0), (" points" if primary in SCALES else "")
    (kp, p), (ks, s) = kinds["kv_prefix"], kinds["soft_prompt"]
    dq = (quality(p, primary)["mean"] - quality(s, primary)["mean"]) * scale
    return [f"**KV prefix vs soft prompt** (best of each): `{kp}` vs `{ks}`: {dq:+.1f}{unit} quality, "
            f"{(p['adapter_bytes'] or 0) / max(s['adapter_bytes'] or 1, 1):.1f}x the size, "
            f"{_delta(p, s, 'ttft')} ms first token, {_delta(p, s, 'per_token')} ms per token (adapter overheads)."]


def weigh_fewshot(methods: dict[str, dict], best: str, primary: str, test_n: int) -> tuple[list[str], bool]:
    """Is training worth it here? ``best`` (our best trained method) against k demonstrations in the prompt
    (``methods["fewshot"]``): quality by the same noise rule, and what every request carries for it (demonstration
    tokens vs ``P`` virtual tokens). Returns the lines and whether the demonstrations win by a real difference."""
    few = methods.get("fewshot")
    if not few or not few.get("fewshot") or not quality(few, primary):
        return [], False
    f, trained = few["fewshot"], methods[best]
    if not any(f["shots"]):
        return ["**Train at all?** Demonstrations in the prompt did not help: on dev no k beat k = 0, the bare model "
                "above."], False
    qf, qt = quality(few, primary), quality(trained, primary)
    scale, unit = SCALES.get(primary, 1.0), (" points" if primary in SCALES else "")
    tokens = f["demo_tokens"]["mean"] if f["demo_tokens"] else 0.0
    virtual = trained.get("virtual_tokens") or 0
    cached = (f", {f['cached_ttft_overhead_ms']['mean']:+.1f} ms with their KV cached"
              if f.get("cached_ttft_overhead_ms") else "")
    overhead = few["ttft_overhead_ms"]["mean"] if few.get("ttft_overhead_ms") else math.nan
    chosen = ", k chosen on dev" if f["chosen_by"] == "dev" else ""
    line = (f"**Train at all?** {f['shots_text']}-shot (no training{chosen}) reaches {fmt_stat(qf, primary)} at "
            f"+{tokens:.0f} prompt tokens per request (first token "
            f"{overhead:+.1f} ms over the bare model with the demonstrations in the prompt{cached}); `{best}` reaches "
            f"{fmt_stat(qt, primary)} at {virtual or 'its'} virtual tokens")
    gap = (qt["mean"] - qf["mean"]) * scale
    se, how = _difference_se(qt, qf, primary, test_n)
    if se is None:
        return [line + ": no noise estimate to weigh them by (run --seeds 3)."], False
    z = gap / max(se * scale, 1e-12)
    if z >= REAL_DIFFERENCE_SE:
        verdict = f"training pays off, {gap:.1f}{unit} better ({z:.1f} SE, {how})"
    elif z <= -REAL_DIFFERENCE_SE:
        verdict = f"the demonstrations win by {-gap:.1f}{unit} ({-z:.1f} SE, {how}): no training needed"
    elif tokens > virtual:
        verdict = (f"a tie ({z:+.1f} SE, {how}): what training buys is {tokens - virtual:.0f} fewer positions per "
                   "request, not quality")
    else:
        verdict = (f"a tie ({z:+.1f} SE, {how}), and the demonstrations take no more positions than its virtual "
                   "tokens: no training needed")
    tie = abs(z) < REAL_DIFFERENCE_SE
    return [f"{line}: {verdict}."], z <= -REAL_DIFFERENCE_SE or (tie and tokens <= virtual)


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
        kind = "soft_prompt" if kind == "offset_prompt" else kind  # DePT: a soft prompt at the input (+ offsets)
        if kind and (kind not in kinds or quality(entry, primary)["mean"] > quality(kinds[kind][1], primary)["mean"]):
            kinds[kind] = (label, entry)
    return kinds


def lora_ceiling(methods: dict[str, dict], primary: str) -> list[str]:
    """How far the best prompt method of ours is from PEFT LoRA (the weight adapter) in quality, size and latency."""
    lora = methods.get("peft:lora")
    if not lora or lora["failed"] == lora["seeds"] or not quality(lora, primary):
        return []
    ours = {k: v for k, v in methods.items() if v["impl"] == "softprompts" and quality(v, primary)}
    ql = quality(lora, primary)
    rank = lora.get("lora_rank") or 8  # results before ranks were recorded: LORA_OPTIONS' rank 8
    lines = [f"- LoRA (rank {rank} on every linear layer, {lora['adapter_params']:,} parameters, "
             f"{fmt_bytes(lora['adapter_bytes'])}): {fmt_stat(ql, primary)}."]
    if ours:
        best = max(ours, key=lambda k: quality(ours[k], primary)["mean"])
        qb, m = quality(ours[best], primary), ours[best]
        gap = (qb["mean"] - ql["mean"]) * SCALES.get(primary, 1.0)
        size = lora["adapter_params"] / max(m["adapter_params"], 1)
        lines.append(f"- The best prompt method, `{best}` ({fmt_stat(qb, primary)}), is {abs(gap):.1f}"
                     f"{' points' if primary in SCALES else ''} {'above' if gap >= 0 else 'below'} LoRA with "
                     f"{size:.1f}x fewer saved parameters ({m['adapter_params']:,}); unlike LoRA it can share one "
                     "batch with other tasks' adapters in `softprompts serve`.")
    return lines


def peft_comparison(methods: dict[str, dict], primary: str, counterparts: bool = False) -> list[str]:
    """One line per method run both ways: our quality vs PEFT's, and PEFT's detected failures; with
    ``counterparts`` (``--baseline peft``: each method through PEFT too), one for each of ours PEFT has none of."""
    lines = []
    for label, entry in methods.items():
        if entry["impl"] != "peft" or entry["method"] == "lora":
            continue
        ours = methods.get(entry["method"])
        if entry["failed"] == entry["seeds"]:
            lines.append(f"- `{label}`: failed ({'; '.join(entry['issues'])})")
            continue
        qp = quality(entry, primary)
        text = f"- `{entry['method']}`: PEFT {fmt_stat(qp, primary)}"
        if ours and quality(ours, primary):
            qo = quality(ours, primary)
            text += (f" vs ours {fmt_stat(qo, primary)} "
                     f"({(qo['mean'] - qp['mean']) * SCALES.get(primary, 1.0):+.1f} for ours)")
        if entry["issues"]:
            text += ". **Detected:** " + "; ".join(entry["issues"])
        lines.append(text + ".")
    if counterparts:  # name our methods PEFT has no counterpart of (--baseline lora alone runs none of them)
        lines += [f"- `{label}`: PEFT has no counterpart of this method (ours only)."
                  for label, entry in methods.items()
                  if entry["impl"] == "softprompts" and f"peft:{entry['method']}" not in methods]
    return lines


__all__ = ["SCALES", "fmt_bytes", "fmt_metric", "fmt_stat", "lora_ceiling", "peft_comparison", "quality", "recommend",
           "stats", "weigh_fewshot"]
