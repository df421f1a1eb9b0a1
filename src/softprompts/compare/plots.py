"""PNG plots of a compare (matplotlib, Agg backend, no display needed).

learning_curves.png: dev metric and training loss against steps and against training seconds (one line per run).
quality_vs_size.png: test (or best dev) metric against saved adapter bytes (log scale), ± seed std, no-adapter line.
latency.png: time to first token and per further token, without and with each adapter (few-shot: demonstrations in
the prompt, and cached as a KV prefix).
quality_vs_context.png: test (or best dev) metric against the positions each request carries besides its own prompt
(a method's virtual tokens, the few-shot demonstrations' tokens): what "no training" costs per request.
"""

from __future__ import annotations

from pathlib import Path

SCALES = {"accuracy": 100.0, "macro_f1": 100.0}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _smooth(values: list[float], window: int = 5) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def learning_curves(results: dict, path: Path) -> None:
    plt = _plt()
    primary = results["primary_metric"]
    scale = SCALES.get(primary, 1.0)
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for run in results["runs"]:
        if "error" in run:
            continue
        label = f"{'peft:' if run['impl'] == 'peft' else ''}{run['method']} s{run['seed']}"
        style = "--" if run["impl"] == "peft" else "-"
        dev = [p for p in run["curve"] if p.get(f"dev_{primary}") is not None]
        loss = [p for p in run["curve"] if p.get("loss") is not None]
        for col, x in enumerate(("step", "seconds")):
            if dev:
                axes[0, col].plot([p[x] for p in dev], [p[f"dev_{primary}"] * scale for p in dev], style,
                                  marker="o", ms=3, label=label)
            if loss:
                axes[1, col].plot([p[x] for p in loss], _smooth([p["loss"] for p in loss]), style, label=label)
    for col, x in enumerate(("steps", "training seconds")):
        axes[0, col].set(xlabel=x, ylabel=f"dev {primary}", title=f"dev {primary} vs {x}")
        axes[1, col].set(xlabel=x, ylabel="training loss (smoothed)", title=f"loss vs {x}")
    if axes[0, 0].get_legend_handles_labels()[0]:
        axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def quality_vs_size(results: dict, path: Path) -> None:
    plt = _plt()
    primary = results["primary_metric"]
    scale = SCALES.get(primary, 1.0)
    fig, ax = plt.subplots(figsize=(7, 5))
    for label, m in results["methods"].items():
        q = m["test"].get(primary) or m["best_dev"]
        if not q or not m.get("adapter_bytes"):
            continue
        marker = {"peft": "s", "fewshot": "^"}.get(m["impl"], "o")
        label = f"{label} (KV of k={m['fewshot']['shots_text']})" if m["impl"] == "fewshot" else label
        ax.errorbar(m["adapter_bytes"], q["mean"] * scale, yerr=q["std"] * scale, fmt=marker, capsize=3, label=label)
        ax.annotate(label, (m["adapter_bytes"], q["mean"] * scale), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    base = (results["base_model"].get("test") or results["base_model"].get("dev") or {}).get(primary)
    if base is not None:
        ax.axhline(base * scale, color="gray", ls=":", label="no adapter")
    ax.set_xscale("log")
    ax.set(xlabel="saved adapter size (bytes, log)", ylabel=primary, title=f"{primary} vs adapter size")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def latency(results: dict, path: Path) -> None:
    plt = _plt()
    names, ttft, per_token = ["no adapter"], [], []
    base = results["base_model"]
    ttft.append(base["latency"]["ttft_ms"])
    per_token.append(base["latency"]["per_token_ms"])
    if base.get("latency_hf"):
        names.append("no adapter (HF generate)")
        ttft.append(base["latency_hf"]["ttft_ms"])
        per_token.append(base["latency_hf"]["per_token_ms"])
    for label, m in results["methods"].items():
        if m.get("ttft_ms"):
            names.append(f"{label} (in the prompt)" if m.get("fewshot") else label)
            ttft.append(m["ttft_ms"]["mean"])
            per_token.append(m["per_token_ms"]["mean"])
        if (m.get("fewshot") or {}).get("cached_ttft_ms"):
            names.append(f"{label} (cached KV)")
            ttft.append(m["fewshot"]["cached_ttft_ms"]["mean"])
            per_token.append(m["fewshot"]["cached_per_token_ms"]["mean"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    panels = ((axes[0], ttft, "time to first token (ms)"), (axes[1], per_token, "per further token (ms)"))
    for ax, values, title in panels:
        ax.bar(range(len(names)), values, color=["gray" if n.startswith("no adapter") else "C0" for n in names])
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _extra_positions(m: dict) -> float | None:
    """Positions a request carries for this entry: its virtual tokens, or the few-shot demonstrations' tokens."""
    if m.get("fewshot"):
        return m["fewshot"]["demo_tokens"]["mean"] if m["fewshot"]["demo_tokens"] else None
    return m.get("virtual_tokens")


def quality_vs_context(results: dict, path: Path) -> None:
    plt = _plt()
    primary = results["primary_metric"]
    scale = SCALES.get(primary, 1.0)
    fig, ax = plt.subplots(figsize=(7, 5))
    for label, m in results["methods"].items():
        q, x = m["test"].get(primary) or m["best_dev"], _extra_positions(m)
        if not q or x is None:
            continue
        marker = {"peft": "s", "fewshot": "^"}.get(m["impl"], "o")
        label = f"{label} k={m['fewshot']['shots_text']}" if m.get("fewshot") else label
        ax.errorbar(x, q["mean"] * scale, yerr=q["std"] * scale, fmt=marker, capsize=3, label=label)
        ax.annotate(label, (x, q["mean"] * scale), textcoords="offset points", xytext=(4, 4), fontsize=8)
    base = (results["base_model"].get("test") or results["base_model"].get("dev") or {}).get(primary)
    if base is not None:
        ax.axhline(base * scale, color="gray", ls=":", label="no adapter")
    ax.set(xlabel="extra positions per request (virtual tokens / demonstration tokens)", ylabel=primary,
           title=f"{primary} vs what each request carries")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


PLOTS = {"learning_curves.png": learning_curves, "quality_vs_size.png": quality_vs_size, "latency.png": latency,
         "quality_vs_context.png": quality_vs_context}


def write_plots(results: dict, out_dir: Path) -> list[str]:
    """Write every plot; returns the file names written."""
    for name, fn in PLOTS.items():
        fn(results, Path(out_dir) / name)
    return list(PLOTS)
