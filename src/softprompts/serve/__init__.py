"""Serving many adapters from one frozen model.

``engine`` (token ids + artifacts: mixed-adapter batches through the one decode loop ``model/decode.py``, soft
prompts served as cached KV, scoring),
``registry`` (adapter directory: validation, LRU memory limit, hot loading), ``batcher`` (dynamic batching on a
worker thread), ``http`` (FastAPI app, imported lazily: the engine needs no web stack), ``metrics`` (Prometheus text).
"""

from softprompts.model.decode import ContextLengthError, GenerationRequest, GenerationResult
from softprompts.serve.batcher import Batcher
from softprompts.serve.engine import Engine, ScoreRequest
from softprompts.serve.metrics import Metrics
from softprompts.serve.registry import InvalidAdapterName, Registry, UnknownAdapter, check_name

__all__ = [
    "Batcher", "ContextLengthError", "Engine", "GenerationRequest", "GenerationResult", "InvalidAdapterName",
    "Metrics", "Registry", "ScoreRequest", "UnknownAdapter", "check_name",
]
