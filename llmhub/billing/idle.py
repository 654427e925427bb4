"""Idle alerts: a deployment running without a request for its `idle_alert_hours` costs money nobody uses.

One `IdleAlert` per idle spell (the unique constraint on the spell's start makes concurrent checks alert once),
delivered through the alert outbox (e-mail, webhook; `alerts.alerts_deliver`) and shown as a banner with a
one-click "scale to zero". Which deployments are idle is the gateway's to say (it records the requests: see
`gateway.idle`); the cost is billing's: the metered instance uptime since the last request (`metering`).
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from django.db import IntegrityError, transaction

from llmhub.deployments.models import Deployment
from llmhub.fleet.models import Host, Instance

from .alerts import alert_deliveries_create
from .limits import billing_account_get
from .metering import PriceBook, billable_facts, usage_pieces
from .models import IdleAlert
from .prices import money


def idle_cost(*, deployment: Deployment, since: datetime, now: datetime) -> Decimal:
    """USD (unrounded) the deployment's instances accrued in [since, now): metered uptime × GPUs × the price
    per GPU-hour in force (`metering.usage_pieces`)."""
    return sum(
        (p.cost for p in usage_pieces(start=since, end=now, now=now, deployment_ids=[deployment.id])), Decimal(0)
    )


def running_hourly(*, instances: list[Instance], now: datetime) -> Decimal:
    """USD per hour that `instances` (running, host not lost) accrue at the prices in force `now`."""
    facts = [billable_facts(i) for i in instances if not (i.host and i.host.state == Host.State.UNREACHABLE)]
    prices = PriceBook({gpu_type_id for gpu_type_id, _ in facts})
    return sum((num_gpus * prices.rate_at(gpu_type_id, now) for gpu_type_id, num_gpus in facts), Decimal(0))


def idle_alert_raise(
    *,
    deployment: Deployment,
    idle_since: datetime,
    last_request_at: datetime | None,
    instances: list[Instance],
    now: datetime,
) -> IdleAlert | None:
    """Record the idle alert of the spell that started at `idle_since` and queue its deliveries (e-mail to the
    account's alert address, its webhook), with the cost since the last request (`last_request_at`, None:
    never asked anything, then since the deployment was created) and the hourly cost of the running
    `instances`. Returns the new alert, or None when this spell has already alerted."""
    if IdleAlert.objects.filter(deployment=deployment, idle_since=idle_since).exists():
        return None
    account = billing_account_get(user=deployment.user)
    cost = idle_cost(deployment=deployment, since=last_request_at or deployment.created_at, now=now)
    try:
        with transaction.atomic():
            alert = IdleAlert.objects.create(
                account=account, deployment=deployment, idle_since=idle_since, last_request_at=last_request_at,
                instances=len(instances), cost=money(cost), hourly=money(running_hourly(instances=instances, now=now)),
                created_at=now,
            )  # fmt: skip
            alert_deliveries_create(account=account, alert=alert, now=now)
    except IntegrityError:  # a concurrent check raised it first
        return None
    return alert


def idle_alerts_end(*, deployment: Deployment, now: datetime, before: datetime | None = None) -> int:
    """End the deployment's open idle alerts (those of spells that started before `before`, when given): a
    request came, or nothing runs any more. Returns how many ended."""
    alerts = IdleAlert.objects.filter(deployment=deployment, ended_at__isnull=True)
    if before is not None:
        alerts = alerts.filter(idle_since__lt=before)
    return alerts.update(ended_at=now)
