"""The few-shot baseline in results.json and report.md: its numbers over seeds, its rows in the results table and
its own section (what k, from where, and what every request pays for the demonstrations, in the prompt or cached).
"""

from __future__ import annotations

from softprompts.compare.recommend import SCALES, fmt_bytes, fmt_stat
from softprompts.compare.recommend import stats as _stats


def _cached_overhead(run: dict, key: str) -> float | None:
    cached, bare = run["fewshot"].get("latency_cached"), run.get("latency_bare")
    return cached[key] - bare[key] if cached and bare else None


def summarize(runs: list[dict]) -> dict:
    """Over seeds (finished runs): k per seed, how it was chosen, tokens, KV bytes, context and cached latency."""
    fs = [r["fewshot"] for r in runs]
    first = fs[0]
    shots = [f["shots"] for f in fs]
    return {
        "shots": shots, "shots_text": " / ".join(dict.fromkeys(map(str, shots))), "chosen_by": first["chosen_by"],
        "dev_by_shots": [f["dev_by_shots"] for f in fs], "skipped": first["skipped"],
        "dev_predictions": [f.get("dev_predictions") or {} for f in fs],
        "test_predictions": [f.get("test_predictions") for f in fs],
        "label_counts": first["label_counts"], "eligible_rows": first["eligible_rows"],
        "left_out_repeats": first["left_out_repeats"],
        **{key: _stats([f[key] for f in fs]) for key in ("demo_tokens", "prompt_tokens", "bare_prompt_tokens",
                                                          "kv_bytes_per_request", "bare_kv_bytes_per_request",
                                                          "prefix_kv_bytes", "context_left")},
        "context_limit": first["context_limit"],
        "cached_ttft_ms": _stats([(f.get("latency_cached") or {}).get("ttft_ms") for f in fs]),
        "cached_per_token_ms": _stats([(f.get("latency_cached") or {}).get("per_token_ms") for f in fs]),
        "cached_ttft_overhead_ms": _stats([_cached_overhead(r, "ttft_ms") for r in runs]),
        "cached_per_token_overhead_ms": _stats([_cached_overhead(r, "per_token_ms") for r in runs]),
        "check_rows": sum(f["check"]["rows"] for f in fs),
        "check_max_abs_logprob_diff": max((f["check"].get("max_abs_logprob_diff", 0.0) for f in fs), default=0.0),
        "check_one_string": sum(f["check"].get("one_string_tokenizes_the_same", 0) for f in fs),
    }


def _ms(stat: dict | None, fmt: str = "{:.1f}") -> str:
    return fmt.format(stat["mean"]) if stat else "n/a"


def table_rows(label: str, m: dict, metrics: list[str], primary: str) -> list[list[str]]:
    """The results table's rows: the demonstrations in the prompt, and (when the base caches them) as a KV prefix."""
    f = m["fewshot"]
    quality = [fmt_stat(m["best_dev"], primary)] + [fmt_stat(m["test"].get(k), k) for k in metrics]
    peak = fmt_bytes(m["peak_memory_bytes"]["mean"]) if m["peak_memory_bytes"] else "n/a"
    tokens = f"{_ms(f['demo_tokens'], '{:.0f}')} tokens"
    rows = [[f"{label} (k={f['shots_text']}, in the prompt)", "0", "0", tokens, *quality, "0", "n/a", peak,
             _ms(m["ttft_ms"]), _ms(m["per_token_ms"]), _ms(m["ttft_overhead_ms"], "{:+.1f}"),
             _ms(m["per_token_overhead_ms"], "{:+.1f}")]]
    if f["cached_ttft_ms"]:
        rows.append([f"{label} (k={f['shots_text']}, cached KV prefix)", "0", "0",
                     f"{fmt_bytes(m['adapter_bytes'])} KV", *quality, "0", "n/a", peak, _ms(f["cached_ttft_ms"]),
                     _ms(f["cached_per_token_ms"]), _ms(f["cached_ttft_overhead_ms"], "{:+.1f}"),
                     _ms(f["cached_per_token_overhead_ms"], "{:+.1f}")])
    return rows


def _dev_line(f: dict, primary: str) -> str:
    scale = SCALES.get(primary, 1.0)
    per_seed = ["; ".join(f"k={k}: {v * scale:.1f}" if v is not None else f"k={k}: n/a" for k, v in d.items())
                for d in f["dev_by_shots"]]
    if f["chosen_by"] != "dev":
        return f"- k = {f['shots_text']}, fixed by --shots (dev {primary}: {' | '.join(per_seed)})."
    return (f"- k = {f['shots_text']}, chosen on dev ({primary} per k, per seed: {' | '.join(per_seed)}); a tie goes "
            "to fewer shots.")


def _counts(counts: dict) -> str:
    return ", ".join(f"{label} {n}" for label, n in counts.items())


def _predictions_line(f: dict) -> list[str]:
    """Classification: how often each label was predicted, per k on dev and at the chosen k on test (seed 0).
    Demonstrations can pull almost every answer to one label (in-context learning's majority / recency bias)."""
    dev, test = f["dev_predictions"][0], f["test_predictions"][0]
    if not dev and not test:
        return []
    parts = [f"k={k}: {_counts(c)}" for k, c in dev.items()]
    chosen = f"; test at k={f['shots'][0]}: {_counts(test)}" if test else ""
    return [f"- Predicted labels (seed 0), dev per k: {'; '.join(parts) or 'n/a'}{chosen}."]


def section(results: dict) -> list[str]:
    """report.md's few-shot section (empty without the baseline)."""
    m = results["methods"].get("fewshot")
    if not m or m["failed"] == m["seeds"]:
        return []
    f, primary = m["fewshot"], results["primary_metric"]
    lines = ["## Few-shot in the prompt (no training)", "", _dev_line(f, primary)]
    lines += [f"- Skipped k={k}: {why}" for k, why in f["skipped"].items()]
    lines += _predictions_line(f)
    counts = f" (labels {f['label_counts']})" if f["label_counts"] else ""
    lines.append(f"- Demonstrations from the training split only{counts}: {f['eligible_rows']} rows could be drawn, "
                 f"{f['left_out_repeats']} left out because their prompt repeats a dev or test prompt; dev rows only "
                 "choose k, test rows only score.")
    lines.append(f"- Every request carries {_ms(f['demo_tokens'], '{:.0f}')} demonstration tokens: "
                 f"{_ms(f['prompt_tokens'], '{:.0f}')} prompt tokens per request vs "
                 f"{_ms(f['bare_prompt_tokens'], '{:.0f}')} without; KV per request "
                 f"{fmt_bytes((f['kv_bytes_per_request'] or {}).get('mean'))} vs "
                 f"{fmt_bytes((f['bare_kv_bytes_per_request'] or {}).get('mean'))}; context left for the row and "
                 f"its answer {_ms(f['context_left'], '{:.0f}')} of {f['context_limit']} positions.")
    if not any(f["shots"]):
        lines.append("- k = 0: no demonstrations beat none on dev; the few-shot rows are the bare model's.")
    elif f["cached_ttft_ms"]:
        lines.append(f"- Cached as a KV prefix made from their text (once, {fmt_bytes(m['adapter_bytes'])}): first "
                     f"token {_ms(f['cached_ttft_ms'])} ms vs {_ms(m['ttft_ms'])} ms with the demonstrations in the "
                     f"prompt ({_ms(f['cached_ttft_overhead_ms'], '{:+.1f}')} vs "
                     f"{_ms(m['ttft_overhead_ms'], '{:+.1f}')} ms over the bare model); per token "
                     f"{_ms(f['cached_per_token_ms'])} vs {_ms(m['per_token_ms'])} ms. Our decode batch still holds "
                     "the prefix in each row's cache: caching saves the prefill, not the KV memory.")
        lines.append(f"- Check: on {f['check_rows']} rows the answer's log-likelihood after the cached prefix differs "
                     f"from the demonstrations as prompt tokens by at most {f['check_max_abs_logprob_diff']:.1e} "
                     f"(float rounding); {f['check_one_string']}/{f['check_rows']} rows tokenize the same as one "
                     "string.")
    else:
        lines.append("- Not cached: this base's served form of text is not a KV prefix (an encoder reads the "
                     "demonstrations together with each row), so every request prefills them.")
    return lines + [""]


__all__ = ["section", "summarize", "table_rows"]
