"""Helpers for the security tests."""

from datetime import UTC, datetime
from decimal import Decimal

from django.utils import timezone

from llmhub.billing import limits
from llmhub.billing.models import AlertDelivery, SpendingAlert


def webhook_delivery(user, url, *, now: datetime | None = None) -> AlertDelivery:
    """A webhook delivery of a 100 % spending alert for `user` to `url`, due at `now` (default: now), as if the
    URL had been saved earlier (the form's checks are not involved)."""
    now = now or timezone.now()
    account = limits.billing_account_get(user=user)
    alert = SpendingAlert.objects.create(
        account=account, month=now.astimezone(UTC).date().replace(day=1), threshold=100, limit=Decimal("10"),
        spent=Decimal("10"), created_at=now,
    )  # fmt: skip
    return AlertDelivery.objects.create(alert=alert, channel="webhook", target=url, next_attempt_at=now)
