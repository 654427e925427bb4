"""The alert outbox: deliveries of spending alerts and idle alerts by e-mail and webhook, each attempt recorded.

A threshold crossing writes one `SpendingAlert` and its `AlertDelivery` rows (see `limits.account_check`), an
idle spell one `IdleAlert` and its rows (see `idle.idle_alert_raise`);
`alerts_deliver` sends due deliveries, each claimed with a conditional ``UPDATE … WHERE status = old``.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta

from django.conf import settings
from django.core.mail import send_mail
from django.db.models import Q
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils import timezone

from llmhub import outbound
from llmhub.deployments.models import Deployment
from llmhub.queue import task_send

from .models import AlertDelivery, BillingAccount, IdleAlert, SpendingAlert

log = logging.getLogger(__name__)

DELIVERY_MAX_ATTEMPTS = 8
DELIVERY_BACKOFF_SECONDS = 30.0
DELIVERY_BACKOFF_MAX_SECONDS = 3600.0
DELIVERY_STALE_SECONDS = 300.0  # a claimed delivery whose worker died is retried after this


def alert_deliveries_create(*, account: BillingAccount, alert: SpendingAlert | IdleAlert, now: datetime) -> None:
    """Queue `alert` for the account's alert address and webhook (one pending delivery each, due `now`)
    and ask a worker to deliver them once the transaction commits."""
    targets = []
    if account.alert_address:
        targets.append((AlertDelivery.Channel.EMAIL, account.alert_address))
    if account.alert_webhook_url:
        targets.append((AlertDelivery.Channel.WEBHOOK, account.alert_webhook_url))
    which = {"idle_alert": alert} if isinstance(alert, IdleAlert) else {"alert": alert}
    for channel, target in targets:
        AlertDelivery.objects.create(**which, channel=channel, target=target, next_attempt_at=now)
    if targets:
        task_send("workers.tasks.billing_alerts_deliver")


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


def scale_to_zero_url(deployment: Deployment) -> str:
    """The absolute URL of the owner's "scale to zero" page (a button that POSTs, CSRF-protected)."""
    path = reverse("deployments:scale-to-zero", kwargs={"deploy_id": deployment.deploy_id})
    return f"{settings.PUBLIC_URL.rstrip('/')}{path}"


def idle_alert_payload(alert: IdleAlert) -> dict:
    """The webhook's JSON body for an idle alert (amounts as decimal strings, USD; times ISO 8601 UTC)."""
    deployment = alert.deployment
    return {
        "type": "deployment.idle",
        "account": deployment.user.username,
        "deployment": deployment.full_name,
        "deploy_id": deployment.deploy_id,
        "idle_since": alert.idle_since.isoformat(),
        "last_request_at": alert.last_request_at.isoformat() if alert.last_request_at else None,
        "idle_hours": round(alert.idle_seconds / 3600, 2),
        "instances": alert.instances,
        "cost_since_last_request_usd": f"{alert.cost:.2f}",
        "hourly_usd": f"{alert.hourly:.2f}",
        "scale_to_zero_url": scale_to_zero_url(deployment),
        "created_at": alert.created_at.isoformat(),
    }


def _send(delivery: AlertDelivery) -> None:
    """Send one alert; raises on failure (SMTP error, webhook non-2xx or unreachable)."""
    alert = delivery.subject
    idle = isinstance(alert, IdleAlert)
    payload = idle_alert_payload(alert) if idle else alert_payload(alert)
    if delivery.channel == AlertDelivery.Channel.EMAIL:
        context = {"alert": alert, "payload": payload}
        template = "billing/email/idle_alert" if idle else "billing/email/alert"
        subject = render_to_string(f"{template}_subject.txt", context).strip()
        body = render_to_string(f"{template}.txt", context)
        send_mail(subject, body, settings.DEFAULT_FROM_EMAIL, [delivery.target])
        return
    # Through the outbound seam: internal addresses refused at connect time too, one total deadline.
    response = outbound.post_json(
        delivery.target,
        content=json.dumps(payload).encode(),
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
        delivery = AlertDelivery.objects.select_related(
            "alert__account__user", "idle_alert__deployment__user", "idle_alert__deployment__gpu_type"
        ).get(id=delivery_id)
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
