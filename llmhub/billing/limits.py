"""Writes for billing accounts and spending limits: the monthly check (alerts, suspension, resumption).

All money is Decimal USD; usage comes from `metering.py`. Every write that may run twice at once is a
claim: a unique constraint (alerts), a row lock (the billing account during a limit check), or a
conditional ``UPDATE … WHERE state = old`` (deployments).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from llmhub.accounts.models import User
from llmhub.deployments.models import Deployment
from llmhub.deployments.timeline import event_record
from llmhub.queue import reconcile_soon

from .alerts import alert_deliveries_create
from .failures import failure_record
from .metering import cost_by_user
from .models import BillingAccount, BillingFailure, SpendingAlert, Suspension
from .periods import month_start, next_month
from .prices import money

log = logging.getLogger(__name__)

SUSPENDABLE = (Deployment.Status.DEPLOYING, Deployment.Status.RUNNING)


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
    the account's running cost plus the time the reconciler takes to stop the containers (billing follows
    the recorded run intervals). Each account is checked in its own transaction: an error is logged with
    the account, recorded (`BillingFailure`, counted in /metrics), and the other accounts are still checked.
    Returns the results of the accounts checked without error.
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
    results = []
    for account_id, user_id in accounts:
        try:
            results.append(account_check(account_id=account_id, spent=spent[user_id], now=now))
        except Exception as exc:  # noqa: BLE001 — this account's failure is this account's alone
            account = BillingAccount.objects.get(id=account_id)
            failure_record(account=account, job=BillingFailure.Job.SPENDING_CHECK, error=exc, now=now)
    return results


def account_check(*, account_id: int, now: datetime | None = None, spent: Decimal | None = None) -> CheckResult:
    """Check one account's spending this month (USD; computed when `spent` is not given) against its limit.

    Holds the account's row lock, so concurrent checks of one account run one after another; alerts are
    also unique per (account, month, threshold): each threshold alerts at most once per calendar month
    (UTC) whatever the limit is changed to, and thresholds reached together send one alert, the highest.
    An operator's hold (`account_hold`) suspends whatever the limit says. Returns what was found and done.
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
        if account.operator_hold:
            result.suspended = _suspend(account, reason=HOLD_REASON, now=now)
            return result
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
                defaults={"limit": limit, "spent": money(spent), "created_at": now},
            )
            if was_created:
                created.append(alert)
        if created:
            *lower, top = created
            SpendingAlert.objects.filter(id__in=[a.id for a in lower]).update(superseded=True)
            alert_deliveries_create(account=account, alert=top, now=now)
            result.alerts = [a.threshold for a in created]
        if spent >= limit:
            result.suspended = _suspend(account, reason=suspension_reason(limit), now=now)
        elif account.suspended_at:
            result.resumed = _resume(account, now=now)
        return result


def suspension_reason(limit: Decimal) -> str:
    return (
        f"suspended: spending limit reached (monthly limit {limit:,.2f} USD). "
        "Raise or remove the limit on the billing settings page to resume."
    )


HOLD_REASON = "suspended by an operator: contact support to resume."


def account_hold(*, account: BillingAccount, hold: bool, now: datetime | None = None) -> CheckResult:
    """Suspend the account's deployments (`hold` True) or lift an operator's hold (False; the limit then
    decides), the one way to suspend or resume by hand (the admin's actions call this). Returns what the
    check that follows did."""
    BillingAccount.objects.filter(id=account.id).update(operator_hold=hold)
    return account_check(account_id=account.id, now=now)


def _suspend(account: BillingAccount, *, reason: str, now: datetime) -> int:
    """Hold the account's deploying/running deployments (status `suspended`, scaled to zero by the
    reconciler), remembering their status. A deployment whose status was set back by hand while held keeps
    its open suspension (and what to restore). Returns how many this call suspended."""
    BillingAccount.objects.filter(id=account.id, suspended_at__isnull=True).update(suspended_at=now)
    account.suspended_at = account.suspended_at or now
    done = 0
    for deployment in Deployment.objects.filter(user_id=account.user_id, status__in=SUSPENDABLE):
        if not Deployment.objects.filter(id=deployment.id, status=deployment.status).update(
            status=Deployment.Status.SUSPENDED, fail_reason=reason, updated_at=now
        ):
            continue  # changed meanwhile (deleted, failed): leave it
        if Suspension.objects.filter(deployment=deployment, resumed_at__isnull=True).exists():
            log.warning("deployment %s was set back to %s by hand while suspended", deployment.id, deployment.status)
        else:
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
