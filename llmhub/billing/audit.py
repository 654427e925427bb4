"""The billing audit: metered usage recomputed from the run intervals, compared with what was invoiced.

For each account and each week up to its latest invoice's cut-off (that invoice's period end), the audit
recomputes GPU-seconds and cost from the instances' run intervals (`metering.usage_pieces`) and compares
them with the invoice lines billing that week (usage lines and later adjustments together). The rounding
rule: each line is rounded half-up once to cents, so a week's invoiced amount may differ from its exact
metered cost by at most half a cent per line; GPU-seconds must match exactly. It also checks that no
second of an instance is billed twice. Usage recorded after the latest invoice shows as a difference
until the next invoice carries it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from django.db.models import Count, Max, Sum
from django.utils import timezone

from .ledger import billed_by_key, ledger_entries, metered_by_key, normalize
from .models import BillingAccount, InvoiceLine

HALF_CENT = Decimal("0.005")


@dataclass(frozen=True)
class Difference:
    """One mismatch between metered and invoiced usage of an account's week."""

    username: str
    week: datetime  # Monday 00:00 UTC
    metered_gpu_seconds: Decimal
    invoiced_gpu_seconds: Decimal
    metered_cost: Decimal  # USD, unrounded
    invoiced_amount: Decimal  # USD
    detail: str

    def __str__(self) -> str:
        return (
            f"{self.username} week {self.week:%Y-%m-%d}: metered {self.metered_gpu_seconds:.6f} gpu-seconds, "
            f"{self.metered_cost:.4f} USD; invoiced {self.invoiced_gpu_seconds:.6f} gpu-seconds, "
            f"{self.invoiced_amount:.2f} USD ({self.detail})"
        )


def account_audit(*, account: BillingAccount, now: datetime | None = None) -> list[Difference]:
    """Every difference of one account, week by week up to its latest invoice's period end; [] when the
    invoices match the run intervals (or the account has no invoice)."""
    now = now or timezone.now()
    cutoff = account.invoices.aggregate(end=Max("period_end"))["end"]
    if cutoff is None:
        return []
    username = account.user.username
    metered = defaultdict(lambda: [Decimal(0), Decimal(0)])  # week → [gpu-seconds, cost]
    for (_, week, _), pieces in metered_by_key(user_id=account.user_id, end=cutoff, now=now).items():
        metered[week][0] += sum((p.gpu_seconds for p in pieces), Decimal(0))
        metered[week][1] += sum((p.cost for p in pieces), Decimal(0))
    invoiced = {
        row["week_start"]: row
        for row in InvoiceLine.objects.filter(invoice__account=account, week_start__lt=cutoff)
        .values("week_start")
        .annotate(gpu_seconds=Sum("gpu_seconds"), amount=Sum("amount"), lines=Count("id"))
    }
    late = defaultdict(set)
    for entry in ledger_entries(user_id=account.user_id, end=cutoff, now=now):
        late[entry.week].add(entry.instance_id)
    out = []
    for week in sorted(set(metered) | set(invoiced)):
        gpu_seconds, cost = metered.get(week, (Decimal(0), Decimal(0)))
        row = invoiced.get(week) or {"gpu_seconds": Decimal(0), "amount": Decimal(0), "lines": 0}
        problems = []
        if row["gpu_seconds"] != gpu_seconds:
            problems.append("gpu-seconds")
        if abs(row["amount"] - cost) > HALF_CENT * row["lines"]:
            problems.append("amount beyond half a cent per line")
        if not problems:
            continue
        if late[week]:
            instances = ", ".join(f"instance {i}" for i in sorted(late[week]))
            problems.append(f"not on an invoice yet: {instances}")
        out.append(
            Difference(username, week, gpu_seconds, row["gpu_seconds"], cost, row["amount"], "; ".join(problems))
        )
    out += _billed_twice(account, username)
    return out


def _billed_twice(account: BillingAccount, username: str) -> list[Difference]:
    """Seconds of one instance that the invoices bill more than once (overlapping billed intervals)."""
    out = []
    for (instance_id, week, _), (billed, credited) in billed_by_key(user_id=account.user_id).items():
        total = sum((e - s for s, e in billed), start=datetime.min - datetime.min)
        total -= sum((e - s for s, e in credited), start=datetime.min - datetime.min)
        merged = sum((e - s for s, e in normalize(billed)), start=datetime.min - datetime.min)
        if total > merged:
            out.append(
                Difference(
                    username,
                    week,
                    Decimal(0),
                    Decimal(0),
                    Decimal(0),
                    Decimal(0),
                    f"instance {instance_id}: {(total - merged).total_seconds()} s billed twice",
                )  # fmt: skip
            )
    return out


def billing_audit(*, now: datetime | None = None) -> list[Difference]:
    """Every difference of every account with an invoice (see `account_audit`), by account then week."""
    now = now or timezone.now()
    accounts = BillingAccount.objects.filter(invoices__isnull=False).distinct().select_related("user")
    out = []
    for account in accounts.order_by("id"):
        out += account_audit(account=account, now=now)
    return out
