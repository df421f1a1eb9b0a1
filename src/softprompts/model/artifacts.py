"""The two things every method produces and the injection point consumes.

A method never reaches the model itself: it materializes into one of two artifacts.

* ``SoftPrompt``: ``embeds`` of shape ``[P, hidden]``, concatenated in front of the token embeddings
  (``inputs_embeds``). Positions ``0..P-1`` belong to it; real tokens start at position ``P``.
* ``KVPrefix``: for every layer ``l`` a key and a value tensor of shape ``[H_l, P, D_l]`` (``H_l`` key/value heads,
  ``D_l`` head dim, as probed from the model, so GQA and per-layer sizes are covered). They are placed in the
  model's cache, as if ``P`` tokens at positions ``0..P-1`` had been processed; real tokens start at position ``P``.

Both conventions put real tokens at position ``P``, so a soft prompt and the KV it produces are interchangeable
(``BaseModel.soft_prompt_to_kv``). Artifacts are plain data: they may require grad during training (the method's
forward builds them from its parameters) and are detached when materialized for saving or serving.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SoftPrompt:
    """Virtual input embeddings ``embeds: [P, hidden]``."""

    embeds: torch.Tensor

    kind = "soft_prompt"

    @property
    def length(self) -> int:
        return int(self.embeds.shape[0])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"soft_prompt": self.embeds}

    def detached(self, dtype: torch.dtype | None = None) -> SoftPrompt:
        return SoftPrompt(self.embeds.detach().to(dtype or self.embeds.dtype).clone().contiguous())

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SoftPrompt:
        return SoftPrompt(self.embeds.to(device=device, dtype=dtype))

    def num_parameters(self) -> int:
        return self.embeds.numel()


@dataclass
class KVPrefix:
    """Per-layer key/value prefix: ``keys[l], values[l]: [H_l, P, D_l]``."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    kind = "kv_prefix"

    def __post_init__(self) -> None:
        if len(self.keys) != len(self.values):
            raise ValueError(
                f"KVPrefix needs as many key as value tensors, got {len(self.keys)} and {len(self.values)}")
        lengths = {int(k.shape[-2]) for k in self.keys} | {int(v.shape[-2]) for v in self.values}
        if len(lengths) > 1:
            raise ValueError(f"every layer of a KVPrefix must have the same length, got {sorted(lengths)}")

    @property
    def length(self) -> int:
        return int(self.keys[0].shape[-2]) if self.keys else 0

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            out[f"layers.{i}.key"] = k
            out[f"layers.{i}.value"] = v
        return out

    def detached(self, dtype: torch.dtype | None = None) -> KVPrefix:
        def fix(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(dtype or t.dtype).clone().contiguous()

        return KVPrefix([fix(k) for k in self.keys], [fix(v) for v in self.values])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> KVPrefix:
        return KVPrefix(
            [k.to(device=device, dtype=dtype) for k in self.keys],
            [v.to(device=device, dtype=dtype) for v in self.values],
        )

    def num_parameters(self) -> int:
        return sum(k.numel() + v.numel() for k, v in zip(self.keys, self.values, strict=True))


Artifact = SoftPrompt | KVPrefix


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors holding a NaN or an infinity (an artifact that must never be saved or served)."""
    return [name for name, t in tensors.items() if not bool(torch.isfinite(t).all())]


def artifact_from_tensors(kind: str, tensors: dict[str, torch.Tensor]) -> Artifact:
    """Inverse of ``artifact.tensors()``; raises ``ValueError`` on a malformed tensor set."""
    if kind == SoftPrompt.kind:
        if set(tensors) != {"soft_prompt"}:
            raise ValueError(f"a soft prompt file holds exactly one tensor 'soft_prompt', found {sorted(tensors)}")
        embeds = tensors["soft_prompt"]
        if embeds.dim() != 2:
            raise ValueError(f"soft_prompt must be [P, hidden], got shape {tuple(embeds.shape)}")
        return SoftPrompt(embeds)
    if kind == KVPrefix.kind:
        n = len(tensors) // 2
        expected = {f"layers.{i}.{part}" for i in range(n) for part in ("key", "value")}
        if set(tensors) != expected:
            raise ValueError(
                f"a KV prefix file holds layers.<i>.key/value for i in 0..{n - 1}, found {sorted(tensors)[:6]}...")
        keys = [tensors[f"layers.{i}.key"] for i in range(n)]
        return KVPrefix(keys, [tensors[f"layers.{i}.value"] for i in range(n)])
    raise ValueError(f"unknown artifact kind {kind!r}; expected 'soft_prompt' or 'kv_prefix'")


@dataclass
class VirtualContext:
    """Per-row artifacts batched for one forward (the injection point reads it; a prompt table builds one per batch):
    any of the two parts may be absent; shorter rows are padded and their slots masked."""

    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer ([B, H_l, Pk, D_l], same for values)
    kv_mask: torch.Tensor | None = None  # [B, Pk]
    soft: torch.Tensor | None = None  # [B, Ps, hidden]
    soft_mask: torch.Tensor | None = None  # [B, Ps]

    @classmethod
    def broadcast(cls, artifact: Artifact | None, batch_size: int) -> VirtualContext:
        """The same artifact for every row (training, single-adapter evaluation). Keeps the autograd graph."""
        return cls.from_rows([artifact] * batch_size)

    @classmethod
    def from_rows(cls, artifacts: list[Artifact | None]) -> VirtualContext:
        """One artifact (or None) per row; shorter ones are padded and masked (left-aligned slots)."""
        batch = len(artifacts)
        prefixes = [a if isinstance(a, KVPrefix) else None for a in artifacts]
        softs = [a if isinstance(a, SoftPrompt) else None for a in artifacts]
        ctx = cls()
        if any(p is not None and p.length for p in prefixes):
            ref = next(p for p in prefixes if p is not None and p.length)
            pk = max(p.length for p in prefixes if p is not None)
            ctx.kv_mask = _slot_mask([p.length if p is not None else 0 for p in prefixes], pk, ref.keys[0].device)
            ctx.kv = []
            for layer in range(ref.num_layers):
                keys = _pad_stack(
                    [p.keys[layer] if p is not None else None for p in prefixes], ref.keys[layer], pk, batch
                )
                values = _pad_stack(
                    [p.values[layer] if p is not None else None for p in prefixes], ref.values[layer], pk, batch
                )
                ctx.kv.append((keys, values))
        if any(s is not None and s.length for s in softs):
            ref = next(s for s in softs if s is not None and s.length)
            ps = max(s.length for s in softs if s is not None)
            ctx.soft_mask = _slot_mask([s.length if s is not None else 0 for s in softs], ps, ref.embeds.device)
            rows = [s.embeds if s is not None else None for s in softs]
            ctx.soft = _pad_stack(rows, ref.embeds, ps, batch, seq_dim=0)
        return ctx

    @property
    def kv_length(self) -> int:
        return 0 if self.kv_mask is None else int(self.kv_mask.shape[1])

    @property
    def soft_length(self) -> int:
        return 0 if self.soft_mask is None else int(self.soft_mask.shape[1])


def _slot_mask(lengths: list[int], width: int, device: torch.device) -> torch.Tensor:
    slots = torch.arange(width, device=device)
    return (slots[None, :] < torch.tensor(lengths, device=device)[:, None]).long()  # [B, width]


def _pad_stack(
    rows: list[torch.Tensor | None], ref: torch.Tensor, width: int, batch: int, seq_dim: int = 1
) -> torch.Tensor:
    """Stack per-row tensors (``[H, p, D]`` or ``[p, hidden]``) into ``[B, ..., width, ...]``, zero-padded."""
    if all(r is ref for r in rows) and ref.shape[seq_dim] == width:
        return ref.unsqueeze(0).expand(batch, *ref.shape)  # same artifact everywhere: no copy, graph kept
    shape = list(ref.shape)
    shape[seq_dim] = width
    out = []
    for r in rows:
        if r is None:
            out.append(ref.new_zeros(shape))
            continue
        pad = width - r.shape[seq_dim]
        if pad:
            pad_shape = list(r.shape)
            pad_shape[seq_dim] = pad
            r = torch.cat([r, r.new_zeros(pad_shape)], dim=seq_dim)
        out.append(r)
    return torch.stack(out)
