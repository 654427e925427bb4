"""Small stand-in HTTP servers for tests (engines, webhook receivers, Stripe): the request and reply plumbing
they share, so a test's handler says only what it answers."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    """A quiet request handler with JSON helpers; subclasses define do_GET / do_POST."""

    def read_body(self) -> bytes:
        """The request body (Content-Length bytes; b"" without one)."""
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def read_json(self):
        return json.loads(self.read_body())

    def reply(self, status: int = 200, body=b"", *, content_type: str = "application/json", headers=None) -> None:
        """Answer `status` with `body`: bytes as they are, anything else as JSON; Content-Length set."""
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(raw)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args):
        pass


def serve(handler: type[BaseHTTPRequestHandler], **attributes) -> ThreadingHTTPServer:
    """`handler` served on 127.0.0.1 at a free port from a daemon thread; `attributes` are set on the server
    (handlers read them as ``self.server.<name>``). Call ``.shutdown()`` to stop it."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    for name, value in attributes.items():
        setattr(server, name, value)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def chat_completion(model: str, content: str, *, prompt_tokens: int = 3, completion_tokens: int = 1) -> dict:
    """An OpenAI Chat Completions API answer (non-streamed) with one choice and its usage."""
    return {
        "id": "x", "object": "chat.completion", "created": 0, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }  # fmt: skip
