"""Serving many adapters from one frozen model.

``engine`` (token ids + artifacts: mixed-adapter batches through the one decode loop ``model/decode_loop.py``, soft
prompts served as cached KV, scoring),
``registry`` (adapter directory: validation, LRU memory limit, hot loading), ``scheduler`` (continuous batching and
admission control on a worker thread), ``http`` (FastAPI app, imported lazily: the engine needs no web stack),
``metrics`` (prometheus-client).
"""

from softprompts.model.generation import ContextLengthError, GenerationRequest, GenerationResult
from softprompts.serve.admission import Overloaded
from softprompts.serve.engine import Engine, ScoreRequest
from softprompts.serve.metrics import Metrics
from softprompts.serve.registry import InvalidAdapterName, Registry, UnknownAdapter, check_name
from softprompts.serve.scheduler import Scheduler

__all__ = [
    "ContextLengthError", "Engine", "GenerationRequest", "GenerationResult", "InvalidAdapterName", "Metrics",
    "Overloaded", "Registry", "Scheduler", "ScoreRequest", "UnknownAdapter", "check_name",
]
