"""What an attacker on a GPU host's network (or inside another tenant's engine) tries, for the security tests."""

from __future__ import annotations

import httpx

# Paths of vLLM's server (0.32) an attacker tries without the key: those under /v1 are guarded by vLLM
# itself, the others run the model (/invocations), change the server (/scale_elastic_ep) or tell about it.
ENGINE_PATHS = (
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("GET", "/v1/models"),
    ("POST", "/invocations"),
    ("POST", "/tokenize"),
    ("POST", "/generative_scoring"),
    ("POST", "/scale_elastic_ep"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/version"),
)


def engine_call(base_url: str, method: str, path: str, *, key: str | None, model: str) -> httpx.Response:
    """One direct request to an engine's published port, with `key` as Bearer token (None: no header)."""
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    body = {"model": model, "prompt": "steal", "messages": [{"role": "user", "content": "steal"}], "max_tokens": 2}
    return httpx.request(method, f"{base_url}{path}", headers=headers, json=body if method == "POST" else None,
                         timeout=30)  # fmt: skip


PEER_PROBE = """
import socket, sys
s = socket.socket()
s.settimeout(3)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    print("CONNECTED")
except OSError as exc:
    print("BLOCKED", exc)
"""


def reach_from(container, ip: str, port: int, *, python: str = "python3.11") -> bool:
    """True when a TCP connection from inside `container` (a docker-py Container with `python`) to ip:port succeeds."""
    result = container.exec_run([python, "-c", PEER_PROBE, ip, str(port)])
    return b"CONNECTED" in result.output
