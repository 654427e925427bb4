"""The one seam to Stripe (the `stripe` SDK). Nothing else in LLMHub imports `stripe`.

Stripe API: customers, invoice items, invoices (create, finalize) with `Idempotency-Key` headers, and
signed webhook events (`Stripe-Signature`, HMAC-SHA256 of "<timestamp>.<payload>" with the endpoint's
secret). Settings: `STRIPE_SECRET_KEY` (payment collection is off without it), `STRIPE_WEBHOOK_SECRET`,
`STRIPE_API_BASE` (tests point it at a local server). Keys are never logged or shown: errors carry
Stripe's message only.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import stripe as stripe_sdk
from django.conf import settings


class StripeError(Exception):
    """A Stripe call failed; the message says why (never containing a key)."""


class WebhookError(Exception):
    """A webhook request that is not a genuine Stripe event (bad signature or payload)."""


@dataclass(frozen=True)
class StripeInvoice:
    id: str
    status: str  # draft, open, paid, uncollectible, void
    hosted_invoice_url: str


def enabled() -> bool:
    """True when a Stripe secret key is configured (payment collection on)."""
    return bool(settings.STRIPE_SECRET_KEY)


def webhooks_enabled() -> bool:
    return bool(settings.STRIPE_WEBHOOK_SECRET)


def _client() -> stripe_sdk.StripeClient:
    return stripe_sdk.StripeClient(
        settings.STRIPE_SECRET_KEY,
        base_addresses={"api": settings.STRIPE_API_BASE},
        max_network_retries=2,
    )


def _call(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except stripe_sdk.StripeError as exc:
        message = getattr(exc, "user_message", None) or str(exc.__class__.__name__)
        error = getattr(exc, "error", None)
        if error is not None and getattr(error, "message", None):
            message = error.message
        raise StripeError(f"Stripe: {message}") from None


def customer_create(*, email: str, name: str, account_id: int, idempotency_key: str) -> str:
    """Create a Stripe customer for billing account `account_id`; returns its id (``cus_…``)."""
    params = {"name": name, "metadata": {"llmhub_account_id": str(account_id)}}
    if email:
        params["email"] = email
    customer = _call(_client().v1.customers.create, params=params, options={"idempotency_key": idempotency_key})
    return customer.id


def invoice_create(
    *, customer_id: str, number: str, description: str, days_until_due: int, idempotency_key: str
) -> StripeInvoice:
    """Create a draft invoice that collects by e-mailed payment link and includes only items attached to it."""
    invoice = _call(
        _client().v1.invoices.create,
        params={
            "customer": customer_id,
            "collection_method": "send_invoice",
            "days_until_due": days_until_due,
            "pending_invoice_items_behavior": "exclude",
            "auto_advance": True,
            "currency": "usd",
            "description": description,
            "metadata": {"llmhub_invoice": number},
        },
        options={"idempotency_key": idempotency_key},
    )
    return StripeInvoice(invoice.id, invoice.status or "", getattr(invoice, "hosted_invoice_url", None) or "")


def invoice_item_create(
    *,
    customer_id: str,
    invoice_id: str,
    amount_cents: int,
    description: str,
    period_start: datetime,
    period_end: datetime,
    line_id: int,
    idempotency_key: str,
) -> str:
    """Attach one line (amount in US cents) to draft invoice `invoice_id`; returns the item id (``ii_…``)."""
    item = _call(
        _client().v1.invoice_items.create,
        params={
            "customer": customer_id,
            "invoice": invoice_id,
            "amount": amount_cents,
            "currency": "usd",
            "description": description,
            "period": {"start": int(period_start.timestamp()), "end": int(period_end.timestamp())},
            "metadata": {"llmhub_invoice_line": str(line_id)},
        },
        options={"idempotency_key": idempotency_key},
    )
    return item.id


def invoice_finalize(*, invoice_id: str, idempotency_key: str) -> StripeInvoice:
    """Finalize draft invoice `invoice_id` (Stripe then e-mails it and collects payment)."""
    invoice = _call(
        _client().v1.invoices.finalize_invoice,
        invoice_id,
        params={"auto_advance": True},
        options={"idempotency_key": idempotency_key},
    )
    return StripeInvoice(invoice.id, invoice.status or "", getattr(invoice, "hosted_invoice_url", None) or "")


def webhook_event(*, payload: bytes, signature: str) -> dict:
    """Verify a webhook request's `Stripe-Signature` and return the event as a dict
    (``{"id", "type", "data": {"object": {...}}}``). Raises WebhookError when it is not genuine."""
    if not webhooks_enabled():
        raise WebhookError("Stripe webhooks are not configured (STRIPE_WEBHOOK_SECRET is empty).")
    try:
        event = stripe_sdk.Webhook.construct_event(payload, signature, settings.STRIPE_WEBHOOK_SECRET)
    except stripe_sdk.SignatureVerificationError:
        raise WebhookError("The Stripe-Signature header does not match the payload.") from None
    except ValueError:
        raise WebhookError("The payload is not a Stripe event.") from None
    return event.to_dict()
