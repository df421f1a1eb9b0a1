import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))  # benchmarks/peak_memory.py: the tests use it too
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # the suite is CPU-only: the same tests on a machine with a GPU

from tiny import ARCHS, tiny_base  # noqa: E402

_BASES = {}


@pytest.fixture(params=ARCHS)
def base(request):
    """A tiny random BaseModel per architecture (cached for the session: it is frozen, tests never change it)."""
    if request.param not in _BASES:
        _BASES[request.param] = tiny_base(request.param)
    return _BASES[request.param]
