"""Helpers for the security tier: a raw HTTP/1.1 client that sends what an attacker would (a lying
Content-Length, an endless chunked body, a trickle), the web process's memory, and an operator's Django
admin session driven over HTTP like a browser would."""

from __future__ import annotations

import json
import select
import socket
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

import httpx

MIB = 1024 * 1024


class RawHttp:
    """One HTTP/1.1 connection on a plain socket, for requests no well-behaved client sends."""

    def __init__(self, url: str, *, timeout: float = 10.0):
        parts = urlsplit(url)
        self.host = parts.netloc
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()

    def head(self, method: str, path: str, headers: dict[str, str]) -> None:
        """Send the request line and headers (Host added), no body."""
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}", *(f"{k}: {v}" for k, v in headers.items())]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())

    def answered(self) -> bool:
        """True when the server has sent something (or closed) without our reading it yet."""
        return bool(self.buffer) or bool(select.select([self.sock], [], [], 0)[0])

    def send(self, data: bytes) -> bool:
        """Send `data` unless the server already answered or closed. False when it did (stop sending)."""
        if self.answered():
            return False
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    def send_chunk(self, data: bytes) -> bool:
        return self.send(f"{len(data):x}\r\n".encode() + data + b"\r\n")

    def response(self, *, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
        """Read one response: (status, lower-cased headers, body). Raises TimeoutError if none in `timeout` s."""
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.buffer:
            self._read(deadline)
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
        length = int(headers.get("content-length", "0"))
        self.buffer = rest
        while len(self.buffer) < length:
            self._read(deadline)
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(status_line.split()[1]), headers, body

    def _read(self, deadline: float) -> None:
        if time.monotonic() > deadline:
            raise TimeoutError("no response from the server")
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            raise TimeoutError("no response from the server") from None
        if not data:
            raise ConnectionError(f"the server closed the connection; got {self.buffer[:200]!r}")
        self.buffer += data


def error_json(body: bytes) -> dict:
    return json.loads(body)


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident memory (VmHWM in /proc/<pid>/status), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for process {pid}")


class _FormFields(HTMLParser):
    """The fields of the admin's change form (the first form whose id ends in '_form') as a browser posts them."""

    def __init__(self):
        super().__init__()
        self.in_form = self.done = False
        self.fields: list[tuple[str, str]] = []
        self.select: str | None = None
        self.textarea: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form" and not self.done and (a.get("id") or "").endswith("_form"):
            self.in_form = True
        if not self.in_form:
            return
        name = a.get("name")
        if tag == "input" and name:
            kind = a.get("type", "text")
            if kind in ("submit", "button", "file"):
                return
            if kind in ("checkbox", "radio") and "checked" not in a:
                return
            self.fields.append((name, a.get("value", "on" if kind == "checkbox" else "")))
        elif tag == "select" and name:
            self.select = name
        elif tag == "option" and self.select and "selected" in a:
            self.fields.append((self.select, a.get("value", "")))
        elif tag == "textarea" and name:
            self.textarea = name
            self.fields.append((name, ""))

    def handle_data(self, data):
        if self.textarea:
            name, value = self.fields[-1]
            self.fields[-1] = (name, value + data)

    def handle_endtag(self, tag):
        if tag == "select":
            self.select = None
        elif tag == "textarea":
            self.textarea = None
        elif tag == "form" and self.in_form:
            self.in_form, self.done = False, True


class AdminSession:
    """An operator signed in to the Django admin of a running web process, clicking through its forms."""

    def __init__(self, url: str, username: str, password: str):
        self.client = httpx.Client(base_url=url, timeout=30)
        self.client.get("/admin/login/")
        response = self.client.post(
            "/admin/login/?next=/admin/",
            data={"username": username, "password": password, "next": "/admin/",
                  "csrfmiddlewaretoken": self.client.cookies["csrftoken"]},
        )  # fmt: skip
        assert response.status_code == 302, f"admin sign-in failed: {response.status_code}"

    def change(self, path: str, changes: dict[str, str | None]) -> None:
        """Open the change form at `path`, set `changes` (None unticks/clears a field), press Save."""
        page = self.client.get(path)
        assert page.status_code == 200, page.status_code
        parser = _FormFields()
        parser.feed(page.text)
        fields = [(k, v) for k, v in parser.fields if k not in changes]
        fields += [(k, v) for k, v in changes.items() if v is not None]
        fields.append(("_save", "Save"))
        response = self.client.post(path, data=dict(_multi(fields)), headers={"Referer": str(page.url)})
        assert response.status_code == 302, f"the admin refused the change: {response.text[:2000]}"

    def delete(self, path: str) -> None:
        """Confirm the delete page at `path` (…/<id>/delete/)."""
        self.client.get(path)
        response = self.client.post(
            path, data={"post": "yes", "csrfmiddlewaretoken": self.client.cookies["csrftoken"]},
            headers={"Referer": f"{self.client.base_url}{path}"},
        )  # fmt: skip
        assert response.status_code == 302, f"the admin refused the deletion: {response.status_code}"


def _multi(fields):
    out: dict[str, list[str]] = {}
    for k, v in fields:
        out.setdefault(k, []).append(v)
    return out
