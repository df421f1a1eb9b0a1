"""The things every method produces and the injection point consumes.

A method never reaches the model itself: it materializes into one of three artifacts.

* ``SoftPrompt``: ``embeds`` of shape ``[P, hidden]``, concatenated in front of the token embeddings
  (``inputs_embeds``). Positions ``0..P-1`` belong to it; real tokens start at position ``P``.
* ``KVPrefix``: for every layer ``l`` a key and a value tensor of shape ``[H_l, P, D_l]`` (``H_l`` key/value heads,
  ``D_l`` head dim, as probed from the model, so GQA and per-layer sizes are covered). They are placed in the
  model's cache, as if ``P`` tokens at positions ``0..P-1`` had been processed; real tokens start at position ``P``.

* ``OffsetPrompt`` (DePT): a ``SoftPrompt`` plus ``EmbeddingOffsets``, a low-rank ``[S, hidden]`` offset added to the
  input embeddings of the first ``S`` real tokens of the prompt (the conditioning input, never a target or generated
  token): real token ``i`` (``0``-based, counted from the first real token after the virtual positions) reads
  ``e(x_i) + (A·B)_i`` for ``i < min(S, prompt length)``. Saved as its two factors ``A [S, r]``, ``B [r, hidden]``.

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


@dataclass
class EmbeddingOffsets:
    """Per-position offsets of the prompt's input embeddings, stored factored: ``dense() = a @ b`` ``[S, hidden]``
    from ``a [S, r]`` and ``b [r, hidden]`` (``S`` positions, rank ``r``). Row ``i`` is added to the embedding of the
    prompt's ``i``-th real token (``VirtualContext.offset_embeds``)."""

    a: torch.Tensor
    b: torch.Tensor

    kind = "embedding_offsets"

    def __post_init__(self) -> None:
        if self.a.dim() != 2 or self.b.dim() != 2 or self.a.shape[1] != self.b.shape[0]:
            raise ValueError(f"embedding offsets need a [S, r] and b [r, hidden], got {tuple(self.a.shape)} and "
                             f"{tuple(self.b.shape)}")

    @property
    def positions(self) -> int:
        """``S``: how many of the prompt's first real tokens get an offset."""
        return int(self.a.shape[0])

    def dense(self) -> torch.Tensor:
        """``[S, hidden]`` float32: ``A·B``, computed in float32 whatever the storage dtype (training, scoring and
        serving add the same numbers)."""
        return self.a.float() @ self.b.float()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"offsets.a": self.a, "offsets.b": self.b}

    def detached(self, dtype: torch.dtype | None = None) -> EmbeddingOffsets:
        def fix(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(dtype or t.dtype).clone().contiguous()

        return EmbeddingOffsets(fix(self.a), fix(self.b))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> EmbeddingOffsets:
        return EmbeddingOffsets(self.a.to(device=device, dtype=dtype), self.b.to(device=device, dtype=dtype))

    def num_parameters(self) -> int:
        return self.a.numel() + self.b.numel()


@dataclass
class OffsetPrompt:
    """A soft prompt plus embedding offsets on the prompt's first real tokens (DePT): ``prompt`` is a ``SoftPrompt``
    ``[P, hidden]`` as saved, or in its served form on a decoder-only base the ``KVPrefix`` it produces (cached once
    per adapter: it does not depend on the input); ``offsets`` are the same in both forms."""

    prompt: SoftPrompt | KVPrefix
    offsets: EmbeddingOffsets

    kind = "offset_prompt"

    @property
    def length(self) -> int:
        """Virtual positions (the soft prompt's ``P``); offsets take none."""
        return self.prompt.length

    @property
    def embeds(self) -> torch.Tensor:
        """The soft prompt's ``[P, hidden]`` (what a soft prompt's readers look at: nearest tokens, placement)."""
        return self.prompt.embeds

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**self.prompt.tensors(), **self.offsets.tensors()}

    def detached(self, dtype: torch.dtype | None = None) -> OffsetPrompt:
        return OffsetPrompt(self.prompt.detached(dtype), self.offsets.detached(dtype))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> OffsetPrompt:
        return OffsetPrompt(self.prompt.to(device, dtype), self.offsets.to(device, dtype))

    def num_parameters(self) -> int:
        return self.prompt.num_parameters() + self.offsets.num_parameters()


Artifact = SoftPrompt | KVPrefix | OffsetPrompt
KINDS = (SoftPrompt.kind, KVPrefix.kind, OffsetPrompt.kind)


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors holding a NaN or an infinity (an artifact that must never be saved or served)."""
    return [name for name, t in tensors.items() if not bool(torch.isfinite(t).all())]


def _soft_prompt(tensors: dict[str, torch.Tensor]) -> SoftPrompt:
    embeds = tensors["soft_prompt"]
    if embeds.dim() != 2:
        raise ValueError(f"soft_prompt must be [P, hidden], got shape {tuple(embeds.shape)}")
    return SoftPrompt(embeds)


def artifact_from_tensors(kind: str, tensors: dict[str, torch.Tensor]) -> Artifact:
    """Inverse of ``artifact.tensors()``; raises ``ValueError`` on a malformed tensor set."""
    if kind == SoftPrompt.kind:
        if set(tensors) != {"soft_prompt"}:
            raise ValueError(f"a soft prompt file holds exactly one tensor 'soft_prompt', found {sorted(tensors)}")
        return _soft_prompt(tensors)
    if kind == OffsetPrompt.kind:
        names = {"soft_prompt", "offsets.a", "offsets.b"}
        if set(tensors) != names:
            raise ValueError(f"an offset prompt file holds exactly the tensors {sorted(names)}, "
                             f"found {sorted(tensors)}")
        prompt = _soft_prompt(tensors)
        offsets = EmbeddingOffsets(tensors["offsets.a"], tensors["offsets.b"])
        if offsets.b.shape[1] != prompt.embeds.shape[1]:
            raise ValueError(f"offsets.b is [r, {offsets.b.shape[1]}] but the soft prompt's hidden size is "
                             f"{prompt.embeds.shape[1]}")
        return OffsetPrompt(prompt, offsets)
    if kind == KVPrefix.kind:
        n = len(tensors) // 2
        expected = {f"layers.{i}.{part}" for i in range(n) for part in ("key", "value")}
        if set(tensors) != expected:
            raise ValueError(
                f"a KV prefix file holds layers.<i>.key/value for i in 0..{n - 1}, found {sorted(tensors)[:6]}...")
        keys = [tensors[f"layers.{i}.key"] for i in range(n)]
        return KVPrefix(keys, [tensors[f"layers.{i}.value"] for i in range(n)])
    raise ValueError(f"unknown artifact kind {kind!r}; expected one of {', '.join(map(repr, KINDS))}")


@dataclass
class VirtualContext:
    """Per-row artifacts batched for one forward (the injection point reads it; a prompt table builds one per batch):
    any of the three parts may be absent; shorter rows are padded and their slots masked. An ``OffsetPrompt`` row
    gives its soft prompt (or served KV) to ``soft`` (``kv``) and its dense offsets to ``offsets``; rows of other
    kinds have zero offsets there, masked out."""

    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer ([B, H_l, Pk, D_l], same for values)
    kv_mask: torch.Tensor | None = None  # [B, Pk]
    soft: torch.Tensor | None = None  # [B, Ps, hidden]
    soft_mask: torch.Tensor | None = None  # [B, Ps]
    offsets: torch.Tensor | None = None  # [B, S, hidden] float32: A·B per row, zero-padded
    offset_mask: torch.Tensor | None = None  # [B, S]

    @classmethod
    def broadcast(cls, artifact: Artifact | None, batch_size: int) -> VirtualContext:
        """The same artifact for every row (training, single-adapter evaluation). Keeps the autograd graph."""
        return cls.from_rows([artifact] * batch_size)

    @classmethod
    def from_rows(cls, artifacts: list[Artifact | None]) -> VirtualContext:
        """One artifact (or None) per row; shorter ones are padded and masked (left-aligned slots)."""
        virtual = [a.prompt if isinstance(a, OffsetPrompt) else a for a in artifacts]
        ctx = cls()
        ctx._take_prefixes([a if isinstance(a, KVPrefix) else None for a in virtual])
        ctx._take_softs([a if isinstance(a, SoftPrompt) else None for a in virtual])
        ctx._take_offsets([a.offsets if isinstance(a, OffsetPrompt) else None for a in artifacts])
        return ctx

    @classmethod
    def offsets_of(cls, artifacts: list[Artifact | None]) -> VirtualContext:
        """Only the rows' embedding offsets (a prompt fed in chunks after its first: ``decoder.inject.extend``)."""
        ctx = cls()
        ctx._take_offsets([a.offsets if isinstance(a, OffsetPrompt) else None for a in artifacts])
        return ctx

    def _take_prefixes(self, prefixes: list[KVPrefix | None]) -> None:
        if not any(p is not None and p.length for p in prefixes):
            return
        batch = len(prefixes)
        ref = next(p for p in prefixes if p is not None and p.length)
        pk = max(p.length for p in prefixes if p is not None)
        self.kv_mask = _slot_mask([p.length if p is not None else 0 for p in prefixes], pk, ref.keys[0].device)
        self.kv = []
        for layer in range(ref.num_layers):
            keys = _pad_stack([p.keys[layer] if p is not None else None for p in prefixes], ref.keys[layer], pk, batch)
            values = _pad_stack(
                [p.values[layer] if p is not None else None for p in prefixes], ref.values[layer], pk, batch
            )
            self.kv.append((keys, values))

    def _take_softs(self, softs: list[SoftPrompt | None]) -> None:
        if not any(s is not None and s.length for s in softs):
            return
        ref = next(s for s in softs if s is not None and s.length)
        ps = max(s.length for s in softs if s is not None)
        self.soft_mask = _slot_mask([s.length if s is not None else 0 for s in softs], ps, ref.embeds.device)
        rows = [s.embeds if s is not None else None for s in softs]
        self.soft = _pad_stack(rows, ref.embeds, ps, len(softs), seq_dim=0)

    def _take_offsets(self, offsets: list[EmbeddingOffsets | None]) -> None:
        if not any(o is not None and o.positions for o in offsets):
            return
        dense = {id(o): o.dense() for o in offsets if o is not None}  # once per artifact: a shared one is expanded
        rows = [dense[id(o)] if o is not None else None for o in offsets]  # [S_b, hidden] each
        ref = next(r for r in rows if r is not None and r.shape[0])
        width = max(r.shape[0] for r in rows if r is not None)
        self.offset_mask = _slot_mask([r.shape[0] if r is not None else 0 for r in rows], width, ref.device)
        self.offsets = _pad_stack(rows, ref, width, len(offsets), seq_dim=0)

    @property
    def kv_length(self) -> int:
        return 0 if self.kv_mask is None else int(self.kv_mask.shape[1])

    @property
    def soft_length(self) -> int:
        return 0 if self.soft_mask is None else int(self.soft_mask.shape[1])

    def offset_embeds(self, embeds: torch.Tensor, attention_mask: torch.Tensor,
                      prompt_lengths: torch.Tensor | None = None, first_index: int = 0) -> torch.Tensor:
        """``embeds [B, T, hidden]`` of real tokens (``attention_mask [B, T]``, any padding side) with each row's
        offsets added by the token's real index ``i`` (``first_index`` + its count among the row's real tokens,
        from 0: the first real token after the virtual positions)::

            out[b, t] = embeds[b, t] + offsets[b, i]    where mask[b, t] = 1 and i < min(S_b, prompt_lengths[b])

        ``prompt_lengths [B]``: how many real tokens of each row are prompt (a target's tokens get no offset);
        ``None``: all of them (a prompt being prefilled). Without offsets, ``embeds`` itself."""
        if self.offsets is None:
            return embeds
        mask = attention_mask.long()
        index = first_index + mask.cumsum(1) - 1  # [B, T] real index of each column
        limit = self.offset_mask.sum(1)  # [B]: S_b
        if prompt_lengths is not None:
            limit = torch.minimum(limit, prompt_lengths.to(limit.device))
        take = (mask > 0) & (index >= 0) & (index < limit[:, None])  # [B, T]
        width, hidden = self.offsets.shape[1], self.offsets.shape[2]
        rows = self.offsets.gather(1, index.clamp(0, width - 1)[..., None].expand(-1, -1, hidden))  # [B, T, hidden]
        return embeds + (rows * take[..., None]).to(embeds.dtype)


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
