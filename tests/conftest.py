import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # the suite is CPU-only: the same tests on a machine with a GPU

from tiny import ARCHS, cached_base  # noqa: E402


@pytest.fixture(params=ARCHS)
def base(request):
    """A tiny random BaseModel per decoder-only architecture (cached for the session: it is frozen, tests never change
    it). ``@pytest.mark.parametrize("base", ALL_ARCHS, indirect=True)`` runs a test on both families."""
    return cached_base(request.param)
