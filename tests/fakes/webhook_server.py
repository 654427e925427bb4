"""A real HTTP server on 127.0.0.1 that plays a webhook endpoint, well-behaved or hostile.

Behaviours: "ok" (200), "trickle" (200, then one body byte every `interval` seconds for `duration`),
"redirect" (307 to `location`), "huge" (200 with an endless body). Every request is recorded
(path, headers) so a test can tell whether anything reached it at all.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Endpoint:
    behaviour: str = "ok"
    location: str = ""
    interval: float = 0.5
    duration: float = 30.0
    port: int = 0
    received: list = field(default_factory=list)  # (path, {header: value})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"


def _handler(endpoint: Endpoint):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            endpoint.received.append((self.path, dict(self.headers)))
            try:
                getattr(self, f"answer_{endpoint.behaviour}")()
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up, as it should

        def answer_ok(self):
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def answer_redirect(self):
            self.send_response(307)
            self.send_header("Location", endpoint.location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def answer_trickle(self):
            self.send_response(200)
            self.send_header("Content-Length", str(int(endpoint.duration / endpoint.interval)))
            self.end_headers()
            deadline = time.monotonic() + endpoint.duration
            while time.monotonic() < deadline:
                self.wfile.write(b".")
                self.wfile.flush()
                time.sleep(endpoint.interval)

        def answer_huge(self):
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = b"x" * 65536
            for _ in range(100_000):  # 6.5 GB if anyone read it all
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))

        def log_message(self, *args):
            pass

    return Handler


@contextmanager
def endpoint_running(**kwargs):
    """Serve an `Endpoint(**kwargs)` on 127.0.0.1 (a free port) until the block ends; yields it."""
    endpoint = Endpoint(**kwargs)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(endpoint))
    server.daemon_threads = True
    endpoint.port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield endpoint
    finally:
        server.shutdown()
        server.server_close()
