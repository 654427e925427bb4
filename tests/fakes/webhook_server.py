"""A real HTTP server on 127.0.0.1 that plays a webhook endpoint, well-behaved or hostile.

Behaviours: "ok" (200), "trickle" (200, then one body byte every `interval` seconds for `duration`),
"redirect" (307 to `location`), "huge" (200 with an endless body); over TLS when given a server context (see `tls_pair`). Every request is recorded
(path, headers) so a test can tell whether anything reached it at all.
"""

from __future__ import annotations

import ssl
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
    tls: ssl.SSLContext | None = None  # serve https with this server context
    received: list = field(default_factory=list)  # (path, {header: value})

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/hook"


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
    if endpoint.tls is not None:
        server.socket = endpoint.tls.wrap_socket(server.socket, server_side=True)
    endpoint.port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield endpoint
    finally:
        server.shutdown()
        server.server_close()


def tls_pair(name: str, tmp_path) -> tuple[ssl.SSLContext, str]:
    """A throwaway CA and a certificate for `name` signed by it: (server context, path of the CA's PEM)."""
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.now(UTC)

    def certificate(subject, issuer, key, signer, *, ca: bool, san: str | None = None):
        builder = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )  # fmt: skip
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "LLMHub test CA")])
    ca = certificate(ca_name, ca_name, ca_key, ca_key, ca=True)
    leaf_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    leaf = certificate(leaf_name, ca_name, key, ca_key, ca=False, san=name)
    ca_pem, chain = tmp_path / "ca.pem", tmp_path / "server.pem"
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    chain.write_bytes(
        leaf.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(chain)
    return context, str(ca_pem)
