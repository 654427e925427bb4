"""Real outages for tests: a TCP proxy between the platform and PostgreSQL or Redis that a test cuts and
restores, and a small OpenAI-compatible engine that answers every completion with fixed usage."""

from __future__ import annotations

import json
import socket
import threading
from http.server import ThreadingHTTPServer

from tests.fakes.http import Handler, chat_completion, serve


class TcpProxy:
    """Forwards 127.0.0.1:`port` to `upstream` (host, port), one pair of threads per connection.

    `cut()` closes every open connection and refuses new ones (each is accepted and closed at once, as a
    server that went away answers), until `restore()`. Use as a context manager or call `close()`.
    """

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.down = False
        self.accepted = 0  # connections accepted while up (for tests that want to see reconnects)
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.down:
                client.close()
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self.accepted += 1
                self._open.update((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket):
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, target):
                self._shut(s)

    def _shut(self, s: socket.socket):
        with self._lock:
            self._open.discard(s)
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()

    def cut(self) -> None:
        """The outage: every connection through the proxy is closed, new ones are refused."""
        self.down = True
        with self._lock:
            sockets = list(self._open)
        for s in sockets:
            self._shut(s)

    def restore(self) -> None:
        self.down = False

    def close(self) -> None:
        self._closed = True
        self.cut()
        self.listener.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Engine(Handler):
    def do_POST(self):  # noqa: N802
        body = self.read_json()
        self.server.hits += 1
        answer = chat_completion(body["model"], "hi")
        if not body.get("stream"):
            self.reply(200, answer)
            return
        chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": body["model"],
                 "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]}  # fmt: skip
        last = {**chunk, "choices": [], "usage": answer["usage"]}
        events = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in (chunk, last)) + b"data: [DONE]\n\n"
        self.reply(200, events, content_type="text/event-stream")


def engine_server() -> ThreadingHTTPServer:
    """A running OpenAI-compatible engine on 127.0.0.1 (its port: `server.server_address[1]`); every chat
    completion, whole or streamed, answers "hi" with usage 3 prompt + 1 completion tokens; `server.hits`
    counts them. Call `server.shutdown()` at the end."""
    return serve(_Engine, hits=0)
