"""Writes for billing: prices, spending limits (alerts, suspension, resumption), weekly invoices, Stripe.

All money is Decimal USD; usage comes from `metering.py`. Every write that may run twice at once is a
claim: a unique constraint (alerts, invoices, processed Stripe events), a row lock (the billing account
during a limit check), or a conditional ``UPDATE … WHERE state = old`` (deployments, deliveries).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.template.loader import render_to_string
from django.utils import timezone

from llmhub import outbound
from llmhub.accounts.models import User
from llmhub.deployments.models import Deployment
from llmhub.deployments.services import event_record, reconcile_soon
from llmhub.fleet.models import GpuType, Instance

from . import stripe
from .metering import PriceBook, cost_by_user, usage_pieces
from .models import (
    CENT,
    AlertDelivery,
    BillingAccount,
    GpuPrice,
    Invoice,
    InvoiceInterval,
    InvoiceLine,
    SpendingAlert,
    StripeEvent,
    Suspension,
)
from .periods import WEEK, month_start, next_month, week_start

log = logging.getLogger(__name__)

SUSPENDABLE = (Deployment.Status.DEPLOYING, Deployment.Status.RUNNING)
DELIVERY_MAX_ATTEMPTS = 8
DELIVERY_BACKOFF_SECONDS = 30.0
DELIVERY_BACKOFF_MAX_SECONDS = 3600.0
DELIVERY_STALE_SECONDS = 300.0  # a claimed delivery whose worker died is retried after this


def money(value: Decimal) -> Decimal:
    """`value` USD rounded half-up to cents (the one rounding, per invoice line)."""
    return value.quantize(CENT, rounding=ROUND_HALF_UP)


# --- Prices --------------------------------------------------------------------------------------------


def gpu_price_record_current(*, gpu_type: GpuType, now: datetime | None = None) -> GpuPrice | None:
    """Make `gpu_type.hourly_price` (USD per GPU-hour) the price from `now` on, unless it already is.

    Called when a GPU type is saved (admin edit, `gpu_type_ensure`), so editing the price never changes
    what was billed before. Returns the new price row, or None when nothing changed.
    """
    now = now or timezone.now()
    in_force = PriceBook([gpu_type.id]).rate_at(gpu_type.id, now) if gpu_type.prices.exists() else None
    if in_force is not None and in_force == gpu_type.hourly_price:
        return None
    try:
        with transaction.atomic():
            return GpuPrice.objects.create(gpu_type=gpu_type, hourly_price=gpu_type.hourly_price, effective_at=now)
    except IntegrityError:  # two saves in the same microsecond: the first one stands
        return None


def gpu_price_schedule(
    *, gpu_type: GpuType, hourly_price: Decimal, effective_at: datetime, now: datetime | None = None
) -> GpuPrice:
    """Schedule a price (USD per GPU-hour) for `gpu_type` from `effective_at` on.

    Raises ValidationError when `effective_at` is in the past (prices never apply retroactively), the
    price is negative, or another price of the type starts at the same moment.
    """
    now = now or timezone.now()
    if effective_at < now - timedelta(seconds=60):
        raise ValidationError({"effective_at": "A price cannot start in the past: what was billed stays billed."})
    if hourly_price < 0:
        raise ValidationError({"hourly_price": "A price cannot be negative."})
    if GpuPrice.objects.filter(gpu_type=gpu_type, effective_at=effective_at).exists():
        raise ValidationError({"effective_at": "This GPU type already has a price starting at that moment."})
    price = GpuPrice.objects.create(gpu_type=gpu_type, hourly_price=hourly_price, effective_at=effective_at)
    gpu_prices_sync(now=now)
    return price


def gpu_prices_sync(*, now: datetime | None = None) -> int:
    """Copy the price in force now into `GpuType.hourly_price` (which cost estimates read) for every type
    whose scheduled price has come into force. Returns the number of types changed."""
    now = now or timezone.now()
    types = list(GpuType.objects.filter(prices__isnull=False).distinct())
    book = PriceBook(t.id for t in types)
    changed = 0
    for gpu_type in types:
        rate = book.rate_at(gpu_type.id, now)
        # A queryset update: no post_save, so no new price row for a price that is already history.
        changed += GpuType.objects.filter(id=gpu_type.id).exclude(hourly_price=rate).update(hourly_price=rate)
    return changed


# --- Accounts and spending limits -----------------------------------------------------------------------


def billing_account_get(*, user: User) -> BillingAccount:
    """The user's billing account, created with the defaults (no limit; alerts at 50, 80, 100 %) if missing."""
    account, _ = BillingAccount.objects.get_or_create(user=user)
    return account


@dataclass
class CheckResult:
    """What one spending-limit check of an account found and did."""

    spent: Decimal  # USD this month, unrounded
    limit: Decimal | None
    alerts: list[int] = field(default_factory=list)  # thresholds (%) newly reached
    suspended: int = 0  # deployments suspended by this check
    resumed: int = 0  # deployments resumed by this check


def billing_settings_update(
    *,
    account: BillingAccount,
    monthly_limit: Decimal | None,
    alert_thresholds: list[int],
    alert_email: str = "",
    alert_webhook_url: str = "",
    now: datetime | None = None,
) -> CheckResult:
    """Save the account's monthly limit (USD, None: no limit) and alert settings, then check the limit
    at once: a limit already reached suspends the deployments, a raised or removed one resumes them.

    Raises ValidationError keyed by field for a limit ≤ 0 or thresholds outside 1–100 %; nothing is saved then.
    """
    if monthly_limit is not None and monthly_limit <= 0:
        raise ValidationError({"monthly_limit": "The limit must be more than 0 USD; leave it empty for no limit."})
    if any(not 1 <= t <= 100 for t in alert_thresholds):
        raise ValidationError({"alert_thresholds": "Thresholds are percentages from 1 to 100."})
    with transaction.atomic():
        BillingAccount.objects.select_for_update().filter(id=account.id).first()
        account.monthly_limit = money(monthly_limit) if monthly_limit is not None else None
        account.alert_thresholds = sorted(set(alert_thresholds))
        account.alert_email = alert_email
        account.alert_webhook_url = alert_webhook_url
        account.save(
            update_fields=["monthly_limit", "alert_thresholds", "alert_email", "alert_webhook_url", "updated_at"]
        )
    return account_check(account_id=account.id, now=now)


def spending_check_all(*, now: datetime | None = None) -> list[CheckResult]:
    """Check every account with a monthly limit (or held by one): alert at each threshold once per month,
    suspend at 100 %, resume when the limit no longer holds (raised, removed, or a new month).

    Runs every `BILLING_CHECK_INTERVAL` seconds, so the spend passes the limit by at most one interval of
    the account's running cost: suspension stops the billing at the moment of the check.
    """
    now = now or timezone.now()
    month = month_start(now)
    accounts = list(
        BillingAccount.objects.filter(Q(monthly_limit__isnull=False) | Q(suspended_at__isnull=False)).values_list(
            "id", "user_id"
        )
    )
    if not accounts:
        return []
    spent = cost_by_user(user_ids=[u for _, u in accounts], start=month, end=next_month(month), now=now)
    return [account_check(account_id=a, spent=spent[u], now=now) for a, u in accounts]


def account_check(*, account_id: int, now: datetime | None = None, spent: Decimal | None = None) -> CheckResult:
    """Check one account's spending this month (USD; computed when `spent` is not given) against its limit.

    Holds the account's row lock, so concurrent checks of one account run one after another; alerts are
    also unique per (account, month, threshold, limit). Returns what was found and done.
    """
    now = now or timezone.now()
    month = month_start(now)
    with transaction.atomic():
        account = BillingAccount.objects.select_for_update().select_related("user").get(id=account_id)
        if spent is None:
            spent = cost_by_user(user_ids=[account.user_id], start=month, end=next_month(month), now=now)[
                account.user_id
            ]
        limit = account.monthly_limit
        result = CheckResult(spent=spent, limit=limit)
        if limit is None:
            if account.suspended_at:
                result.resumed = _resume(account, now=now)
            return result
        created = []
        for threshold in sorted(set(account.alert_thresholds)):
            if spent * 100 < limit * threshold:
                break
            alert, was_created = SpendingAlert.objects.get_or_create(
                account=account,
                month=month.date(),
                threshold=threshold,
                limit=limit,
                defaults={"spent": money(spent), "created_at": now},
            )
            if was_created:
                created.append(alert)
        if created:
            *lower, top = created
            SpendingAlert.objects.filter(id__in=[a.id for a in lower]).update(superseded=True)
            _deliveries_create(account, top, now=now)
            result.alerts = [a.threshold for a in created]
        if spent >= limit:
            result.suspended = _suspend(account, limit=limit, now=now)
        elif account.suspended_at:
            result.resumed = _resume(account, now=now)
        return result


def suspension_reason(limit: Decimal) -> str:
    return (
        f"suspended: spending limit reached (monthly limit {limit:,.2f} USD). "
        "Raise or remove the limit on the billing settings page to resume."
    )


def _suspend(account: BillingAccount, *, limit: Decimal, now: datetime) -> int:
    """Hold the account's deploying/running deployments (status `suspended`, scaled to zero by the
    reconciler), remembering their status. Returns how many this call suspended."""
    BillingAccount.objects.filter(id=account.id, suspended_at__isnull=True).update(suspended_at=now)
    account.suspended_at = account.suspended_at or now
    reason = suspension_reason(limit)
    done = 0
    for deployment in Deployment.objects.filter(user_id=account.user_id, status__in=SUSPENDABLE):
        if not Deployment.objects.filter(id=deployment.id, status=deployment.status).update(
            status=Deployment.Status.SUSPENDED, fail_reason=reason, updated_at=now
        ):
            continue  # changed meanwhile (deleted, failed): leave it
        Suspension.objects.create(
            account=account,
            deployment=deployment,
            previous_status=deployment.status,
            previous_fail_reason=deployment.fail_reason,
            suspended_at=now,
        )
        event_record(deployment=deployment, kind="suspended", message=reason)
        reconcile_soon(deployment.id)
        done += 1
    return done


def _resume(account: BillingAccount, *, now: datetime) -> int:
    """Give the account's suspended deployments back their previous status (and so their scale).
    Returns how many this call resumed."""
    if not BillingAccount.objects.filter(id=account.id, suspended_at__isnull=False).update(suspended_at=None):
        return 0
    account.suspended_at = None
    done = 0
    for suspension in Suspension.objects.filter(account=account, resumed_at__isnull=True).select_related("deployment"):
        Suspension.objects.filter(id=suspension.id, resumed_at__isnull=True).update(resumed_at=now)
        if Deployment.objects.filter(id=suspension.deployment_id, status=Deployment.Status.SUSPENDED).update(
            status=suspension.previous_status, fail_reason=suspension.previous_fail_reason, updated_at=now
        ):
            event_record(
                deployment=suspension.deployment,
                kind="resumed",
                message=f"the spending limit no longer holds; back to {suspension.previous_status}",
            )
            reconcile_soon(suspension.deployment_id)
            done += 1
    return done


# --- Alerts (outbox) ------------------------------------------------------------------------------------


def _deliveries_create(account: BillingAccount, alert: SpendingAlert, *, now: datetime) -> None:
    targets = []
    if account.alert_address:
        targets.append((AlertDelivery.Channel.EMAIL, account.alert_address))
    if account.alert_webhook_url:
        targets.append((AlertDelivery.Channel.WEBHOOK, account.alert_webhook_url))
    for channel, target in targets:
        AlertDelivery.objects.create(alert=alert, channel=channel, target=target, next_attempt_at=now)
    if targets:
        transaction.on_commit(_deliver_soon)


def _deliver_soon() -> None:
    from workers import tasks

    tasks.billing_alerts_deliver.delay()


def delivery_backoff(attempts: int) -> float:
    """Seconds before attempt `attempts` + 1 of a delivery: 30 s × 2^(attempts-1), at most an hour."""
    return min(DELIVERY_BACKOFF_SECONDS * 2 ** max(attempts - 1, 0), DELIVERY_BACKOFF_MAX_SECONDS)


def alert_payload(alert: SpendingAlert) -> dict:
    """The webhook's JSON body for `alert` (amounts as decimal strings, USD)."""
    return {
        "type": "spending_limit.threshold_reached",
        "account": alert.account.user.username,
        "month": f"{alert.month:%Y-%m}",
        "threshold_percent": alert.threshold,
        "limit_usd": f"{alert.limit:.2f}",
        "spent_usd": f"{alert.spent:.2f}",
        "deployments_suspended": alert.threshold >= 100,
        "created_at": alert.created_at.isoformat(),
        "billing_url": f"{settings.PUBLIC_URL.rstrip('/')}/billing/",
    }


def _send(delivery: AlertDelivery) -> None:
    """Send one alert; raises on failure (SMTP error, webhook non-2xx or unreachable)."""
    alert = delivery.alert
    if delivery.channel == AlertDelivery.Channel.EMAIL:
        context = {"alert": alert, "payload": alert_payload(alert)}
        subject = render_to_string("billing/email/alert_subject.txt", context).strip()
        body = render_to_string("billing/email/alert.txt", context)
        send_mail(subject, body, settings.DEFAULT_FROM_EMAIL, [delivery.target])
        return
    # Through the outbound seam: internal addresses refused at connect time too, one total deadline.
    response = outbound.post_json(
        delivery.target,
        content=json.dumps(alert_payload(alert)).encode(),
        headers={"User-Agent": "LLMHub-alerts"},
        deadline=settings.BILLING_WEBHOOK_TIMEOUT,
    )
    if not response.ok:
        raise outbound.OutboundError(f"HTTP {response.status}")


def alerts_deliver(*, now: datetime | None = None, batch: int = 50) -> int:
    """Deliver due alert deliveries (e-mail via Django's mail, webhooks as JSON POSTs), each claimed with a
    conditional UPDATE so concurrent runs send it once. Failures are retried with backoff
    (`delivery_backoff`), up to 8 attempts; every attempt is recorded. Returns the number sent."""
    now = now or timezone.now()
    stale = now - timedelta(seconds=DELIVERY_STALE_SECONDS)
    due = list(
        AlertDelivery.objects.filter(
            Q(status=AlertDelivery.Status.PENDING, next_attempt_at__lte=now)
            | Q(status=AlertDelivery.Status.SENDING, claimed_at__lt=stale)
        ).values_list("id", "status", "claimed_at")[:batch]
    )
    sent = 0
    for delivery_id, status, claimed_at in due:
        if not AlertDelivery.objects.filter(id=delivery_id, status=status, claimed_at=claimed_at).update(
            status=AlertDelivery.Status.SENDING, claimed_at=now
        ):
            continue  # another worker has it
        delivery = AlertDelivery.objects.select_related("alert__account__user").get(id=delivery_id)
        attempts = delivery.attempts + 1
        try:
            _send(delivery)
        except Exception as exc:  # noqa: BLE001 — any failure is recorded and retried
            # The user sees last_error: the outbound seam's generic message, never internal details.
            error = (
                str(exc)[:1000]
                if isinstance(exc, outbound.OutboundError)
                else f"{exc.__class__.__name__}: {exc}"[:1000]
            )
            log.warning("alert delivery %s (%s) failed: %s", delivery.id, delivery.channel, error)
            final = attempts >= DELIVERY_MAX_ATTEMPTS
            AlertDelivery.objects.filter(id=delivery.id).update(
                status=AlertDelivery.Status.FAILED if final else AlertDelivery.Status.PENDING,
                attempts=attempts,
                last_error=error,
                next_attempt_at=now + timedelta(seconds=delivery_backoff(attempts)),
            )
            continue
        AlertDelivery.objects.filter(id=delivery.id).update(
            status=AlertDelivery.Status.SENT, attempts=attempts, sent_at=timezone.now(), last_error=""
        )
        sent += 1
    return sent


# --- Weekly invoices ------------------------------------------------------------------------------------


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
