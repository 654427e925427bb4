"""A stand-in for a model hub that cannot be reached in practice: it accepts TCP connections and never
answers (the worst case for a client: no refusal, no reset, only silence until its own timeouts)."""

from __future__ import annotations

import socket
import threading
from contextlib import contextmanager


@contextmanager
def silent_hub():
    """Yield the base URL (``http://127.0.0.1:<port>``) of a server that accepts and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(1)
        for conn in held:
            conn.close()
        server.close()
