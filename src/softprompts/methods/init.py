"""Initial values for virtual tokens, shared by the methods: token ids to start from, scaled random tensors, the
task instruction a method starts from, and seeded randomness that never touches the caller's RNG.

``initial_artifact(base, config, kind, ...)`` is what ``PromptMethod`` starts every method from: a ``SoftPrompt``
``[P, hidden]`` (embeddings) or a ``KVPrefix`` (per layer ``[H_l, P, D_l]``), float32 on the CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from softprompts.methods.config import MethodConfig, MethodError
from softprompts.model.artifacts import Artifact, KVPrefix, OffsetPrompt, SoftPrompt
from softprompts.model.frozen import FrozenBase
from softprompts.model.placement import start_ids

DEFAULT_INIT_TEXT = "Read the text below carefully and answer with the single best word."
SAMPLED_VOCAB_SIZE = 5000  # Lester et al. sample from the 5,000 most common tokens; BPE ids rank roughly by frequency


def task_init_text(task: str, labels: list[str] | None = None) -> str:
    """The task instruction virtual tokens start from by default (their embeddings, or their KV for prefixes).

    Measured on SmolLM2 + UCI sentiment (docs/DEFAULTS.md): an instruction naming the labels starts far above a
    generic text."""
    if task == "classify" and labels:
        return f"Classify the text. Answer with one of: {', '.join(labels)}.\n"
    return "Read the input and write the expected output.\n"


def make_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Inside, torch's global CPU generator is seeded with ``seed`` (module constructors such as ``nn.Linear`` draw
    their initial weights from it); on exit the caller's generator state is back as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def fit_to(ids: list[int], length: int, filler: int | None = None) -> list[int]:
    """Cut ``ids`` to its first ``length`` tokens, or left-fill it with ``filler`` (the end-of-text token, the
    separator the model saw between documents) so the text itself stays intact next to the input. Without a filler
    the text is cycled. Measured on SmolLM2 + UCI sentiment (docs/DEFAULTS.md): a 14-token instruction cycled to 20
    tokens starts at dev accuracy 0.645, left-filled 0.705 (0.765 with a trailing newline)."""
    if not ids:
        raise MethodError("cannot initialize virtual tokens from an empty text")
    if len(ids) >= length:
        return ids[:length]
    if filler is None:
        return [ids[i % len(ids)] for i in range(length)]
    return [filler] * (length - len(ids)) + ids


def sampled_vocab_ids(base: FrozenBase, length: int, seed: int) -> list[int]:
    special = set(getattr(base.tokenizer, "all_special_ids", []) or [])
    high = min(base.shapes.vocab_size, SAMPLED_VOCAB_SIZE)
    ids = torch.randint(0, high, (length * 2 + len(special),), generator=make_generator(seed)).tolist()
    return [i for i in ids if i not in special][:length]


def init_token_ids(
    base: FrozenBase, config: MethodConfig, labels: list[str] | None = None, init_text: str | None = None
) -> list[int] | None:
    """Token ids whose embeddings (or KV) start the virtual tokens; ``None`` for ``init="random"``."""
    length = config.num_virtual_tokens
    if config.init == "random":
        return None
    if config.init == "vocab":
        return sampled_vocab_ids(base, length, config.seed)
    if config.init == "labels":
        if not labels:
            raise MethodError("init='labels' needs the task's class labels (pass labels=[...] or use --labels)")
        label_ids = [i for label in labels for i in base.tokenize(" " + label.strip())]
        return (label_ids + sampled_vocab_ids(base, length, config.seed))[:length]
    text = config.init_text or init_text or DEFAULT_INIT_TEXT
    filler = getattr(base.tokenizer, "eos_token_id", None)
    return fit_to(base.tokenize(text), length, filler)


def from_sequence_start(base: FrozenBase, ids: list[int]) -> list[int]:
    """``ids`` as the first ``len(ids)`` positions of a sequence, whose KV starts a prefix: on a base whose tokenizer
    adds BOS, BOS first (``placement.start_ids``; a KV prefix stands in for the sequence's start, so BOS is inside
    it), in place of a left filler, else of the last id. Unchanged on other bases."""
    if len(start_ids(base, ids)) == len(ids):
        return ids
    filler = getattr(base.tokenizer, "eos_token_id", None)
    return start_ids(base, ids[1:] if ids[0] == filler else ids[:-1])


def random_like_embeddings(base: FrozenBase, length: int, seed: int) -> torch.Tensor:
    """``[P, hidden]`` normal values with the embedding matrix's own standard deviation."""
    std = base.model.get_input_embeddings().weight.float().std().item()
    return torch.randn(length, base.shapes.hidden_size, generator=make_generator(seed)) * std


def random_prefix(base: FrozenBase, length: int, seed: int) -> KVPrefix:
    """Random per-layer KV scaled like the KV of a real text (per layer, keys and values separately)."""
    reference = base.text_to_kv(base.tokenize(DEFAULT_INIT_TEXT) if base.tokenizer is not None else [1, 2, 3, 4])
    gen = make_generator(seed)
    keys, values = [], []
    for k, v in zip(reference.keys, reference.values, strict=True):
        heads, _, dim = k.shape
        keys.append(torch.randn(heads, length, dim, generator=gen) * k.float().std().item())
        values.append(torch.randn(heads, length, dim, generator=gen) * v.float().std().item())
    return KVPrefix(keys, values)


def initial_artifact(base: FrozenBase, config: MethodConfig, kind: str, labels=None, init_text=None,
                     init_artifact: Artifact | None = None) -> Artifact:
    """The starting artifact of kind ``kind`` (``SoftPrompt.kind``, ``KVPrefix.kind`` or ``OffsetPrompt.kind``),
    float32 on the CPU. For an offset prompt: a saved ``OffsetPrompt`` continued as it is, else the ``SoftPrompt`` its
    soft part starts from (the method adds offsets that start at zero)."""
    if kind == OffsetPrompt.kind and isinstance(init_artifact, OffsetPrompt):
        return init_artifact.detached(torch.float32).to("cpu")
    if kind in (SoftPrompt.kind, OffsetPrompt.kind):
        return SoftPrompt(initial_embeddings(base, config, labels, init_text, init_artifact))
    return initial_prefix(base, config, labels, init_text, init_artifact)


def _refuse_offsets(init_artifact: Artifact) -> None:
    """A saved DePT artifact continues as DePT only: any other method would drop its offsets."""
    if isinstance(init_artifact, OffsetPrompt):
        raise MethodError("the saved adapter is DePT's (a soft prompt plus embedding offsets): continuing it with "
                          "another method would drop the offsets; continue it with --method dept")


def initial_embeddings(
    base: FrozenBase, config: MethodConfig, labels=None, init_text=None, init_artifact: SoftPrompt | None = None
) -> torch.Tensor:
    """``[P, hidden]`` float32 starting embeddings for soft-prompt methods (``init_artifact``: continue a saved one)."""
    if init_artifact is not None:
        _refuse_offsets(init_artifact)
        if not isinstance(init_artifact, SoftPrompt):
            raise MethodError("this method continues from a soft prompt; the saved adapter holds a KV prefix")
        return init_artifact.embeds.detach().float().cpu().clone()
    ids = init_token_ids(base, config, labels, init_text)
    if ids is None:
        return random_like_embeddings(base, config.num_virtual_tokens, config.seed)
    return base.embed(torch.tensor(ids)).detach().float().cpu()


def initial_prefix(
    base: FrozenBase, config: MethodConfig, labels=None, init_text=None,
    init_artifact: KVPrefix | SoftPrompt | None = None,
) -> KVPrefix:
    """Starting per-layer KV (float32) for prefix methods: the KV of real tokens, scaled random, or a saved artifact
    (a saved soft prompt is converted to the exact KV it produces)."""
    if init_artifact is not None:
        _refuse_offsets(init_artifact)
        if isinstance(init_artifact, SoftPrompt):
            init_artifact = base.serving_artifact(init_artifact)  # a decoder-only base's exact KV of it
        if not isinstance(init_artifact, KVPrefix):
            raise MethodError(f"a soft prompt on {base.name} ({base.family}) has no KV of its own to start a prefix "
                              "method from; start it from text (--init text) or from a KV-prefix adapter")
        return KVPrefix([k.detach().float().cpu().clone() for k in init_artifact.keys],
                        [v.detach().float().cpu().clone() for v in init_artifact.values])
    ids = init_token_ids(base, config, labels, init_text)
    if ids is None:
        return random_prefix(base, config.num_virtual_tokens, config.seed)
    kv = base.text_to_kv(from_sequence_start(base, ids))
    return KVPrefix([k.float().cpu() for k in kv.keys], [v.float().cpu() for v in kv.values])
