"""Save and load adapters: ``adapter.json`` + ``adapter.safetensors`` (materialized tensors only).

Saving is atomic (``files.atomic_directory``): files are written into a temporary sibling directory which is then
renamed into place, so a crash never leaves a half-written adapter. Loading reads JSON and safetensors only (never
pickle), validates both and applies the base-model rule of ``adapter.check_base_fits``.
"""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load, save_file

from softprompts.adapter import Adapter, AdapterError
from softprompts.codec import (
    ADAPTER_FILE,
    ArtifactRecord,
    adapter_json,
    adapter_text,
    parse_adapter,
    read_adapter_record,
)
from softprompts.files import atomic_directory, read_files
from softprompts.model.artifacts import Artifact, artifact_from_tensors, non_finite
from softprompts.model.frozen import FrozenBase
from softprompts.model.probe import ModelShapes
from softprompts.schema import ADAPTER_FORMAT

CONFIG_FILE = ADAPTER_FILE
WEIGHTS_FILE = "adapter.safetensors"


def write_adapter_files(adapter: Adapter, directory: str | Path) -> None:
    """Write the two files into an existing directory (no atomicity: use ``save_adapter`` for that). An artifact
    holding NaN or infinity is refused (``AdapterError``): nothing is written."""
    directory = Path(directory)
    tensors = {name: t.detach().cpu().contiguous() for name, t in adapter.artifact.tensors().items()}
    bad = non_finite(tensors)
    if bad:
        raise AdapterError(f"refusing to save an adapter with non-finite values (NaN or inf) in {', '.join(bad)}: "
                           "the training that made it diverged; train again with a lower --lr")
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": ADAPTER_FORMAT})
    (directory / CONFIG_FILE).write_text(adapter_text(adapter.record()))


def save_adapter(adapter: Adapter, directory: str | Path, overwrite: bool = False,
                 extra_files: dict | None = None) -> Path:
    """Atomically write ``directory`` with the adapter (and optional ``{name: text}`` extra files)."""

    def write(tmp: Path) -> None:
        write_adapter_files(adapter, tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)

    return atomic_directory(directory, write, overwrite=overwrite)


def read_metadata(directory: str | Path) -> dict:
    """``adapter.json`` of an adapter directory, validated as a whole (``codec.read_adapter_record``), as a dict."""
    return adapter_json(read_adapter_record(directory))


def load_adapter(directory: str | Path, base: FrozenBase | None = None) -> Adapter:
    """Read an adapter directory (both files from one version of it, ``files.read_files``); with ``base``, apply the
    base-model rule (``adapter.check_base_fits``) and move the artifact to its device and dtype."""
    directory = Path(directory)
    if not (directory / CONFIG_FILE).is_file():
        raise AdapterError(f"{directory} is not an adapter directory: {CONFIG_FILE} is missing")
    try:
        files = read_files(directory, [CONFIG_FILE, WEIGHTS_FILE])
    except FileNotFoundError as exc:
        raise AdapterError(f"{directory} is incomplete: {exc}") from None
    record = parse_adapter(files[CONFIG_FILE], directory / CONFIG_FILE)
    weights = directory / WEIGHTS_FILE
    try:
        tensors = load(files[WEIGHTS_FILE])
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{weights} is truncated or corrupted ({exc}); re-save or re-train the adapter") from None
    artifact = checked_artifact(record, tensors, record.base.shapes, str(weights), AdapterError)
    adapter = Adapter.from_record(record, artifact)
    if base is not None:
        adapter.check_base(base)
        adapter.artifact = adapter.artifact.to(device=base.device, dtype=base.dtype)
    return adapter


def checked_artifact(record: ArtifactRecord, tensors: dict, shapes: ModelShapes, where: str,
                     error: type[Exception]) -> Artifact:
    """The artifact ``record`` describes, from its ``tensors``, after the checks every reader makes (an adapter
    directory's and a prompt table's task alike): finite values, a tensor set of the recorded kind, shapes of the
    base model (soft prompt ``[P, hidden]``, prefix layer ``l`` ``[H_l, P, D_l]``) and the recorded length ``P``;
    ``error`` naming ``where`` otherwise."""
    bad = non_finite(tensors)
    if bad:
        raise error(f"{where} holds non-finite values (NaN or inf) in {', '.join(bad)}: the training that wrote it "
                    "diverged; train it again with a lower --lr")
    try:
        artifact = artifact_from_tensors(record.artifact, tensors)
    except (KeyError, ValueError) as exc:
        raise error(f"{where} is malformed: {exc}") from None
    _check_tensor_shapes(artifact, shapes, where, error)
    if artifact.length != record.num_virtual_tokens:
        raise error(f"{where}: the metadata says {record.num_virtual_tokens} virtual tokens, the tensors hold "
                    f"{artifact.length}")
    return artifact


def _check_tensor_shapes(artifact, shapes: ModelShapes, directory: str, error: type[Exception]) -> None:
    if artifact.kind in ("soft_prompt", "offset_prompt"):  # an offset prompt's factor B has the same width
        if artifact.embeds.shape[1] != shapes.hidden_size:
            raise error(
                f"{directory}: soft prompt width {artifact.embeds.shape[1]} != hidden {shapes.hidden_size}")
        return
    if artifact.num_layers != shapes.num_layers:
        raise error(f"{directory}: prefix has {artifact.num_layers} layers, the model {shapes.num_layers}")
    for i, (k, v) in enumerate(zip(artifact.keys, artifact.values, strict=True)):
        want = (shapes.kv_heads[i], artifact.length, shapes.head_dims[i])
        if tuple(k.shape) != want or tuple(v.shape) != want:
            raise error(f"{directory}: layer {i} key/value shapes {tuple(k.shape)} / {tuple(v.shape)} != {want}")
