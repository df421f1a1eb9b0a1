"""The front of ``softprompts serve --engine vllm``: an ASGI middleware inside vLLM's OpenAI server that serves
adapters by name.

Why a middleware (vLLM's ``--middleware``) and not a plugin or a proxy: it runs in vLLM's own API server process, in
front of its routes, so a request costs no extra hop or process; every vLLM option, route and base-model request is
vLLM's, untouched; and the front only rewrites what it must. A plugin has no hook on requests, and a proxy would be
a second server to run, scale and keep in step.

Per request (``POST /v1/completions`` and ``/v1/chat/completions``)::

    model is the base ("base" or its name), or the body is not JSON  -> vLLM, unchanged
    model names an adapter (a subdirectory of the adapters directory, or TABLE.TASK of a prompt table)
        -> the registry (``serve/registry.py``: validated against the base, hot-reloaded, LRU memory limit)
        -> ``vllm_requests.translate``: the default engine's schemas and rendering, then prompt_embeds (soft prompt)
           or placeholders + kv_transfer_params + cache_salt (KV prefix); a KV prefix is saved once per adapter
           version, content-addressed by its salt (``KVFiles``)
        -> vLLM's /v1/completions -> ``vllm_answers`` (chat shape again for chat, the adapter's name, usage
           without the virtual tokens; streamed events rewritten one by one)
    unknown name -> 404, invalid name -> 400, an adapter that fails validation -> 409, a body the default engine
    refuses -> the same 400 / 422: OpenAI's error shape, from ``serve/errors.py``

``GET /v1/models`` is vLLM's list with every adapter appended (``parent``: the base); ``GET /v1/adapters`` lists the
adapters as the default engine does. With API keys (``--api-key`` / ``VLLM_API_KEY``), a request without a valid one
goes straight to vLLM, which refuses it: the front answers nothing, not even a 404, to an unauthenticated client.

The front holds a CPU copy of the base model (``FrontConfig.dtype``; the tokenizer, the input embeddings that soft
prompts are sent with, and the fingerprint adapters are validated against): one copy per API server process.
"""

from __future__ import annotations

import atexit
import json
import logging
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import anyio
from pydantic import ValidationError
from starlette.responses import JSONResponse

from softprompts.errors import SoftpromptsError
from softprompts.files import file_sha256
from softprompts.interop.vllm_answers import KV_NOT_LOADED, EventStream, failure, whole_answer
from softprompts.interop.vllm_kv_files import save_kv
from softprompts.interop.vllm_launch import FrontConfig
from softprompts.interop.vllm_requests import ClientFieldError, KVFile, VllmRequest, check_client_fields, translate
from softprompts.model.load import load_base, resolve
from softprompts.serve.errors import error_of, invalid_body_response
from softprompts.serve.registry import Entry, Registry

GENERATION_ROUTES = {"/v1/completions": False, "/v1/chat/completions": True}  # path -> is chat
log = logging.getLogger("softprompts.vllm_front")


class KVFiles:
    """``(entry) -> KVFile``: each adapter version's KV prefix saved once in the front's KV directory (the only
    directory the connector reads; removed at exit by whoever made it: the launcher, or this object when given none,
    so vLLM's several API-server processes can share one), the two newest versions of a name kept (a request in
    flight may still read the older one). A file found removed or changed since it was written (size, modification
    time) is written again before it is named to vLLM, and ``forget`` drops one that vLLM could not load, so the
    next request writes it again."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory or tempfile.mkdtemp(prefix="softprompts-vllm-kv-"))
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._files: dict[str, dict[int, tuple[KVFile, tuple[int, int]]]] = {}
        self._lock = threading.Lock()
        if directory is None:
            atexit.register(shutil.rmtree, self.directory, True)

    def __call__(self, entry: Entry) -> KVFile:
        with self._lock:
            saved = self._files.get(entry.name, {}).get(entry.version)
            if saved is not None and _signature(saved[0].path) == saved[1]:
                return saved[0]
            if saved is not None:
                log.warning("the KV file of adapter %r (version %d) was removed or changed on disk; writing it again",
                            entry.name, entry.version)
            path = save_kv(entry.source, self.directory / f"{entry.name}.v{entry.version}.safetensors")
            kv_file = KVFile(path=path, digest=file_sha256(path))
            versions = self._files.setdefault(entry.name, {})
            versions[entry.version] = (kv_file, _signature(path))
            for old in sorted(versions)[:-2]:
                versions.pop(old)[0].path.unlink(missing_ok=True)
            return kv_file

    def forget(self, name: str, path: Path) -> None:
        """Drop the file at ``path`` saved for adapter ``name`` (vLLM could not load it): the next request writes
        it again."""
        with self._lock:
            versions = self._files.get(name, {})
            for version, (kv_file, _) in list(versions.items()):
                if kv_file.path == path:
                    versions.pop(version)
                    path.unlink(missing_ok=True)


def _signature(path: Path) -> tuple[int, int] | None:
    """``(size, modification time in ns)`` of a file, ``None`` when it is gone."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_size, stat.st_mtime_ns


async def _read_body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive):
    """A ``receive`` that gives ``body`` once, then whatever the client sends (a disconnect)."""
    sent = False

    async def again():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again


def _headers(headers: list[tuple[bytes, bytes]], length: int | None) -> list[tuple[bytes, bytes]]:
    """``headers`` with their content length set to ``length`` (dropped for ``None``)."""
    kept = [(k, v) for k, v in headers if k.lower() != b"content-length"]
    return kept + ([(b"content-length", str(length).encode())] if length is not None else [])


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    return next((v.decode("latin-1") for k, v in headers if k.lower() == name), None)


class _AnswerRewriter:
    """The ``send`` vLLM answers through: a 200 answer is rewritten for the client (whole, or event by event when
    streamed); a 5xx answer (or an error event) becomes ``vllm_answers.failure``'s, and when that says the KV prefix
    was not loaded ``on_failure`` is called (the front forgets the file); any other answer passes unchanged."""

    def __init__(self, send, request: VllmRequest, on_failure: Callable[[VllmRequest], None]) -> None:
        self.send, self.request, self.on_failure = send, request, on_failure
        self.mode, self.start, self.buffer, self.events = "pass", None, b"", None

    async def __call__(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", []))
            if message["status"] >= 500:
                self.mode, self.start = "failed", message
                return
            if message["status"] != 200:
                self.mode = "pass"
            elif "text/event-stream" in (_header(headers, b"content-type") or ""):
                self.mode, self.events = "stream", EventStream(self.request)
                message = {**message, "headers": _headers(headers, None)}
            else:
                self.mode, self.start = "whole", message
                return
            await self.send(message)
        elif message["type"] == "http.response.body" and self.mode != "pass":
            more = message.get("more_body", False)
            if self.mode == "stream":
                out = self.events.feed(message.get("body", b"")) + (b"" if more else self.events.close())
                await self.send({"type": "http.response.body", "body": out, "more_body": more})
                if not more and self.events.failed == KV_NOT_LOADED:
                    self.on_failure(self.request)
                return
            self.buffer += message.get("body", b"")
            if not more:
                await self._whole()
        else:
            await self.send(message)

    async def _whole(self) -> None:
        status = 200
        if self.mode == "failed":
            try:
                answer = json.loads(self.buffer)
            except ValueError:
                answer = None
            status, out = failure(answer, self.request)
            log.error("adapter %r: vLLM answered %d: %s", self.request.model, self.start["status"], self.buffer[:500])
            if status == KV_NOT_LOADED:
                self.on_failure(self.request)
        else:
            out = whole_answer(json.loads(self.buffer), self.request)
        body = json.dumps(out).encode()
        headers = _headers([(k, v) for k, v in self.start.get("headers", []) if k.lower() != b"content-type"]
                           + [(b"content-type", b"application/json")], len(body))
        await self.send({**self.start, "status": status, "headers": headers})
        await self.send({"type": "http.response.body", "body": body, "more_body": False})


class SoftpromptsFront:
    """ASGI middleware: adapters by name in front of vLLM's OpenAI server (``app``). ``config``: from the
    environment (``vllm_launch.FrontConfig``) unless given; ``base``: loaded from the config unless given."""

    def __init__(self, app, config: FrontConfig | None = None, base=None) -> None:
        self.app = app
        self.config = config or FrontConfig.from_env()
        self.base = base if base is not None else load_base(resolve(self.config.model), dtype=self.config.dtype,
                                                            device="cpu")
        self.base.require("vllm_engine")
        self.registry = Registry(self.base, self.config.adapters, max_bytes=self.config.max_adapter_bytes,
                                 poll_s=self.config.poll_s)
        self.registry.start_polling()
        self.kv_files = KVFiles(self.config.kv_dir)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and self._authorized(scope):
            route = (scope["method"], scope["path"])
            if route == ("GET", "/v1/models"):
                return await self._models(scope, receive, send)
            if route == ("GET", "/v1/adapters"):
                entries = await anyio.to_thread.run_sync(self.registry.entries)
                return await JSONResponse({"object": "list", "data": [e.describe() for e in entries]})(
                    scope, receive, send)
            if scope["method"] == "POST":
                return await self._post(scope, receive, send)
        await self.app(scope, receive, send)

    def _authorized(self, scope) -> bool:
        if not self.config.api_keys:
            return True
        given = _header(list(scope.get("headers", [])), b"authorization") or ""
        return any(given == f"Bearer {key}" for key in self.config.api_keys)

    async def _post(self, scope, receive, send) -> None:
        """Every POST body: refused if it sets a field only the front may set (any route, any model); then an
        adapter's generation request is translated, and anything else goes to vLLM as the front read it."""
        raw = await _read_body(receive)
        try:
            payload = json.loads(raw)
        except (ValueError, RecursionError):  # not JSON (or nested past the parser's depth): vLLM refuses it, or
            # reads it as a form; nothing for the front to check
            return await self.app(scope, _replay(raw, receive), send)
        try:
            check_client_fields(payload, self.config.client_fields)
        except ClientFieldError as exc:
            return await error_of(exc)(scope, receive, send)
        body = json.dumps(payload).encode()  # vLLM parses exactly what was checked
        name = payload.get("model") if isinstance(payload, dict) else None
        if (scope["path"] not in GENERATION_ROUTES or not isinstance(name, str)
                or name in self.config.served_names):
            forward = {**scope, "headers": _headers(list(scope.get("headers", [])), len(body))}
            return await self.app(forward, _replay(body, receive), send)
        await self._generation(scope, receive, send, payload)

    async def _generation(self, scope, receive, send, payload: dict) -> None:
        name = payload["model"]
        try:
            entry = await anyio.to_thread.run_sync(self.registry.get, name)
            request = await anyio.to_thread.run_sync(translate, self.base, entry, payload,
                                                     GENERATION_ROUTES[scope["path"]], self.config.served_names[0],
                                                     self.kv_files)
        except ValidationError as exc:
            content_type = _header(list(scope.get("headers", [])), b"content-type")
            return await invalid_body_response(exc.errors(), content_type)(scope, receive, send)
        except SoftpromptsError as exc:
            return await error_of(exc)(scope, receive, send)
        body = json.dumps(request.body).encode()
        inner = {**scope, "path": "/v1/completions", "raw_path": b"/v1/completions",
                 "headers": _headers(list(scope.get("headers", [])), len(body))}
        await self.app(inner, _replay(body, receive), _AnswerRewriter(send, request, self._failed))

    def _failed(self, request: VllmRequest) -> None:
        if request.kv_path is not None:
            log.warning("adapter %r: vLLM could not load its KV file %s; it is written again for the next request",
                        request.model, request.kv_path)
            self.kv_files.forget(request.model, request.kv_path)

    async def _models(self, scope, receive, send) -> None:
        """vLLM's model list with the adapters appended."""
        held: list[dict] = []

        async def keep(message: dict) -> None:
            held.append(message)

        await self.app(scope, receive, keep)
        start, body = held[0], b"".join(m.get("body", b"") for m in held[1:])
        if start["status"] == 200:
            listed = json.loads(body)
            entries = await anyio.to_thread.run_sync(self.registry.entries)
            parent = self.config.served_names[0]
            listed["data"] = listed.get("data", []) + [
                {**e.describe(), "created": int(e.loaded_at), "owned_by": "softprompts", "root": e.name,
                 "parent": parent} for e in entries]
            body = json.dumps(listed).encode()
        await send({**start, "headers": _headers(list(start.get("headers", [])), len(body))})
        await send({"type": "http.response.body", "body": body, "more_body": False})


__all__ = ["GENERATION_ROUTES", "KVFiles", "SoftpromptsFront"]
