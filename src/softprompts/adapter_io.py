"""Save and load adapters: ``adapter.json`` + ``adapter.safetensors`` (materialized tensors only).

Saving is atomic (``files.atomic_directory``): files are written into a temporary sibling directory which is then
renamed into place, so a crash never leaves a half-written adapter. Loading reads JSON and safetensors only (never
pickle), validates both and applies the base-model rule of ``adapter.check_base_fits``.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from softprompts.adapter import FORMAT_NAME, FORMAT_VERSION, Adapter, AdapterError
from softprompts.files import atomic_directory, read_json
from softprompts.model.artifacts import artifact_from_tensors
from softprompts.model.base import BaseModel
from softprompts.model.probe import ModelShapes

CONFIG_FILE = "adapter.json"
WEIGHTS_FILE = "adapter.safetensors"


def write_adapter_files(adapter: Adapter, directory: str | Path) -> None:
    """Write the two files into an existing directory (no atomicity: use ``save_adapter`` for that)."""
    directory = Path(directory)
    tensors = {name: t.detach().cpu().contiguous() for name, t in adapter.artifact.tensors().items()}
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": FORMAT_NAME})
    (directory / CONFIG_FILE).write_text(json.dumps(adapter.metadata(), indent=2) + "\n")


def save_adapter(adapter: Adapter, directory: str | Path, overwrite: bool = False,
                 extra_files: dict | None = None) -> Path:
    """Atomically write ``directory`` with the adapter (and optional ``{name: text}`` extra files)."""

    def write(tmp: Path) -> None:
        write_adapter_files(adapter, tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)

    return atomic_directory(directory, write, overwrite=overwrite)


def read_metadata(directory: str | Path) -> dict:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise AdapterError(f"{directory} is not an adapter directory: {CONFIG_FILE} is missing")
    meta = read_json(path, AdapterError)
    if meta.get("format") != FORMAT_NAME:
        raise AdapterError(f"{path} is not a softprompts adapter (format={meta.get('format')!r})")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise AdapterError(
            f"{path} has format version {meta['format_version']}, newer than this softprompts supports "
            f"({FORMAT_VERSION}); upgrade softprompts"
        )
    return meta


def load_adapter(directory: str | Path, base: BaseModel | None = None) -> Adapter:
    """Read an adapter directory; with ``base``, refuse it if it was made for another model and move it there."""
    directory = Path(directory)
    meta = read_metadata(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise AdapterError(f"{directory} has no {WEIGHTS_FILE}")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{weights} is truncated or corrupted ({exc}); re-save or re-train the adapter") from None
    try:
        artifact = artifact_from_tensors(meta["artifact"], tensors)
        shapes = ModelShapes.from_json(meta["base_model"]["shapes"])
    except (KeyError, TypeError, ValueError) as exc:
        raise AdapterError(f"{directory} is malformed: {exc}") from None
    _check_tensor_shapes(artifact, shapes, directory)
    adapter = Adapter(
        artifact=artifact,
        method=meta["method"],
        method_config=meta.get("method_config", {}),
        base_name=meta["base_model"]["name"],
        base_shapes=shapes,
        base_weights_fingerprint=meta["base_model"].get("weights_fingerprint", ""),
        task=meta.get("task") or {},
    )
    if base is not None:
        adapter.check_base(base)
        adapter.artifact = adapter.artifact.to(device=base.device, dtype=base.dtype)
    return adapter


def _check_tensor_shapes(artifact, shapes: ModelShapes, directory: Path) -> None:
    if artifact.kind == "soft_prompt":
        if artifact.embeds.shape[1] != shapes.hidden_size:
            raise AdapterError(
                f"{directory}: soft prompt width {artifact.embeds.shape[1]} != hidden {shapes.hidden_size}")
        return
    if artifact.num_layers != shapes.num_layers:
        raise AdapterError(f"{directory}: prefix has {artifact.num_layers} layers, the model {shapes.num_layers}")
    for i, (k, v) in enumerate(zip(artifact.keys, artifact.values, strict=True)):
        want = (shapes.kv_heads[i], artifact.length, shapes.head_dims[i])
        if tuple(k.shape) != want or tuple(v.shape) != want:
            raise AdapterError(f"{directory}: layer {i} key/value shapes {tuple(k.shape)} / {tuple(v.shape)} != {want}")
