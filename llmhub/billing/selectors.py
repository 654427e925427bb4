"""Reads for billing: the billing page's numbers and plots, invoices, the dashboard banner, the gateway's
spending-limit error. A user sees only their own invoices: anyone else's do not exist."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from django.conf import settings
from django.db.models import QuerySet
from django.http import Http404
from django.utils import timezone

from llmhub.accounts.models import User
from llmhub.deployments.models import Deployment

from . import stripe
from .metering import SECONDS_PER_HOUR, running_hourly_cost, usage_pieces
from .models import BillingAccount, IdleAlert, Invoice, SpendingAlert
from .periods import day_starts, month_start, next_month, seconds_between, week_start


@dataclass
class DeploymentUsage:
    deployment: Deployment
    gpu_hours: Decimal
    cost: Decimal  # USD, unrounded
    daily_gpu_hours: list[Decimal]
    daily_cost: list[Decimal]


@dataclass
class Overview:
    now: datetime
    week_start: datetime
    month_start: datetime
    week_cost: Decimal
    week_gpu_hours: Decimal
    month_cost: Decimal
    month_gpu_hours: Decimal
    running_hourly: Decimal  # USD per hour at the current scale
    projected_month_end: Decimal  # USD
    days: list[datetime]  # 00:00 UTC of each day of the month
    deployments: list[DeploymentUsage]
    limit: Decimal | None
    suspended: bool

    @property
    def limit_percent(self) -> Decimal | None:
        return self.month_cost * 100 / self.limit if self.limit else None


def billing_overview(user: User, *, now: datetime | None = None) -> Overview:
    """This week's and this month's cost and GPU-hours so far, the cost per hour at the current scale,
    the projected month-end cost (month so far + cost per hour × hours left in the month), and per
    deployment its GPU-hours and cost per day of the month (UTC). Money in USD, unrounded."""
    now = now or timezone.now()
    week, month = week_start(now), month_start(now)
    month_end = next_month(month)
    days = day_starts(month, month_end)
    start = min(week, month)
    pieces = usage_pieces(start=start, end=now, now=now, user_ids=[user.id], boundaries=[*days, week])
    by_deployment: dict[int, dict] = defaultdict(
        lambda: {"gpu_s": Decimal(0), "cost": Decimal(0), "days_gpu_s": defaultdict(Decimal), "days_cost": defaultdict(Decimal)}
    )  # fmt: skip
    week_cost = week_gpu_s = month_cost = month_gpu_s = Decimal(0)
    for piece in pieces:
        if piece.start >= week:
            week_cost += piece.cost
            week_gpu_s += piece.gpu_seconds
        if piece.start >= month:
            month_cost += piece.cost
            month_gpu_s += piece.gpu_seconds
            usage = by_deployment[piece.deployment_id]
            usage["gpu_s"] += piece.gpu_seconds
            usage["cost"] += piece.cost
            day = piece.start.day - 1
            usage["days_gpu_s"][day] += piece.gpu_seconds
            usage["days_cost"][day] += piece.cost
    deployments = Deployment.objects.select_related("user", "gpu_type").in_bulk(by_deployment.keys())
    rows = [
        DeploymentUsage(
            deployment=deployments[deployment_id],
            gpu_hours=usage["gpu_s"] / SECONDS_PER_HOUR,
            cost=usage["cost"],
            daily_gpu_hours=[usage["days_gpu_s"][i] / SECONDS_PER_HOUR for i in range(len(days))],
            daily_cost=[usage["days_cost"][i] for i in range(len(days))],
        )
        for deployment_id, usage in by_deployment.items()
    ]
    rows.sort(key=lambda row: (-row.cost, row.deployment.full_name))
    running = running_hourly_cost(user_ids=[user.id], now=now)[user.id]
    hours_left = seconds_between(now, month_end) / SECONDS_PER_HOUR
    account = BillingAccount.objects.filter(user=user).first()
    return Overview(
        now=now,
        week_start=week,
        month_start=month,
        week_cost=week_cost,
        week_gpu_hours=week_gpu_s / SECONDS_PER_HOUR,
        month_cost=month_cost,
        month_gpu_hours=month_gpu_s / SECONDS_PER_HOUR,
        running_hourly=running,
        projected_month_end=month_cost + running * hours_left,
        days=days,
        deployments=rows,
        limit=account.monthly_limit if account else None,
        suspended=bool(account and account.suspended_at),
    )


def invoices_visible(user: User) -> QuerySet[Invoice]:
    """The user's invoices, newest week first."""
    return Invoice.objects.filter(account__user=user)


def invoice_get(user: User, number: str) -> Invoice:
    """The user's invoice `number` with its lines. Raises Http404 when missing or someone else's."""
    invoice = invoices_visible(user).filter(number=number).first()
    if invoice is None:
        raise Http404("No such invoice.")
    return invoice


def payment_collection_on() -> bool:
    """True when Stripe is configured (invoices are sent to Stripe for payment)."""
    return stripe.enabled()


@dataclass
class Banner:
    level: str  # "warning" or "error"
    message: str


def banner_for(user: User, *, now: datetime | None = None) -> Banner | None:
    """The dashboard banner: the account is held by its spending limit, or the highest threshold of the
    current limit reached this month; None otherwise."""
    if not user.is_authenticated:
        return None
    account = BillingAccount.objects.filter(user=user).first()
    if account is None or account.monthly_limit is None and not account.suspended_at and not account.operator_hold:
        return None
    if account.operator_hold:
        return Banner("error", "Your deployments are suspended by an operator: contact support to resume them.")
    if account.suspended_at:
        return Banner(
            "error",
            f"Spending limit reached: your deployments are suspended (monthly limit "
            f"{account.monthly_limit or 0:,.2f} USD). Raise or remove the limit to resume them.",
        )
    now = now or timezone.now()
    alert = (
        SpendingAlert.objects.filter(account=account, month=month_start(now).date(), limit=account.monthly_limit)
        .order_by("-threshold")
        .first()
    )
    if alert is None:
        return None
    return Banner(
        "warning",
        f"You have reached {alert.threshold} % of your monthly spending limit "
        f"({alert.spent:,.2f} of {alert.limit:,.2f} USD this month).",
    )


def idle_alerts_open(user: User) -> list[IdleAlert]:
    """The user's idle alerts whose spell goes on (no request since, the deployment not set to scale to zero
    meanwhile), newest first: the dashboard's idle banners."""
    if not user.is_authenticated:
        return []
    return list(
        IdleAlert.objects.filter(
            account__user=user,
            ended_at__isnull=True,
            deployment__status__in=[Deployment.Status.DEPLOYING, Deployment.Status.RUNNING],
        )
        .exclude(deployment__min_instances=0, deployment__target_instances=0)
        .select_related("deployment__user", "deployment__gpu_type")
    )


async def spending_limit_message(*, user_id: int, full_name: str) -> str:
    """The gateway's error for deployment `full_name` suspended by its owner's spending limit, naming the limit."""
    account = await BillingAccount.objects.filter(user_id=user_id).afirst()
    limit = f" of {account.monthly_limit:,.2f} USD" if account and account.monthly_limit else ""
    url = f"{settings.PUBLIC_URL.rstrip('/')}/billing/settings/"
    return (
        f"The deployment '{full_name}' is suspended: the monthly spending limit{limit} is reached. "
        f"Raise or remove the limit at {url} to resume it."
    )
