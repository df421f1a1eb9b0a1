"""A real uvicorn server on a loopback port in a background thread (the tests' clients talk HTTP to it)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from softprompts.serve.http import build_state, create_app


@contextmanager
def live_server(state) -> Iterator[int]:
    """Serve ``state`` (lifespan on: the scheduler and the adapter poller run); yields the port."""
    server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=0, log_level="warning",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    try:
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextmanager
def openai_server(root, init_text: str) -> Iterator[tuple]:
    """A live server on tiny Llama holding two generation adapters perturbed from ``init_text`` ("soft": prompt
    tuning, 3 tokens; "pre": prefix tuning, 4 tokens) under ``root``, with the official ``openai`` client; yields
    ``(client, state, base URL)``."""
    import openai
    from tiny import perturbed, tiny_base

    import softprompts as sp

    base = tiny_base("llama")
    for name, method, n, seed in (("soft", "prompt", 3, 1), ("pre", "prefix", 4, 2)):
        tuned = perturbed(base, method, n, init_text[:n], scale=0.3, seed=seed)
        sp.save_adapter(sp.Adapter.from_method(tuned, base, task={"task": "generate"}), root / name)
    state = build_state(base, root, max_running=8, poll_s=0)
    with live_server(state) as port:
        url = f"http://127.0.0.1:{port}"
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0), state, url
