"""Where an adapter acts inside the model: ``softprompts explain`` and ``sp``'s ``explain`` (issue 36).

On ``N`` rows of the adapter's task, rendered as ``softprompts eval`` renders them (``evaluate``), both artifact kinds
are measured in the same units: a soft prompt is served as the KV prefix it produces (``FrozenBase.served``), so
both are a prefix of ``P`` virtual key/value positions in every one of the ``L`` layers.

1. **Attention share** per layer ``l``: the weight real-token queries put on the ``P`` virtual columns,
   ``share_l = mean_{rows, heads, real queries t} sum_{j virtual} softmax(q_t K^T / sqrt(d) + mask)_j``, read from the
   model's own eager attention (``output_attentions=True``; ``BaseModel.virtual_attention``), mean and standard
   deviation over rows and heads. A soft prompt served after a lead (BOS, a template's opening) counts only its own
   ``P`` positions, not the lead's.
2. **Layer ablation**: the task metric with the virtual columns hidden (mask ``-inf``, softmax weight exactly 0) in
   every layer outside a kept set (``BaseModel.hiding_virtual``): ``keep_first[k]`` keeps layers ``0..k``,
   ``keep_last[k]`` keeps ``k..L-1``. Keeping every layer is the adapter; keeping none is the bare model on a RoPE
   base (relative positions only: the real tokens sit ``P`` positions later, which rotary attention does not see; a
   base with absolute position embeddings, GPT-2, differs there by that shift).
3. **What the prefix holds**: for a soft prompt, each virtual token's nearest vocabulary tokens by cosine similarity
   in the input-embedding space (Lester et al. 2021); for every artifact, per layer the mean L2 norm of the prefix's
   keys and values against those real tokens produce in that layer (``text_to_kv`` of the rows' prompts).
4. A summary: trainable (``training.json`` beside the adapter, when present) and saved parameters, the layers that
   carry 90 % of the gain (the fewest first layers whose ``keep_first`` metric reaches
   ``none + 0.9 (all - none)``), and the share at the first, middle and last layer.

DePT (``OffsetPrompt``: a soft prompt + offsets ``A·B`` on the input embeddings of the prompt's first ``S`` tokens) is
served as its soft prompt's KV with the offsets on the real tokens, so 1-3 measure its soft part as they measure a soft
prompt's, the offsets kept on in every run (they act at the input, not in a layer's attention, so no layer ablation
reaches them: ``keep_first`` with no virtual column visible would be the offsets alone, not the bare model). What the
offsets do is measured on its own (``offsets_of``): the metric with the soft prompt alone (offsets removed) and with the
offsets alone (soft prompt removed), and the offsets' size against the embeddings they are added to,
``mean_i ||(A·B)_i|| / mean_i ||e(x_i)||`` over the rows' first ``S`` prompt tokens.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from softprompts.data.datasets import Example
from softprompts.errors import SoftpromptsError
from softprompts.evaluate import evaluate
from softprompts.files import atomic_json, atomic_text
from softprompts.metrics import PRIMARY_METRIC
from softprompts.model.artifacts import KVPrefix, OffsetPrompt, SoftPrompt
from softprompts.tasks import TaskSpec, prompt_ids


@dataclass(frozen=True)
class ExplainConfig:
    """How much to measure: ``limit`` rows, ``top_k`` nearest tokens per virtual token, batches for the metric runs,
    ``norm_rows`` rows whose real keys/values the prefix's norms are compared with, a progress bar or not."""

    limit: int = 50
    top_k: int = 5
    batch_size: int = 16
    max_new_tokens: int | None = None
    norm_rows: int = 8
    progress: bool = False

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise SoftpromptsError(f"--limit must be at least 1 (rows to explain on), got {self.limit}")
        if self.top_k < 1:
            raise SoftpromptsError(f"top_k must be at least 1, got {self.top_k}")


@dataclass
class Ablation:
    """The task metric with the adapter's KV in every layer (``all``), none (``none``), layers ``0..k``
    (``keep_first[k]``) and layers ``k..L-1`` (``keep_last[k]``)."""

    all: float
    none: float
    keep_first: list[float]
    keep_last: list[float]

    def carrying_layers(self, fraction: float = 0.9) -> int:
        """The fewest first layers whose metric reaches ``none + fraction * (all - none)`` (``L`` when no gain)."""
        goal = self.none + fraction * (self.all - self.none)
        for k, value in enumerate(self.keep_first):
            if self.all > self.none and value >= goal:
                return k + 1
        return len(self.keep_first)


@dataclass
class NearestToken:
    """A vocabulary token and its cosine similarity to a virtual token's embedding."""

    token: str
    id: int
    cosine: float


@dataclass
class Explanation:
    """What ``explain`` measured (``to_json`` is ``explain.json``)."""

    metric: str
    layers: int
    rows: int
    virtual_tokens: int
    artifact_kind: str
    attention_share: list[float]
    attention_share_std: list[float]
    ablation: Ablation
    key_norms: list[float]
    value_norms: list[float]
    real_key_norms: list[float]
    real_value_norms: list[float]
    nearest_tokens: list[list[NearestToken]] | None = None
    parameters: dict = field(default_factory=dict)
    offsets: OffsetsEffect | None = None  # DePT's offsets, measured apart (module docstring)

    def summary(self) -> dict:
        """The one-table comparison: parameters, layers carrying 90 % of the gain, share at first/middle/last."""
        share = self.attention_share
        return {**self.parameters, "layers_for_90pct_gain": self.ablation.carrying_layers(),
                "share_first": share[0], "share_middle": share[len(share) // 2], "share_last": share[-1]}

    def to_json(self) -> dict:
        out = asdict(self)
        out["summary"] = self.summary()
        for optional in ("nearest_tokens", "offsets"):
            if out[optional] is None:
                del out[optional]
        return out


@dataclass
class OffsetsEffect:
    """DePT's offsets apart from its soft prompt: ``positions`` (S) and ``rank`` (r); the metric with the soft
    prompt alone and with the offsets alone; ``norm_ratio``: the offsets' mean L2 norm over the mean norm of the
    embeddings they are added to (the rows' first ``S`` prompt tokens)."""

    positions: int
    rank: int
    metric_soft_prompt_alone: float
    metric_offsets_alone: float
    norm_ratio: float


def _prefix_of(served: KVPrefix | OffsetPrompt) -> KVPrefix:
    """The KV prefix a served artifact puts in front (a DePT adapter's: its soft prompt's)."""
    return served.prompt if isinstance(served, OffsetPrompt) else served


def offsets_of(base, adapter, examples: list[Example], spec: TaskSpec, prompts: list[list[int]],
               config: ExplainConfig) -> OffsetsEffect | None:
    """What a DePT adapter's offsets do (``OffsetsEffect``); ``None`` for another artifact."""
    raw = adapter.artifact
    if not isinstance(raw, OffsetPrompt):
        return None
    metric = PRIMARY_METRIC[spec.task]
    alone = OffsetPrompt(SoftPrompt(raw.embeds[:0]), raw.offsets)  # no virtual position: the offsets only
    soft_alone, offsets_alone = (
        evaluate(base, a, examples, spec, batch_size=config.batch_size, max_new_tokens=config.max_new_tokens)[metric]
        for a in (raw.prompt, alone))
    dense = raw.offsets.dense().to(base.device)  # [S, hidden]
    s = raw.offsets.positions
    embedded = [base.embed(torch.tensor(ids[:s], dtype=torch.long)).float() for ids in prompts]  # [min(S, T), hidden]
    offset_norm = torch.cat([dense[: e.shape[0]].norm(dim=-1) for e in embedded]).mean()
    embed_norm = torch.cat([e.norm(dim=-1) for e in embedded]).mean()
    rank = int(raw.offsets.a.shape[1])
    return OffsetsEffect(s, rank, soft_alone, offsets_alone, float(offset_norm / embed_norm))


def _served_rows(base, adapter, examples: list[Example], spec: TaskSpec
                 ) -> tuple[KVPrefix | OffsetPrompt, list[list[int]], int]:
    """``(served artifact: a KV prefix, or DePT's KV prefix + offsets; prompt ids per row, where the virtual columns
    start)``: the rows as ``evaluate`` runs them; every row must share one lead (one served prefix), which a
    template's rows do."""
    split = [prompt_ids(base, ex.prompt, spec) for ex in examples]
    leads = {lead for lead, _ in split}
    if len(leads) != 1:
        raise SoftpromptsError("explain needs rows whose virtual tokens sit after one shared lead; these rows place "
                               "them after different texts (a chat template whose system turn varies?)")
    served = base.served(adapter, next(iter(leads)))
    if not isinstance(_prefix_of(served), KVPrefix):
        raise SoftpromptsError(f"{base.name} does not serve this adapter as a KV prefix (an encoder-decoder model "
                               "reads a soft prompt in its encoder's input, where no virtual key/value columns "
                               "exist to probe): explain cannot measure it")
    return served, [ids for _, ids in split], served.length - adapter.artifact.length


def attention_shares(base, served: KVPrefix | OffsetPrompt, prompts: list[list[int]], start: int
                     ) -> tuple[list[float], list[float]]:
    """Per layer the mean and standard deviation over rows and heads of the share of attention real-token queries
    put on the columns ``start..P-1`` of ``served`` (one row per forward: no padding enters the average; DePT's
    offsets on the real tokens, as served)."""
    per_row = []
    for ids in prompts:
        ids_t = torch.tensor([ids], device=base.device)
        per_row.append(base.virtual_attention(served, ids_t, None, (start, served.length))[:, 0])  # [L, H]
    shares = torch.stack(per_row, dim=1).flatten(1)  # [L, rows * H]
    spread = shares.std(1) if shares.shape[1] > 1 else torch.zeros(shares.shape[0])
    return shares.mean(1).tolist(), spread.tolist()


def layer_ablation(base, adapter, examples: list[Example], spec: TaskSpec, columns: tuple[int, int],
                   config: ExplainConfig) -> Ablation:
    """The metric with the virtual ``columns`` visible only in layers ``0..k`` and only in ``k..L-1``, every k;
    ``all`` and ``none`` are ``evaluate``'s own runs with the adapter and without (what ``softprompts eval`` prints),
    the sweep runs with eager attention and the hiding mask (``keep_first[L-1]`` keeps every layer)."""
    from tqdm.auto import tqdm

    layers = base.shapes.num_layers
    metric = PRIMARY_METRIC[spec.task]
    ends = [evaluate(base, a, examples, spec, batch_size=config.batch_size, max_new_tokens=config.max_new_tokens)
            [metric] for a in (adapter, None)]
    runs = [set(range(k + 1)) for k in range(layers)] + [set(range(k, layers)) for k in range(layers)]
    values = [kept_metric(base, adapter, examples, spec, columns, kept, config)[metric]
              for kept in tqdm(runs, desc="layer ablation", unit="run", disable=not config.progress)]
    return Ablation(ends[0], ends[1], values[:layers], values[layers:])


def kept_metric(base, adapter, examples: list[Example], spec: TaskSpec, columns: tuple[int, int], kept: set[int],
                config: ExplainConfig) -> dict:
    """``evaluate``'s metrics with the adapter's virtual ``columns`` hidden in every layer not in ``kept``."""
    hidden = set(range(base.shapes.num_layers)) - kept
    with base.hiding_virtual(columns, hidden):
        return evaluate(base, adapter, examples, spec, batch_size=config.batch_size,
                        max_new_tokens=config.max_new_tokens)


def nearest_tokens(base, prompt: SoftPrompt | OffsetPrompt, top_k: int = 5) -> list[list[NearestToken]]:
    """For each virtual token ``E_i`` the ``top_k`` vocabulary tokens ``v`` of highest ``cos(E_i, e_v)`` in the
    input-embedding matrix ``[V, hidden]``."""
    table = base.model.get_input_embeddings().weight.detach().float()
    soft = prompt.embeds.detach().float().to(table.device)
    cosine = torch.nn.functional.normalize(soft, dim=-1) @ torch.nn.functional.normalize(table, dim=-1).T  # [P, V]
    values, ids = cosine.topk(min(top_k, table.shape[0]), dim=-1)
    return [[NearestToken(base.tokenizer.decode([int(i)]), int(i), round(float(v), 4))
             for v, i in zip(vr, ir, strict=True)] for vr, ir in zip(values, ids, strict=True)]


def _mean_norms(kv: KVPrefix, start: int = 0) -> tuple[list[float], list[float]]:
    """Per layer the mean L2 norm over heads and positions ``start..`` of the keys and of the values."""
    keys = [float(k[:, start:].float().norm(dim=-1).mean()) for k in kv.keys]
    values = [float(v[:, start:].float().norm(dim=-1).mean()) for v in kv.values]
    return keys, values


def kv_norms(base, served: KVPrefix | OffsetPrompt, prompts: list[list[int]], start: int, rows: int
             ) -> tuple[list[float], ...]:
    """``(prefix key norms, prefix value norms, real key norms, real value norms)`` per layer: the virtual columns'
    against the KV the first ``rows`` prompts produce (``text_to_kv``), averaged over those rows."""
    keys, values = _mean_norms(_prefix_of(served), start)
    real = [_mean_norms(base.text_to_kv(ids)) for ids in prompts[:rows]]
    real_keys = torch.tensor([r[0] for r in real]).mean(0).tolist()
    real_values = torch.tensor([r[1] for r in real]).mean(0).tolist()
    return keys, values, real_keys, real_values


def parameters_of(adapter, adapter_dir: str | Path | None) -> dict:
    """Saved parameters (the artifact's numbers) and, from ``training.json`` beside the adapter, trainable ones."""
    out = {"saved_parameters": adapter.artifact.num_parameters()}
    record = Path(adapter_dir) / "training.json" if adapter_dir is not None else None
    if record is not None and record.is_file():
        out["trainable_parameters"] = json.loads(record.read_text()).get("trainable_parameters")
    return out


def explain(base, adapter, examples: list[Example], spec: TaskSpec, config: ExplainConfig | None = None,
            adapter_dir: str | Path | None = None) -> Explanation:
    """Measure where ``adapter`` acts in ``base`` on the first ``config.limit`` of ``examples`` (module docstring)."""
    config = config or ExplainConfig()
    base.require("layer_probe")
    examples = examples[: config.limit]
    if not examples:
        raise SoftpromptsError("explain needs at least one row of data")
    served, prompts, start = _served_rows(base, adapter, examples, spec)
    share, spread = attention_shares(base, served, prompts, start)
    ablation = layer_ablation(base, adapter, examples, spec, (start, served.length), config)
    norms = kv_norms(base, served, prompts, start, config.norm_rows)
    raw = adapter.artifact
    nearest = nearest_tokens(base, raw, config.top_k) if isinstance(raw, SoftPrompt | OffsetPrompt) else None
    return Explanation(PRIMARY_METRIC[spec.task], base.shapes.num_layers, len(examples), raw.length, raw.kind, share,
                       spread, ablation, *norms, nearest_tokens=nearest,
                       parameters=parameters_of(adapter, adapter_dir),
                       offsets=offsets_of(base, adapter, examples, spec, prompts, config))


def write_report(explanation: Explanation, out_dir: str | Path, title: str = "adapter") -> list[Path]:
    """``explain.json``, ``explain.md`` and the plots (``attention_share.png``, ``layer_ablation.png``,
    ``kv_norms.png``) in ``out_dir``; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_json(out / "explain.json", explanation.to_json())
    atomic_text(out / "explain.md", render_markdown(explanation, title))
    return [out / "explain.json", out / "explain.md", *plot(explanation, out)]


def render_markdown(e: Explanation, title: str) -> str:
    """The report: summary table, per-layer table, nearest tokens of a soft prompt."""
    s = e.summary()
    lines = [f"# Where {title} acts ({e.artifact_kind}, {e.virtual_tokens} virtual tokens, {e.rows} rows)", "",
             "| saved params | trainable params | layers for 90 % of the gain | share first | share middle | "
             "share last | metric all | metric none |", "|---|---|---|---|---|---|---|---|",
             f"| {s['saved_parameters']} | {s.get('trainable_parameters', '-')} | {s['layers_for_90pct_gain']} of "
             f"{e.layers} | {s['share_first']:.3f} | {s['share_middle']:.3f} | {s['share_last']:.3f} | "
             f"{e.ablation.all:.4f} | {e.ablation.none:.4f} |", "",
             f"Metric: {e.metric}. Attention share: the weight real-token queries put on the virtual positions "
             "(eager attention, mean ± std over rows and heads). keep first k: the virtual KV kept in layers 0..k "
             "only; keep last k: in k..L-1 only.", "",
             "| layer | attention share | ± | keep first | keep last | key norm (virtual / real) | "
             "value norm (virtual / real) |", "|---|---|---|---|---|---|---|"]
    for k in range(e.layers):
        lines.append(f"| {k} | {e.attention_share[k]:.3f} | {e.attention_share_std[k]:.3f} | "
                     f"{e.ablation.keep_first[k]:.4f} | {e.ablation.keep_last[k]:.4f} | "
                     f"{e.key_norms[k]:.2f} / {e.real_key_norms[k]:.2f} | "
                     f"{e.value_norms[k]:.2f} / {e.real_value_norms[k]:.2f} |")
    if e.offsets is not None:
        o = e.offsets
        lines += ["", f"## The embedding offsets (DePT: S = {o.positions}, rank {o.rank}; kept on in every run above)",
                  "", f"- {e.metric} with the soft prompt alone (offsets removed): {o.metric_soft_prompt_alone:.4f}",
                  f"- {e.metric} with the offsets alone (soft prompt removed): {o.metric_offsets_alone:.4f}",
                  f"- offset norm / embedding norm on the prompts' first S tokens: {o.norm_ratio:.3f}"]
    if e.nearest_tokens is not None:
        lines += ["", "## Nearest vocabulary tokens of each virtual token (cosine, input embeddings)", ""]
        for i, tokens in enumerate(e.nearest_tokens):
            lines.append(f"- {i}: " + ", ".join(f"`{t.token!r}` {t.cosine:.3f}" for t in tokens))
    return "\n".join(lines) + "\n"


def plot(e: Explanation, out: Path) -> list[Path]:
    """Three PNGs: attention share per layer (with its spread), the ablation curves, the KV norms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(range(e.layers))
    share, spread = torch.tensor(e.attention_share), torch.tensor(e.attention_share_std)
    figures = {
        "attention_share.png": [("attention share on virtual positions", e.attention_share, (share - spread).clamp(0),
                                 (share + spread).clamp(max=1))],
        "layer_ablation.png": [(f"{e.metric}, keep layers 0..k", e.ablation.keep_first, None, None),
                               (f"{e.metric}, keep layers k..L-1", e.ablation.keep_last, None, None)],
        "kv_norms.png": [("virtual key norm", e.key_norms, None, None), ("real key norm", e.real_key_norms, None, None),
                         ("virtual value norm", e.value_norms, None, None),
                         ("real value norm", e.real_value_norms, None, None)],
    }
    paths = []
    for name, curves in figures.items():
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for label, ys, low, high in curves:
            ax.plot(layers, ys, marker="o", label=label)
            if low is not None:
                ax.fill_between(layers, low.tolist(), high.tolist(), alpha=0.2)
        if name == "layer_ablation.png":
            ax.axhline(e.ablation.all, linestyle="--", color="gray", label="all layers")
            ax.axhline(e.ablation.none, linestyle=":", color="gray", label="no layer (bare)")
        ax.set_xlabel("layer")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        paths.append(out / name)
    return paths


__all__ = ["Ablation", "ExplainConfig", "Explanation", "NearestToken", "OffsetsEffect", "attention_shares", "explain",
           "kept_metric", "kv_norms", "layer_ablation", "nearest_tokens", "offsets_of", "write_report"]
