"""A stand-in OpenAI-compatible engine on a real port that counts the requests it answers.

Answers every POST with a chat completion (or a streamed one when the body asks ``stream``) whose text
names the request's number, so that a test can tell a fresh answer from a repeated one. A body with
``"fail": true`` is answered HTTP 400 (an engine's client error)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.hits += 1
            self.server.bodies.append(body)
            number = self.server.hits
        if body.get("fail"):
            return self._send(400, b'{"error": {"message": "bad", "type": "BadRequestError", "code": 400}}')
        if body.get("stream"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            chunk = {"choices": [{"index": 0, "delta": {"content": f"answer {number}"}}]}
            usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
            self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            self.wfile.write(b"data: " + json.dumps(usage).encode() + b"\n\ndata: [DONE]\n\n")
            return None
        answer = {
            "id": f"cmpl-{number}", "object": "chat.completion", "created": 0, "model": body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": f"answer {number}"},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        }  # fmt: skip
        return self._send(200, json.dumps(answer).encode())

    def _send(self, status: int, raw: bytes):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args):
        pass


class CountingEngine:
    """Start with `CountingEngine()`; `.port`, `.hits` (requests answered), `.bodies`; `.stop()` when done."""

    def __init__(self):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.hits, self.server.bodies, self.server.lock = 0, [], threading.Lock()
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    @property
    def hits(self) -> int:
        return self.server.hits

    @property
    def bodies(self) -> list[dict]:
        return self.server.bodies

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
