"""Writes for weekly invoices and their payment: building, pushing to Stripe, Stripe's webhook events.

All money is Decimal USD; usage comes from `metering.py`. Every write that may run twice at once is a
claim: a unique constraint (invoices, processed Stripe events) or a conditional update.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from llmhub.accounts.models import User
from llmhub.deployments.models import Deployment
from llmhub.fleet.models import Instance

from . import stripe
from .limits import billing_account_get
from .metering import usage_pieces
from .models import BillingAccount, Invoice, InvoiceInterval, InvoiceLine, StripeEvent
from .periods import WEEK, week_start
from .prices import money

log = logging.getLogger(__name__)


def invoice_number(account: BillingAccount, period_start: datetime) -> str:
    """``<ISO year>W<ISO week>-<account id>``, e.g. ``2025W23-00042`` (weeks start on Monday, as ISO's)."""
    return f"{period_start:%G}W{period_start:%V}-{account.id:05d}"


def invoice_build(
    *, account: BillingAccount, period_start: datetime, now: datetime | None = None
) -> tuple[Invoice | None, bool]:
    """Build the account's invoice for the week starting `period_start` (a Monday 00:00 UTC).

    One line per deployment and rate (USD per GPU-hour): GPU-seconds summed over the instance intervals
    inside the week (kept as the line's intervals), amount = GPU-seconds × rate ÷ 3600 rounded once to
    cents. Intervals crossing the week's edges are cut there; instances still running count up to the
    week's end. Returns (invoice, created): an existing invoice unchanged with created False (building
    twice never adds an invoice or a line), or (None, False) when the account used nothing that week.
    Raises ValueError for a week that has not ended or a start that is not a Monday 00:00 UTC.
    """
    now = now or timezone.now()
    if week_start(period_start) != period_start:
        raise ValueError(f"{period_start.isoformat()} is not a Monday 00:00 UTC")
    period_end = period_start + WEEK
    if period_end > now:
        raise ValueError(f"the week starting {period_start:%Y-%m-%d} has not ended")
    existing = Invoice.objects.filter(account=account, period_start=period_start).first()
    if existing is not None:
        return existing, False
    pieces = usage_pieces(start=period_start, end=period_end, now=now, user_ids=[account.user_id])
    if not pieces:
        return None, False
    groups = defaultdict(list)
    for piece in pieces:
        groups[(piece.deployment_id, piece.hourly_rate)].append(piece)
    deployments = Deployment.objects.select_related("user", "gpu_type").in_bulk({d for d, _ in groups})
    try:
        with transaction.atomic():
            invoice = Invoice.objects.create(
                account=account,
                number=invoice_number(account, period_start),
                period_start=period_start,
                period_end=period_end,
                created_at=now,
            )
            total = Decimal(0)
            for (deployment_id, rate), group in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
                deployment = deployments[deployment_id]
                gpu_seconds = sum((p.gpu_seconds for p in group), Decimal(0))
                line = InvoiceLine.objects.create(
                    invoice=invoice,
                    deployment=deployment,
                    deployment_name=deployment.full_name,
                    gpu_type_name=deployment.gpu_type.name,
                    num_gpus=deployment.num_gpus,
                    hourly_rate=rate,
                    gpu_seconds=gpu_seconds,
                    amount=money(gpu_seconds * rate / 3600),
                )
                InvoiceInterval.objects.bulk_create(
                    InvoiceInterval(
                        line=line,
                        instance_id=p.instance_id,
                        host_name=p.host_name,
                        start=p.start,
                        end=p.end,
                        seconds=p.seconds,
                    )  # fmt: skip
                    for p in sorted(group, key=lambda p: (p.start, p.instance_id))
                )
                total += line.amount
            invoice.total = total
            if total == 0:
                invoice.status, invoice.paid_at = Invoice.Status.PAID, now  # nothing to collect
            invoice.save(update_fields=["total", "status", "paid_at"])
    except IntegrityError:  # a concurrent build made it first
        return Invoice.objects.get(account=account, period_start=period_start), False
    if total > 0:
        transaction.on_commit(lambda: _push_soon(invoice.id))
    return invoice, True


def _push_soon(invoice_id: int) -> None:
    if stripe.enabled():
        from workers import tasks

        tasks.billing_invoice_push.delay(invoice_id)


def invoices_build_due(*, now: datetime | None = None) -> list[Invoice]:
    """Build the invoices of every account with usage for the last `BILLING_INVOICE_WEEKS_BACK` weeks that
    ended at least `BILLING_INVOICE_GRACE` seconds ago (so hosts lost at the week's end are known) and
    have none yet. Returns the invoices created."""
    now = now or timezone.now()
    last_end = week_start(now - timedelta(seconds=settings.BILLING_INVOICE_GRACE))
    created = []
    for weeks_ago in range(settings.BILLING_INVOICE_WEEKS_BACK, 0, -1):
        start = last_end - weeks_ago * WEEK
        end = start + WEEK
        users = set(
            Instance.objects.filter(started_at__isnull=False, started_at__lt=end)
            .filter(Q(stopped_at__isnull=True) | Q(stopped_at__gt=start))
            .values_list("deployment__user_id", flat=True)
        )
        users -= set(Invoice.objects.filter(period_start=start).values_list("account__user_id", flat=True))
        for user in User.objects.filter(id__in=users).order_by("id"):
            invoice, was_created = invoice_build(account=billing_account_get(user=user), period_start=start, now=now)
            if was_created:
                created.append(invoice)
    return created


def invoice_push(*, invoice_id: int) -> str:
    """Send invoice `invoice_id` to Stripe: the account's customer (made once), a draft invoice, one
    invoice item per line (amount in cents), then finalize. Every request carries an idempotency key
    derived from our ids (``llmhub-customer-<account>``, ``llmhub-invoice-<id>``,
    ``llmhub-invoice-line-<line id>``, ``llmhub-invoice-<id>-finalize``) and every Stripe id is stored,
    so a retry after any failure makes nothing twice.

    Returns "off" (no Stripe key), "nothing to collect", "already sent", "sent" or "failed: <why>"
    (the reason is also kept on the invoice; the next run retries).
    """
    if not stripe.enabled():
        return "off"
    invoice = Invoice.objects.select_related("account__user").get(id=invoice_id)
    if invoice.total == 0:
        return "nothing to collect"
    if invoice.stripe_status not in ("", "draft"):
        return "already sent"
    account = invoice.account
    try:
        if not account.stripe_customer_id:
            customer_id = stripe.customer_create(
                email=account.alert_address or account.user.email,
                name=account.user.get_full_name() or account.user.username,
                account_id=account.id,
                idempotency_key=f"llmhub-customer-{account.id}",
            )
            BillingAccount.objects.filter(id=account.id, stripe_customer_id="").update(stripe_customer_id=customer_id)
            account.refresh_from_db(fields=["stripe_customer_id"])
        if not invoice.stripe_invoice_id:
            draft = stripe.invoice_create(
                customer_id=account.stripe_customer_id,
                number=invoice.number,
                description=f"LLMHub GPU uptime, week of {invoice.period_start:%Y-%m-%d} (UTC)",
                days_until_due=settings.BILLING_INVOICE_DAYS_UNTIL_DUE,
                idempotency_key=f"llmhub-invoice-{invoice.id}",
            )
            Invoice.objects.filter(id=invoice.id).update(stripe_invoice_id=draft.id, stripe_status=draft.status)
            invoice.stripe_invoice_id = draft.id
        for line in invoice.lines.filter(stripe_invoice_item_id="", amount__gt=0):
            item_id = stripe.invoice_item_create(
                customer_id=account.stripe_customer_id,
                invoice_id=invoice.stripe_invoice_id,
                amount_cents=int(line.amount * 100),
                description=(
                    f"{line.deployment_name}: {line.num_gpus} × {line.gpu_type_name}, "
                    f"{line.gpu_hours:.3f} GPU-hours at {line.hourly_rate:.4f} USD per GPU-hour"
                ),
                period_start=invoice.period_start,
                period_end=invoice.period_end,
                line_id=line.id,
                idempotency_key=f"llmhub-invoice-line-{line.id}",
            )
            InvoiceLine.objects.filter(id=line.id).update(stripe_invoice_item_id=item_id)
        final = stripe.invoice_finalize(
            invoice_id=invoice.stripe_invoice_id, idempotency_key=f"llmhub-invoice-{invoice.id}-finalize"
        )
    except stripe.StripeError as exc:
        Invoice.objects.filter(id=invoice.id).update(stripe_error=str(exc)[:1000])
        log.warning("invoice %s: %s", invoice.number, exc)
        return f"failed: {exc}"
    Invoice.objects.filter(id=invoice.id).update(
        stripe_status=final.status, stripe_hosted_url=final.hosted_invoice_url, stripe_error=""
    )
    return "sent"


def invoices_push_pending() -> dict[int, str]:
    """Push every unpaid invoice with something to collect that Stripe has not finalized yet.
    Returns {invoice id: outcome} (see `invoice_push`)."""
    if not stripe.enabled():
        return {}
    ids = Invoice.objects.filter(status=Invoice.Status.OPEN, total__gt=0, stripe_status__in=["", "draft"])
    return {invoice_id: invoice_push(invoice_id=invoice_id) for invoice_id in ids.values_list("id", flat=True)}


def stripe_event_process(*, payload: bytes, signature: str, now: datetime | None = None) -> str:
    """Record one Stripe webhook event: ``invoice.paid`` marks the invoice paid, ``invoice.payment_failed``
    marks it payment failed (a paid invoice stays paid). An event already processed changes nothing.

    Raises stripe.WebhookError when the signature does not verify. Returns what was done, in words.
    """
    now = now or timezone.now()
    event = stripe.webhook_event(payload=payload, signature=signature)
    event_id, kind = str(event.get("id", "")), str(event.get("type", ""))
    if not event_id:
        raise stripe.WebhookError("The event has no id.")
    obj = (event.get("data") or {}).get("object") or {}
    with transaction.atomic():
        record, created = StripeEvent.objects.get_or_create(event_id=event_id, defaults={"type": kind})
        if not created:
            return "already processed"
        if not kind.startswith("invoice.") or obj.get("object") != "invoice":
            record.outcome = "ignored"
            record.save(update_fields=["outcome"])
            return record.outcome
        invoice = Invoice.objects.filter(stripe_invoice_id=obj.get("id") or "-").first()
        if invoice is None:
            number = (obj.get("metadata") or {}).get("llmhub_invoice")
            invoice = Invoice.objects.filter(number=number).first() if number else None
        if invoice is None:
            record.outcome = "no such invoice"
        elif kind == "invoice.paid":
            Invoice.objects.filter(id=invoice.id).exclude(status=Invoice.Status.PAID).update(
                status=Invoice.Status.PAID, paid_at=now, stripe_status=obj.get("status") or "paid"
            )
            record.outcome = f"{invoice.number} paid"
        elif kind == "invoice.payment_failed":
            updated = Invoice.objects.filter(id=invoice.id, status=Invoice.Status.OPEN).update(
                status=Invoice.Status.PAYMENT_FAILED, stripe_status=obj.get("status") or "open"
            )
            record.outcome = f"{invoice.number} payment failed" if updated else f"{invoice.number} unchanged"
        else:
            record.outcome = "ignored"
        record.invoice = invoice
        record.save(update_fields=["outcome", "invoice"])
        return record.outcome
