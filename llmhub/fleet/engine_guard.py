"""The ASGI middleware LLMHub installs in every vLLM engine: no path answers without the instance's key,
except ``GET /health``.

vLLM's own key check (``VLLM_API_KEY`` / ``--api-key``) guards only paths under ``/v1``, ``/v2``,
``/inference`` and ``/cohere`` (vLLM 0.32, ``vllm/entrypoints/serve/middleware/authenticate.py``).
Without this middleware the engine still answers, with no key: ``POST /invocations`` (SageMaker's
route: runs the model), ``POST /generative_scoring`` (runs the model), ``POST /scale_elastic_ep``
(changes the server), ``POST /tokenize``, ``/detokenize``, ``GET /metrics``, ``/load``, ``/version``,
``/ping``, ``/docs`` and ``/openapi.json``. vLLM loads it with ``--middleware
llmhub_engine_guard.EngineKeyGuard`` (an ASGI class, added with ``app.add_middleware``); the engine
seam copies this file into the container before its first start (see `engine.GUARD_FILE`).

Standard library only: this file runs inside the engine image, not in LLMHub. The key is read from
``VLLM_API_KEY``; an engine started without one answers 401 to everything but ``GET /health``.
"""

from __future__ import annotations

import hashlib
import hmac
import os

OPEN_PATHS = frozenset({"/health"})  # liveness only: an empty 200 once the engine is loaded
_UNAUTHORIZED = b'{"error":"Unauthorized"}'


class EngineKeyGuard:
    """Pure ASGI middleware: requests must carry ``Authorization: Bearer <VLLM_API_KEY>``."""

    def __init__(self, app):
        self.app = app
        key = os.environ.get("VLLM_API_KEY", "")
        self._digest = hashlib.sha256(key.encode()).digest() if key else None

    def _authorized(self, scope) -> bool:
        if self._digest is None:
            return False
        for name, value in scope.get("headers") or ():
            if name.lower() == b"authorization":
                scheme, _, param = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer":
                    return hmac.compare_digest(hashlib.sha256(param.strip().encode()).digest(), self._digest)
        return False

    async def __call__(self, scope, receive, send):
        kind = scope.get("type")
        if kind not in ("http", "websocket"):  # lifespan
            return await self.app(scope, receive, send)
        if kind == "http" and scope.get("method") in ("GET", "HEAD") and scope.get("path") in OPEN_PATHS:
            return await self.app(scope, receive, send)
        if self._authorized(scope):
            return await self.app(scope, receive, send)
        if kind == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return None
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(_UNAUTHORIZED)).encode()),
                    (b"www-authenticate", b"Bearer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": _UNAUTHORIZED})
        return None
