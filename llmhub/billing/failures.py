"""One account's failure in a billing run is that account's alone: recorded, logged and counted.

`failure_record` keeps the error (`BillingFailure`) and logs it with the account; `FailureCollector`
exposes the counts in /metrics as ``llmhub_billing_account_failures_total{job}`` (read from the database
at scrape time, so failures in worker processes show in the web's /metrics).
"""

from __future__ import annotations

import logging
from datetime import datetime

from django.db.models import Count
from prometheus_client.core import REGISTRY, CounterMetricFamily

from .models import BillingAccount, BillingFailure

log = logging.getLogger(__name__)


def failure_record(*, account: BillingAccount, job: str, error: BaseException, now: datetime) -> BillingFailure:
    """Log and keep `error` of `job` (a `BillingFailure.Job`) for `account`; returns the row."""
    text = f"{error.__class__.__name__}: {error}"[:2000]
    log.error("billing %s failed for account %s (%s): %s", job, account.id, account.user_id, text, exc_info=error)
    return BillingFailure.objects.create(account=account, job=job, error=text, created_at=now)


class FailureCollector:
    """Billing failures per job, from the database."""

    def describe(self):
        yield CounterMetricFamily("llmhub_billing_account_failures", "Accounts' billing failures.", labels=["job"])

    def collect(self):
        """The series; none while PostgreSQL is down (/metrics still shows the gateway's own, among them
        ``llmhub_gateway_degraded{dependency="postgresql"}``)."""
        from django.db import InterfaceError, OperationalError

        try:
            yield from self._collect()
        except (OperationalError, InterfaceError):
            return

    def _collect(self):
        family = CounterMetricFamily(
            "llmhub_billing_account_failures",
            "Billing runs that failed for one account (the others were still handled), by job.",
            labels=["job"],
        )
        counts = dict(BillingFailure.objects.values_list("job").annotate(n=Count("id")).values_list("job", "n"))
        for job in BillingFailure.Job.values:
            family.add_metric([job], counts.get(job, 0))
        yield family


def register() -> None:
    """Add the collector to prometheus-client's registry once (called from the app's `ready`)."""
    try:
        REGISTRY.register(FailureCollector())
    except ValueError:  # already registered
        pass
