"""A local HTTP server speaking the part of Stripe's API that LLMHub uses (the only fake in the tests).

The real `stripe` SDK talks to it over HTTP (``STRIPE_API_BASE``). It checks what Stripe would check
and what we promise: the secret key (``Authorization: Bearer``), an ``Idempotency-Key`` on every POST
(a repeat with the same parameters replays the first answer, with different parameters is a 400
``idempotency_error``, as Stripe does), that customers and invoices exist, that items go on draft
invoices of the same customer. It also signs webhook events like Stripe (``Stripe-Signature:
t=<ts>,v1=<HMAC-SHA256 of "<ts>.<payload>">``) and sends them to a URL.

Endpoints: POST /v1/customers, POST /v1/invoices, POST /v1/invoiceitems,
POST /v1/invoices/<id>/finalize, GET /v1/invoices/<id>.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

import httpx

from tests.fakes.http import Handler, serve


@dataclass
class Request:
    method: str
    path: str
    params: dict
    idempotency_key: str | None
    status: int = 0
    replayed: bool = False


@dataclass
class FakeStripe:
    api_key: str
    webhook_secret: str = "whsec_test_fake"
    url: str = ""
    requests: list[Request] = field(default_factory=list)
    customers: dict = field(default_factory=dict)
    invoices: dict = field(default_factory=dict)
    items: dict = field(default_factory=dict)
    failures: list = field(default_factory=list)  # [path prefix, remaining, status]
    _saved: dict = field(default_factory=dict)  # idempotency key → (params, status, body)
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # --- test helpers ------------------------------------------------------------------------------

    def fail_next(self, path_prefix: str, *, times: int = 1, status: int = 500) -> None:
        """Answer the next `times` POSTs to paths starting with `path_prefix` with an error `status`."""
        self.failures.append([path_prefix, times, status])

    def posts(self, path_prefix: str = "/v1/") -> list[Request]:
        """POST requests that reached the API (after the key check), in order."""
        return [r for r in self.requests if r.method == "POST" and r.path.startswith(path_prefix)]

    def sign(self, payload: bytes, *, timestamp: int | None = None, secret: str | None = None) -> str:
        """A ``Stripe-Signature`` header value for `payload`, as Stripe computes it."""
        timestamp = int(time.time()) if timestamp is None else timestamp
        signed = f"{timestamp}.".encode() + payload
        digest = hmac.new((secret or self.webhook_secret).encode(), signed, hashlib.sha256).hexdigest()
        return f"t={timestamp},v1={digest}"

    def event(self, kind: str, invoice_id: str, *, event_id: str | None = None) -> bytes:
        """The JSON payload of event `kind` (e.g. ``invoice.paid``) about invoice `invoice_id`."""
        invoice = dict(self.invoices[invoice_id])
        if kind == "invoice.paid":
            invoice["status"] = "paid"
        return json.dumps(
            {
                "id": event_id or f"evt_{next(self._ids):06d}",
                "object": "event",
                "api_version": "2026-10-28.endive",
                "created": int(time.time()),
                "type": kind,
                "livemode": False,
                "data": {"object": invoice},
            }
        ).encode()

    def send_event(self, url: str, payload: bytes, *, signature: str | None = None) -> httpx.Response:
        """POST a webhook `payload` to `url` signed as Stripe would (or with the given header)."""
        headers = {"Content-Type": "application/json", "Stripe-Signature": signature or self.sign(payload)}
        return httpx.post(url, content=payload, headers=headers, timeout=10)

    # --- the API -----------------------------------------------------------------------------------

    def handle(self, method: str, path: str, headers, body: bytes) -> tuple[int, dict, dict]:
        """(status, JSON body, extra headers) for one request."""
        if headers.get("Authorization") != f"Bearer {self.api_key}":
            return 401, _error("invalid_request_error", "Invalid API Key provided."), {}
        params = dict(parse_qsl(body.decode(), keep_blank_values=True)) if body else {}
        key = headers.get("Idempotency-Key")
        request = Request(method, path, params, key)
        with self._lock:
            self.requests.append(request)
            if method == "POST":
                if not key:
                    request.status = 400
                    return 400, _error("invalid_request_error", "LLMHub's fake Stripe requires an Idempotency-Key."), {}
                if key in self._saved:
                    saved_params, status, saved_body = self._saved[key]
                    if saved_params != (path, params):
                        request.status = 400
                        return (
                            400,
                            _error(
                                "idempotency_error",
                                "Keys for idempotent requests can only be used with the same parameters they were "
                                "first used with.",
                            ),
                            {},
                        )
                    request.status, request.replayed = status, True
                    return status, saved_body, {"Idempotent-Replayed": "true"}
                for failure in self.failures:
                    if path.startswith(failure[0]) and failure[1] > 0:
                        failure[1] -= 1
                        request.status = failure[2]
                        return failure[2], _error("api_error", "Injected failure."), {}
            status, answer = self._route(method, path, params)
            request.status = status
            if method == "POST" and status < 500:
                self._saved[key] = ((path, params), status, answer)
            return status, answer, {}

    def _route(self, method: str, path: str, params: dict) -> tuple[int, dict]:
        parts = path.strip("/").split("/")
        if method == "POST" and path == "/v1/customers":
            customer = {"id": f"cus_{next(self._ids):06d}", "object": "customer", "email": params.get("email"),
                        "name": params.get("name"), "metadata": _nested(params, "metadata")}  # fmt: skip
            self.customers[customer["id"]] = customer
            return 200, customer
        if method == "POST" and path == "/v1/invoices":
            if params.get("customer") not in self.customers:
                return 400, _error("invalid_request_error", f"No such customer: '{params.get('customer')}'")
            invoice = {
                "id": f"in_{next(self._ids):06d}", "object": "invoice", "status": "draft",
                "customer": params["customer"], "collection_method": params.get("collection_method"),
                "currency": params.get("currency", "usd"), "description": params.get("description"),
                "metadata": _nested(params, "metadata"), "hosted_invoice_url": None, "amount_due": 0, "lines": [],
            }  # fmt: skip
            self.invoices[invoice["id"]] = invoice
            return 200, invoice
        if method == "POST" and path == "/v1/invoiceitems":
            invoice = self.invoices.get(params.get("invoice", ""))
            if invoice is None:
                return 400, _error("invalid_request_error", f"No such invoice: '{params.get('invoice')}'")
            if invoice["status"] != "draft" or invoice["customer"] != params.get("customer"):
                return 400, _error(
                    "invalid_request_error", "Items can only be added to a draft invoice of the customer."
                )
            try:
                amount = int(params["amount"])
            except (KeyError, ValueError):
                return 400, _error("invalid_request_error", "amount must be an integer number of cents.")
            item = {"id": f"ii_{next(self._ids):06d}", "object": "invoiceitem", "amount": amount,
                    "currency": params.get("currency"), "description": params.get("description"),
                    "invoice": invoice["id"], "metadata": _nested(params, "metadata")}  # fmt: skip
            self.items[item["id"]] = item
            invoice["lines"].append(item["id"])
            invoice["amount_due"] += amount
            return 200, item
        if len(parts) == 4 and parts[:2] == ["v1", "invoices"] and parts[3] == "finalize" and method == "POST":
            invoice = self.invoices.get(parts[2])
            if invoice is None:
                return 404, _error("invalid_request_error", f"No such invoice: '{parts[2]}'")
            if invoice["status"] != "draft":
                return 400, _error("invalid_request_error", "This invoice is already finalized.")
            invoice["status"] = "open" if invoice["amount_due"] else "paid"
            invoice["hosted_invoice_url"] = f"{self.url}/hosted/{invoice['id']}"
            return 200, invoice
        if len(parts) == 3 and parts[:2] == ["v1", "invoices"] and method == "GET":
            invoice = self.invoices.get(parts[2])
            return (200, invoice) if invoice else (404, _error("invalid_request_error", "No such invoice"))
        return 404, _error("invalid_request_error", f"Unrecognized request URL ({method}: {path}).")


def _error(kind: str, message: str) -> dict:
    return {"error": {"type": kind, "message": message}}


def _nested(params: dict, name: str) -> dict:
    """Stripe's form encoding of a hash: ``metadata[key]=value`` → {"key": "value"}."""
    prefix = f"{name}["
    return {k[len(prefix) : -1]: v for k, v in params.items() if k.startswith(prefix) and k.endswith("]")}


def start(api_key: str) -> tuple[FakeStripe, ThreadingHTTPServer]:
    """Start the fake on 127.0.0.1 at a free port in a daemon thread; returns (fake, server)."""
    fake = FakeStripe(api_key=api_key)

    class Stripe(Handler):
        def _answer(self):
            status, answer, extra = fake.handle(self.command, urlsplit(self.path).path, self.headers, self.read_body())
            self.reply(status, answer, headers={"Request-Id": f"req_{next(fake._ids):06d}", **extra})

        do_GET = do_POST = _answer

    server = serve(Stripe)
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    return fake, server
