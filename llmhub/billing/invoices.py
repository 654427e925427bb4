"""Writes for weekly invoices and their payment: building, pushing to Stripe, Stripe's webhook events.

All money is Decimal USD; usage comes from `metering.py`. Every write that may run twice at once is a
claim: a unique constraint (invoices, processed Stripe events) or a conditional update.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from llmhub.accounts.models import User
from llmhub.deployments.models import Deployment
from llmhub.fleet.models import GpuType, Instance
from llmhub.queue import task_send

from . import stripe
from .failures import failure_record
from .ledger import ledger_entries
from .limits import billing_account_get
from .models import BillingAccount, BillingFailure, Invoice, InvoiceInterval, InvoiceLine, StripeEvent
from .periods import WEEK, week_start
from .prices import money

log = logging.getLogger(__name__)


class InvoiceNumberClash(Exception):
    """Two different invoices would have the same number: a bug to fix, never a concurrent build."""


def invoice_number(account: BillingAccount, period_start: datetime) -> str:
    """``<ISO year>W<ISO week>-<account id>``, e.g. ``2025W23-00042``, from the period's start in UTC (weeks
    start on Monday 00:00 UTC, as ISO's)."""
    start = period_start.astimezone(UTC)
    return f"{start:%G}W{start:%V}-{account.id:05d}"


def invoice_build(
    *, account: BillingAccount, period_start: datetime, now: datetime | None = None
) -> tuple[Invoice | None, bool]:
    """Build the account's invoice for the week starting `period_start` (a Monday 00:00 UTC), from the
    ledger (`ledger.ledger_entries`): whatever usage up to the week's end the invoices do not match yet.

    Usage lines: one per deployment and rate (USD per GPU-hour) for the week's own usage, GPU-seconds
    summed over the instance intervals inside the week (kept as the line's intervals). Adjustment lines:
    one per earlier week, instance and rate whose usage was recorded after that week's invoice (late
    starts billed, late stops credited, with negative GPU-seconds). Every amount = GPU-seconds × rate ÷
    3600 rounded half-up once to cents. Instances still running count up to the week's end.

    Holds the account's row lock, so builds of one account run one after another. Returns (invoice,
    created): an existing invoice unchanged with created False, or (None, False) when nothing is owed.
    Raises ValueError for a week that has not ended or a start that is not a Monday 00:00 UTC, and
    InvoiceNumberClash when the number is another invoice's (both named).
    """
    now = now or timezone.now()
    if week_start(period_start) != period_start:
        raise ValueError(f"{period_start.isoformat()} is not a Monday 00:00 UTC")
    period_start = period_start.astimezone(UTC)
    period_end = period_start + WEEK
    if period_end > now:
        raise ValueError(f"the week starting {period_start:%Y-%m-%d} has not ended")
    with transaction.atomic():
        BillingAccount.objects.select_for_update().filter(id=account.id).first()
        existing = Invoice.objects.filter(account=account, period_start=period_start).first()
        if existing is not None:
            return existing, False
        entries = [
            e for e in ledger_entries(user_id=account.user_id, end=period_end, now=now) if e.week <= period_start
        ]
        if not entries:
            return None, False
        number = invoice_number(account, period_start)
        clash = Invoice.objects.filter(number=number).first()
        if clash is not None:
            raise InvoiceNumberClash(
                f"invoice number {number} for account {account.id}, week of {period_start:%Y-%m-%d}, is already "
                f"invoice {clash.id} of account {clash.account_id}, week of {clash.period_start:%Y-%m-%d}"
            )
        invoice = Invoice.objects.create(
            account=account, number=number, period_start=period_start, period_end=period_end, created_at=now
        )
        groups = defaultdict(list)
        for entry in entries:
            own = entry.week == period_start
            groups[(entry.week, not own, entry.deployment_id, None if own else entry.instance_id, entry.hourly_rate,
                    entry.gpu_type_id, entry.num_gpus)].append(entry)  # fmt: skip
        deployments = Deployment.objects.select_related("user").in_bulk({key[2] for key in groups})
        names = dict(GpuType.objects.filter(id__in={key[5] for key in groups}).values_list("id", "name"))
        total = Decimal(0)
        for key in sorted(groups, key=lambda k: (k[0], k[2], k[3] or 0, k[4])):
            week, adjustment, deployment_id, instance_id, rate, gpu_type_id, num_gpus = key
            group = groups[key]
            gpu_seconds = sum((e.gpu_seconds for e in group), Decimal(0))
            line = InvoiceLine.objects.create(
                invoice=invoice,
                week_start=week,
                is_adjustment=adjustment,
                instance_id=instance_id,
                deployment=deployments[deployment_id],
                deployment_name=deployments[deployment_id].full_name,
                gpu_type_name=names.get(gpu_type_id, ""),
                num_gpus=num_gpus,
                hourly_rate=rate,
                gpu_seconds=gpu_seconds,
                amount=money(gpu_seconds * rate / 3600),
            )
            InvoiceInterval.objects.bulk_create(
                InvoiceInterval(
                    line=line,
                    instance_id=e.instance_id,
                    host_name=e.host_name,
                    start=e.start,
                    end=e.end,
                    seconds=e.seconds,
                )  # fmt: skip
                for e in sorted(group, key=lambda e: (e.start, e.instance_id))
            )
            total += line.amount
        invoice.total = total
        if total == 0:
            invoice.status, invoice.paid_at = Invoice.Status.PAID, now  # nothing to collect
        invoice.save(update_fields=["total", "status", "paid_at"])
    if total != 0 and stripe.enabled():
        task_send("workers.tasks.billing_invoice_push", invoice.id)
    return invoice, True


def invoices_build_due(*, now: datetime | None = None) -> list[Invoice]:
    """Build the invoices owed for every week that ended at least `BILLING_INVOICE_GRACE` seconds ago (so
    hosts lost at the week's end are known), however long ago: for each account with usage the ledger
    does not match, each week without an invoice whose own usage is unbilled gets its invoice; usage of
    an already invoiced week recorded late goes, as adjustments, on the next invoice built (at the latest
    the last ended week's). Each account is handled in its own transaction: an error is logged with the
    account, recorded (`BillingFailure`, counted in /metrics) and the other accounts are still invoiced.
    Returns the invoices created."""
    now = now or timezone.now()
    cutoff = week_start(now - timedelta(seconds=settings.BILLING_INVOICE_GRACE))
    users = (
        Instance.objects.filter(started_at__isnull=False, started_at__lt=cutoff)
        .values_list("deployment__user_id", flat=True)
        .distinct()
    )
    created = []
    for user in User.objects.filter(id__in=list(users)).order_by("id"):
        account = billing_account_get(user=user)
        try:
            created += _account_invoices_build(account, cutoff=cutoff, now=now)
        except Exception as exc:  # noqa: BLE001 — this account's failure is this account's alone
            failure_record(account=account, job=BillingFailure.Job.INVOICES, error=exc, now=now)
    return created


def _account_invoices_build(account: BillingAccount, *, cutoff: datetime, now: datetime) -> list[Invoice]:
    weeks = {e.week for e in ledger_entries(user_id=account.user_id, end=cutoff, now=now)}
    if not weeks:
        return []
    invoiced = set(Invoice.objects.filter(account=account).values_list("period_start", flat=True))
    created, carried, week, last = [], False, min(weeks), cutoff - WEEK
    while week <= last:
        if week in invoiced:
            carried = carried or week in weeks
        elif week in weeks or (carried and week == last):
            invoice, was_created = invoice_build(account=account, period_start=week, now=now)
            if was_created:
                created.append(invoice)
            carried = False
        week += WEEK
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
        return "nothing to collect"  # a credit (negative total) goes to Stripe too: the customer's balance
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
        for line in invoice.lines.filter(stripe_invoice_item_id="").exclude(amount=0):
            item_id = stripe.invoice_item_create(
                customer_id=account.stripe_customer_id,
                invoice_id=invoice.stripe_invoice_id,
                amount_cents=int(line.amount * 100),
                description=line.description,
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
    ids = Invoice.objects.filter(status=Invoice.Status.OPEN, stripe_status__in=["", "draft"]).exclude(total=0)
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
