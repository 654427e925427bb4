"""A small OpenAI-compatible stand-in for vLLM's server, for fleet tests (Python standard library only).

Takes the arguments LLMHub gives vLLM (``--model``, ``--revision``, ``--served-model-name``,
``--max-num-seqs``, ``--tensor-parallel-size``, ``--host``, ``--port``; others are ignored) and
behaves as vLLM does where the fleet looks:

- ``GET /health``: 503 while "loading" (``$FAKE_ENGINE_LOAD_SECONDS``, default 1 s), then 200.
- ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` in the shapes of the
  OpenAI API as vLLM serves them (``stream``, ``stream_options.include_usage``, ``usage``); tokens
  are whitespace-separated words, the reply echoes the prompt.
- Model download: the model is "downloaded" into the Hugging Face cache (``$HF_HOME`` or
  ``/root/.cache/huggingface``) as ``hub/models--ORG--NAME/snapshots/<revision>/config.json``, once;
  a later container sharing that cache finds it there (``cache_hit``). A repo whose name starts
  with ``missing`` does not exist: the engine logs Hugging Face's RepositoryNotFoundError and exits 1,
  as vLLM does for an unknown repo.
- ``SIGTERM``: a graceful shutdown, exit code 0 (as vLLM's server).
- ``VLLM_API_KEY``: when set, every path under ``/v1`` answers 401 ``{"error": "Unauthorized"}`` unless
  the request carries ``Authorization: Bearer <key>`` (vLLM's AuthenticationMiddleware); /health and
  the test hooks stay open. ``--middleware`` (LLMHub's guard of the other paths) is accepted and ignored.

Test hooks (not in vLLM): ``GET /fake/state`` reports what the container received (arguments,
``NVIDIA_VISIBLE_DEVICES``, /dev/shm size in bytes, cache hit, whether HF_TOKEN was set — never its
value); ``POST /fake/exit`` with ``{"code": N, "message": "..."}`` logs the message and exits with
code N (a crash on demand).
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

STARTED = time.time()
LOADED = threading.Event()
STATE: dict = {}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fake-engine")
    parser.add_argument("--model", required=True)
    parser.add_argument("--revision", default="")
    parser.add_argument("--served-model-name", nargs="+", default=None)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    args, _unknown = parser.parse_known_args(argv)
    return args


def hub_dir() -> Path:
    return Path(os.environ.get("HF_HOME", "/root/.cache/huggingface")) / "hub"


def fetch_model(repo: str, revision: str) -> bool:
    """'Download' `repo` into the HF cache unless it is there. Returns True on a cache hit; exits 1
    (after Hugging Face's error) when the repo does not exist."""
    name = repo.rsplit("/", 1)[-1]
    if name.startswith("missing"):
        print(f"INFO fake engine: resolving {repo}", flush=True)
        print("Traceback (most recent call last):", file=sys.stderr)
        print('  File "/opt/llmhub/server.py", in fetch_model', file=sys.stderr)
        print(
            "huggingface_hub.errors.RepositoryNotFoundError: 404 Client Error. "
            f"Repository Not Found for url: https://huggingface.co/api/models/{repo}/revision/main.",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(1)
    snapshot = hub_dir() / f"models--{repo.replace('/', '--')}" / "snapshots" / (revision or "main")
    config = snapshot / "config.json"
    if config.exists():
        print(f"INFO fake engine: {repo} found in the Hugging Face cache", flush=True)
        return True
    snapshot.mkdir(parents=True, exist_ok=True)
    body = {"fake": True, "repo": repo, "downloaded_by": socket.gethostname(), "at": time.time()}
    config.write_text(json.dumps(body))
    print(f"INFO fake engine: downloaded {repo} into {snapshot}", flush=True)
    return False


def shm_bytes() -> int:
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return 0
    return st.f_frsize * st.f_blocks


def words(text: str) -> list[str]:
    return text.split()


def completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


class Handler(BaseHTTPRequestHandler):
    server_version = "fake-engine/1"

    def log_message(self, fmt, *args):  # access log on stdout, like uvicorn's
        print(f"INFO {self.address_string()} {fmt % args}", flush=True)

    def send_json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def error(self, status: int, message: str, kind: str) -> None:
        self.send_json(status, {"object": "error", "message": message, "type": kind, "param": None, "code": status})

    def read_json(self) -> dict | None:
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            self.error(400, "Malformed JSON body.", "BadRequestError")
            return None
        if not isinstance(body, dict):
            self.error(400, "The body must be a JSON object.", "BadRequestError")
            return None
        return body

    def authorized(self) -> bool:
        """vLLM's key check: paths under /v1 need ``Authorization: Bearer $VLLM_API_KEY`` when it is set."""
        key = os.environ.get("VLLM_API_KEY")
        if not key or not self.path.startswith("/v1"):
            return True
        scheme, _, value = (self.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(value.encode(), key.encode()):
            return True
        data = b'{"error":"Unauthorized"}'
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        return False

    def do_GET(self):
        if not self.authorized():
            return
        if self.path == "/health":
            if LOADED.is_set():
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self.error(503, "engine is loading", "ServiceUnavailable")
        elif self.path == "/v1/models":
            data = [
                {
                    "id": name,
                    "object": "model",
                    "created": int(STARTED),
                    "owned_by": "fake-engine",
                    "root": STATE["model"],
                }
                for name in STATE["served_model_names"]
            ]
            self.send_json(200, {"object": "list", "data": data})
        elif self.path == "/fake/state":
            self.send_json(200, STATE | {"loaded": LOADED.is_set()})
        else:
            self.error(404, f"Not found: {self.path}", "NotFoundError")

    def do_POST(self):
        if not self.authorized():
            return
        if self.path == "/fake/exit":
            body = self.read_json()
            if body is None:
                return
            code = int(body.get("code", 1))
            message = str(body.get("message", f"fake engine: exiting with code {code}"))
            self.send_json(200, {"exiting": code})
            self.wfile.flush()

            def die():
                time.sleep(0.1)
                print(message, file=sys.stderr, flush=True)
                os._exit(code)

            threading.Thread(target=die, daemon=True).start()
            return
        if self.path not in ("/v1/chat/completions", "/v1/completions"):
            self.error(404, f"Not found: {self.path}", "NotFoundError")
            return
        if not LOADED.is_set():
            self.error(503, "engine is loading", "ServiceUnavailable")
            return
        body = self.read_json()
        if body is None:
            return
        if body.get("model") not in STATE["served_model_names"]:
            self.error(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError")
            return
        chat = self.path == "/v1/chat/completions"
        if chat:
            messages = body.get("messages") or []
            prompt = " ".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
        else:
            prompt = str(body.get("prompt", ""))
        prompt_words = words(prompt) or ["(empty)"]
        max_tokens = int(body.get("max_tokens") or 16)
        reply = (["Echo:"] + prompt_words)[:max_tokens]
        if body.get("ignore_eos"):
            reply = (reply * max_tokens)[:max_tokens]
        finish = "length" if len(reply) >= max_tokens else "stop"
        usage = {
            "prompt_tokens": len(words(prompt)),
            "completion_tokens": len(reply),
            "total_tokens": len(words(prompt)) + len(reply),
        }
        cid = completion_id("chatcmpl" if chat else "cmpl")
        created = int(time.time())
        model = body["model"]
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            self.stream(chat, cid, created, model, reply, usage, finish, include_usage)
            return
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": " ".join(reply)}, "finish_reason": finish}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": " ".join(reply), "finish_reason": finish, "logprobs": None}
            obj = "text_completion"
        self.send_json(
            200, {"id": cid, "object": obj, "created": created, "model": model, "choices": [choice], "usage": usage}
        )

    def stream(self, chat, cid, created, model, reply, usage, finish, include_usage):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        obj = "chat.completion.chunk" if chat else "text_completion"

        def send(payload):
            self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
            self.wfile.flush()

        for i, word in enumerate(reply):
            piece = word if i == 0 else " " + word
            if chat:
                delta = {"content": piece} if i else {"role": "assistant", "content": piece}
                choice = {"index": 0, "delta": delta, "finish_reason": None}
            else:
                choice = {"index": 0, "text": piece, "finish_reason": None, "logprobs": None}
            send({"id": cid, "object": obj, "created": created, "model": model, "choices": [choice]})
            time.sleep(0.01)
        last = {"index": 0, "finish_reason": finish} | ({"delta": {}} if chat else {"text": ""})
        send({"id": cid, "object": obj, "created": created, "model": model, "choices": [last]})
        if include_usage:
            send({"id": cid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: (print("INFO fake engine: shutting down", flush=True), os._exit(0)))
    print(f"INFO fake engine: args {argv}", flush=True)
    STATE.update(
        argv=argv,
        model=args.model,
        revision=args.revision,
        served_model_names=args.served_model_name or [args.model],
        tensor_parallel_size=args.tensor_parallel_size,
        max_num_seqs=args.max_num_seqs,
        visible_devices=os.environ.get("NVIDIA_VISIBLE_DEVICES"),
        hf_token_set=bool(os.environ.get("HF_TOKEN")),
        shm_bytes=shm_bytes(),
        hostname=socket.gethostname(),
    )
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    print(f"INFO fake engine: listening on {args.host}:{args.port}", flush=True)

    threading.Thread(target=server.serve_forever, daemon=True).start()  # /health answers 503 meanwhile
    STATE["cache_hit"] = fetch_model(args.model, args.revision)  # exits 1 for a repo that does not exist
    time.sleep(float(os.environ.get("FAKE_ENGINE_LOAD_SECONDS", "1")))
    LOADED.set()
    print("INFO fake engine: ready", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main(sys.argv[1:])
