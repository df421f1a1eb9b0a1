"""Save and load adapters: ``adapter.json`` + ``adapter.safetensors`` (materialized tensors only).

Saving is atomic (``files.atomic_directory``): files are written into a temporary sibling directory which is then
renamed into place, so a crash never leaves a half-written adapter. Loading reads JSON and safetensors only (never
pickle), validates both and applies the base-model rule of ``adapter.check_base_fits``.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load, save_file

from softprompts.adapter import Adapter, AdapterError
from softprompts.files import atomic_directory, parse_json, read_files, read_json
from softprompts.model.artifacts import artifact_from_tensors, non_finite
from softprompts.model.frozen import FrozenBase
from softprompts.model.probe import ModelShapes
from softprompts.schema import ADAPTER_FORMAT, AdapterDoc, validated

CONFIG_FILE = "adapter.json"
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
    """``adapter.json`` of an adapter directory, validated as a whole (``schema.AdapterDoc``: every problem listed)."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise AdapterError(f"{directory} is not an adapter directory: {CONFIG_FILE} is missing")
    return _checked(read_json(path, AdapterError), path)


def _checked(meta, path: Path) -> dict:
    validated(AdapterDoc, meta, str(path), AdapterError)
    return meta


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
    weights = directory / WEIGHTS_FILE
    meta = _checked(parse_json(files[CONFIG_FILE], directory / CONFIG_FILE, AdapterError), directory / CONFIG_FILE)
    try:
        tensors = load(files[WEIGHTS_FILE])
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{weights} is truncated or corrupted ({exc}); re-save or re-train the adapter") from None
    bad = non_finite(tensors)
    if bad:
        raise AdapterError(f"{weights} holds non-finite values (NaN or inf) in {', '.join(bad)}: the training that "
                           "wrote it diverged; train it again with a lower --lr")
    try:
        artifact = artifact_from_tensors(meta["artifact"], tensors)
    except ValueError as exc:
        raise AdapterError(f"{directory} is malformed: {exc}") from None
    shapes = ModelShapes.from_json(meta["base_model"]["shapes"])
    _check_tensor_shapes(artifact, shapes, directory)
    if artifact.length != meta["num_virtual_tokens"]:
        raise AdapterError(f"{directory}: {CONFIG_FILE} says {meta['num_virtual_tokens']} virtual tokens, "
                           f"{WEIGHTS_FILE} holds {artifact.length}")
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
