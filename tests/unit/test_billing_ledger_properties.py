"""Property-based test of the billing ledger (Hypothesis): random sequences of instance starts and stops
(some recorded late, across week and month edges, some on a host that is lost), price changes and
invoice runs. Whatever the order, the invoices bill every second that ran exactly once: the sum of all
invoice lines equals the metered cost up to the latest invoice's cut-off within half a cent per line, and
at no moment is an instance's second billed twice or credited below zero."""

from collections import defaultdict
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal

import pytest
import time_machine
from django.db import transaction
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmhub.billing import invoices, limits, prices
from llmhub.billing.ledger import ledger_entries, normalize
from llmhub.billing.metering import usage_pieces
from llmhub.billing.models import Invoice, InvoiceInterval, InvoiceLine
from llmhub.billing.periods import WEEK, week_start
from llmhub.fleet.models import Host, Instance
from tests.billing_support import MONDAY, run
from tests.factories import DeploymentFactory, GpuTypeFactory, HostFactory, UserFactory

pytestmark = pytest.mark.django_db

MINUTE = timedelta(minutes=1)
SPAN = 5 * 7 * 24 * 60  # five weeks from Monday 2026-03-02, across the month's end (Wednesday, April 1st)
LATE = st.sampled_from([0, 0, 0, 30, 65, 24 * 60, 8 * 24 * 60])  # minutes between an event and its record


@dataclass
class Run:
    owner: int  # 0 or 1
    gpus: int
    lost_host: bool
    start: int  # minutes from MONDAY
    length: int | None  # minutes; None: still running at the end
    start_late: int
    stop_late: int


runs = st.builds(
    Run,
    owner=st.integers(0, 1),
    gpus=st.integers(1, 2),
    lost_host=st.booleans(),
    start=st.integers(0, SPAN),
    length=st.one_of(st.none(), st.integers(1, 10 * 24 * 60)),
    start_late=LATE,
    stop_late=LATE,
)
price_changes = st.lists(st.tuples(st.integers(60, SPAN), st.sampled_from(["1.00", "2.50", "3.3333"])), max_size=3)
invoice_runs = st.lists(st.integers(0, SPAN + 7 * 24 * 60), max_size=6)


def coverage(billed, credited):
    """[(start, end, count)] of the net number of times each stretch is billed."""
    edges = sorted({t for span in billed + credited for t in span})
    out = []
    for a, b in zip(edges, edges[1:]):
        count = sum(1 for s, e in billed if s <= a and b <= e) - sum(1 for s, e in credited if s <= a and b <= e)
        out.append((a, b, count))
    return out


def check_ledger(users, now):
    """No second billed twice or credited below zero, and lines agree with their intervals."""
    for line in InvoiceLine.objects.all():
        intervals = list(line.intervals.all())
        assert sum((i.seconds for i in intervals), Decimal(0)) * line.num_gpus == line.gpu_seconds
        assert line.amount == (line.gpu_seconds * line.hourly_rate / 3600).quantize(Decimal("0.01"), "ROUND_HALF_UP")
    spans = defaultdict(lambda: ([], []))
    for i in InvoiceInterval.objects.all():
        spans[i.instance_id][0 if i.seconds >= 0 else 1].append((i.start, i.end))
    for billed, credited in spans.values():
        assert all(count in (0, 1) for _, _, count in coverage(billed, credited))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=st.lists(runs, min_size=1, max_size=6), price_plan=price_changes, run_plan=invoice_runs,
       heartbeat=st.integers(0, SPAN), heartbeat_late=LATE)  # fmt: skip
def test_every_second_that_ran_is_billed_exactly_once(db, plan, price_plan, run_plan, heartbeat, heartbeat_late):
    # Every service is given its `now`; the clock stands before the story for whatever reads it.
    with time_machine.travel(MONDAY - WEEK, tick=False), transaction.atomic():
        _play(plan, price_plan, run_plan, heartbeat, heartbeat_late)
        transaction.set_rollback(True)


def _play(plan, price_plan, run_plan, heartbeat, heartbeat_late):
    gpu = GpuTypeFactory(name="H100", hourly_price=Decimal("2.00"))  # in force from a week before
    stable = HostFactory(name="stable", gpu_type=gpu, gpu_count=8)
    doomed = HostFactory(name="doomed", gpu_type=gpu, gpu_count=8)
    users = [UserFactory(username="alice"), UserFactory(username="bob")]
    deployments = {
        (owner, gpus): DeploymentFactory(user=users[owner], gpu_type=gpu, num_gpus=gpus, model_name=f"m{gpus}")
        for owner in (0, 1)
        for gpus in (1, 2)
    }
    lost_at = MONDAY + heartbeat * MINUTE
    events = []  # (recorded at, order, action)
    for index, r in enumerate(plan):
        start = MONDAY + r.start * MINUTE
        host = doomed if r.lost_host else stable
        if r.lost_host and start >= lost_at:
            host = stable  # nothing starts on a host after its last heartbeat
        stop = start + r.length * MINUTE if r.length is not None else None
        events.append((start + r.start_late * MINUTE, 1, ("start", index, host, start)))
        if stop is not None:
            events.append((max(stop + r.stop_late * MINUTE, start + r.start_late * MINUTE), 2, ("stop", index, stop)))
    events.append((lost_at + heartbeat_late * MINUTE, 0, ("lost",)))
    for minute, price in price_plan:
        effective = MONDAY + minute * MINUTE
        events.append((effective - timedelta(minutes=30), 0, ("price", effective, Decimal(price))))
    for minute in run_plan:
        events.append((MONDAY + minute * MINUTE, 3, ("invoice",)))

    instances = {}
    for recorded, _, action in sorted(events, key=lambda e: (e[0], e[1])):
        if action[0] == "start":
            _, index, host, start = action
            r = plan[index]
            instances[index] = run(deployments[(r.owner, r.gpus)], host, start)
        elif action[0] == "stop" and action[1] in instances:
            Instance.objects.filter(id=instances[action[1]].id).update(state="stopped", stopped_at=action[2])
        elif action[0] == "lost":
            Host.objects.filter(id=doomed.id).update(state=Host.State.UNREACHABLE, heartbeat_at=lost_at)
        elif action[0] == "price":
            _, effective, price = action
            if not gpu.prices.filter(effective_at=effective).exists():
                prices.gpu_price_schedule(gpu_type=gpu, hourly_price=price, effective_at=effective, now=recorded)
        elif action[0] == "invoice":
            invoices.invoices_build_due(now=recorded)
            check_ledger(users, recorded)

    # Everything stops; two more weekly runs carry whatever was recorded late.
    end = MONDAY + (SPAN + 9 * 24 * 60) * MINUTE
    Instance.objects.filter(stopped_at__isnull=True).update(state="stopped", stopped_at=end)
    final = week_start(end) + 2 * WEEK + timedelta(hours=2)
    invoices.invoices_build_due(now=final - WEEK)
    invoices.invoices_build_due(now=final)
    check_ledger(users, final)

    for user in users:
        account = limits.billing_account_get(user=user)
        cutoff = max(Invoice.objects.filter(account=account).values_list("period_end", flat=True), default=None)
        if cutoff is None:
            assert not usage_pieces(start=MONDAY - WEEK, end=final, now=final, user_ids=[user.id])
            continue
        assert ledger_entries(user_id=user.id, end=cutoff, now=final) == []
        metered = usage_pieces(start=MONDAY - WEEK, end=cutoff, now=final, user_ids=[user.id])
        lines = InvoiceLine.objects.filter(invoice__account=account)
        total = sum(lines.values_list("amount", flat=True), Decimal(0))
        cost = sum((p.cost for p in metered), Decimal(0))
        assert abs(total - cost) <= Decimal("0.005") * lines.count()
        assert sum(lines.values_list("gpu_seconds", flat=True), Decimal(0)) == sum(
            (p.gpu_seconds for p in metered), Decimal(0)
        )
        # Exactly the seconds that ran, per instance.
        per_instance = defaultdict(list)
        for p in metered:
            per_instance[p.instance_id].append((p.start, p.end))
        billed = defaultdict(lambda: ([], []))
        for i in InvoiceInterval.objects.filter(line__invoice__account=account):
            billed[i.instance_id][0 if i.seconds >= 0 else 1].append((i.start, i.end))
        for instance_id in set(per_instance) | set(billed):
            ran = normalize(per_instance.get(instance_id, []))
            net = [(a, b) for a, b, count in coverage(*billed[instance_id]) if count == 1]
            assert normalize(net) == ran
