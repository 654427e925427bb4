"""Metering and weekly invoices under a controlled clock: week edges, an instance across three weeks, a
price change mid-week, a deployment deleted mid-week, an instance lost with its host, rounding, and
building twice."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from django.core.exceptions import ValidationError

from llmhub.billing import invoices, periods, prices
from llmhub.billing.metering import usage_pieces
from llmhub.billing.models import GpuPrice, Invoice, InvoiceInterval, InvoiceLine
from llmhub.deployments.models import Deployment
from llmhub.deployments.services import deployment_delete
from llmhub.fleet import reconcile
from llmhub.fleet.models import Host, Instance
from tests.billing_support import MONDAY, at, run
from tests.factories import DeploymentFactory, GpuTypeFactory, HostFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def h100(clock):
    return GpuTypeFactory(name="H100", memory_gb=80, hourly_price=Decimal("2.00"), uses_devices=True)


@pytest.fixture
def gpu_host(h100):
    return HostFactory(name="gpu-1", gpu_type=h100, gpu_count=8)


def build(account, monday, now):
    return invoices.invoice_build(account=account, period_start=monday, now=now)


def test_weeks_start_on_monday_midnight_utc():
    assert MONDAY.weekday() == 0
    assert periods.week_start(at(8, 23, 59, 59) + timedelta(microseconds=999_999)) == MONDAY
    assert periods.week_start(at(9)) == at(9)
    assert periods.week_start(at(4, 12)) == MONDAY
    # 01:30 on Monday in Helsinki (UTC+2 in March) is still Sunday in UTC: the week before.
    assert periods.week_start(datetime(2026, 3, 9, 1, 30, tzinfo=ZoneInfo("Europe/Helsinki"))) == MONDAY
    assert periods.month_start(at(17, 5)) == at(1)
    assert periods.next_month(at(1, month=12)) == datetime(2027, 1, 1, tzinfo=UTC)


def test_an_instance_running_across_three_weeks_is_split_at_each_monday(account, user, gpu_host, h100):
    deployment = DeploymentFactory(user=user, gpu_type=h100, num_gpus=2, model_name="big")
    instance = run(deployment, gpu_host, at(8, 22))  # Sunday 22:00 of week 1, still running

    week1, week2, week3 = MONDAY, MONDAY + periods.WEEK, MONDAY + 2 * periods.WEEK
    invoice1, created = build(account, week1, now=at(16, 2))
    # Still running when week 2 is built: billed to the week's end, the rest comes next week.
    invoice2, _ = build(account, week2, now=at(16, 2))
    Instance.objects.filter(id=instance.id).update(stopped_at=at(17, 1, 30), state=Instance.State.STOPPED)
    invoice3, _ = build(account, week3, now=at(24))

    assert created
    hours = [invoice.lines.get().instance_hours for invoice in (invoice1, invoice2, invoice3)]
    assert hours == [Decimal(2), Decimal(168), Decimal("25.5")]
    # 2 GPUs × 2.00 USD per GPU-hour.
    assert [i.total for i in (invoice1, invoice2, invoice3)] == [Decimal("8.00"), Decimal("672.00"), Decimal("102.00")]
    line = invoice2.lines.get()
    assert (line.gpu_type_name, line.num_gpus, line.hourly_rate, line.gpu_hours) == ("H100", 2, Decimal("2"), 336)
    spans = [(i.start, i.end) for i in InvoiceInterval.objects.filter(instance=instance).order_by("start")]
    assert spans == [(at(8, 22), week2), (week2, week3), (week3, at(17, 1, 30))]
    assert [invoice.number for invoice in (invoice1, invoice2, invoice3)] == [
        f"2026W{w}-{account.id:05d}" for w in (10, 11, 12)
    ]


def test_a_week_that_has_not_ended_or_is_not_a_monday_is_refused(account):
    with pytest.raises(ValueError, match="has not ended"):
        build(account, MONDAY, now=at(8, 23))
    with pytest.raises(ValueError, match="not a Monday"):
        build(account, at(3), now=at(20))
    assert not Invoice.objects.exists()


def test_a_price_change_mid_week_applies_from_its_effective_time(clock, account, user, gpu_host, h100):
    deployment = DeploymentFactory(user=user, gpu_type=h100, num_gpus=1, model_name="m")
    clock.move_to(at(3, 9))
    prices.gpu_price_schedule(gpu_type=h100, hourly_price=Decimal("3.00"), effective_at=at(4, 12))
    run(deployment, gpu_host, MONDAY, at(6))  # Monday 00:00 → Friday 00:00: 96 h

    invoice, _ = build(account, MONDAY, now=at(10))

    lines = list(invoice.lines.order_by("hourly_rate").values_list("hourly_rate", "gpu_seconds", "amount"))
    assert lines == [(Decimal("2.0000"), Decimal(60 * 3600), Decimal("120.00")),
                     (Decimal("3.0000"), Decimal(36 * 3600), Decimal("108.00"))]  # fmt: skip
    assert invoice.total == Decimal("228.00")
    for line in invoice.lines.all():
        assert sum(i.seconds for i in line.intervals.all()) == line.gpu_seconds


def test_a_price_never_applies_retroactively(clock, account, user, gpu_host, h100):
    deployment = DeploymentFactory(user=user, gpu_type=h100, num_gpus=1, model_name="m")
    run(deployment, gpu_host, MONDAY, at(3))  # Monday: 24 h at 2.00

    clock.move_to(at(3, 12))
    with pytest.raises(ValidationError, match="past"):
        prices.gpu_price_schedule(gpu_type=h100, hourly_price=Decimal("9.00"), effective_at=at(2))
    # An operator edits the GPU type's price (admin): it applies from now on, not to Monday.
    h100.hourly_price = Decimal("5.00")
    h100.save()
    run(deployment, gpu_host, at(4), at(4, 1))  # Wednesday: 1 h at 5.00

    invoice, _ = build(account, MONDAY, now=at(10))

    assert list(GpuPrice.objects.filter(gpu_type=h100).values_list("hourly_price", "effective_at")) == [
        (Decimal("2.0000"), at(1)), (Decimal("5.0000"), at(3, 12))
    ]  # fmt: skip
    assert sorted(invoice.lines.values_list("hourly_rate", "amount")) == [
        (Decimal("2.0000"), Decimal("48.00")), (Decimal("5.0000"), Decimal("5.00"))
    ]  # fmt: skip


def test_a_scheduled_price_reaches_the_gpu_types_estimate_price_when_it_comes_into_force(clock, h100):
    prices.gpu_price_schedule(gpu_type=h100, hourly_price=Decimal("2.50"), effective_at=at(2))

    assert prices.gpu_prices_sync(now=at(1, 23)) == 0
    assert prices.gpu_prices_sync(now=at(2)) == 1
    h100.refresh_from_db()
    assert h100.hourly_price == Decimal("2.50")
    assert GpuPrice.objects.filter(gpu_type=h100).count() == 2  # the sync did not add a price


def test_a_deployment_deleted_mid_week_is_billed_for_the_time_it_ran(fake, clock, account, user, h100):  # noqa: F811
    host = HostFactory(name="gpu-2", gpu_type=h100, gpu_count=4)
    deployment = DeploymentFactory(user=user, gpu_type=h100, num_gpus=2, model_name="short-lived")
    clock.move_to(at(2, 10))
    reconcile.deployment_reconcile(deployment_id=deployment.id)  # the container starts Monday 10:00
    reconcile.deployment_reconcile(deployment_id=deployment.id)
    clock.move_to(at(4, 10))
    deployment_delete(deployment=deployment)
    clock.move_to(at(4, 10, 0, 5))
    reconcile.deployment_reconcile(deployment_id=deployment.id)  # stopped Wednesday 10:00:05
    deployment.refresh_from_db()
    assert deployment.status == Deployment.Status.DELETED

    invoice, _ = build(account, MONDAY, now=at(10))

    line = invoice.lines.get()
    assert line.deployment == deployment and line.deployment_name == "alice/short-lived"
    assert line.gpu_seconds == 2 * (48 * 3600 + 5)
    assert line.amount == Decimal("192.01")  # 96.0028 GPU-hours × 2.00 USD
    assert [i.host_name for i in line.intervals.all()] == [host.name]


@pytest.mark.parametrize("declared_lost_at", [None, at(3, 8, 5)])
def test_an_instance_lost_with_its_host_is_billed_to_the_last_heartbeat(
    account, user, gpu_host, h100, declared_lost_at
):
    deployment = DeploymentFactory(user=user, gpu_type=h100, num_gpus=1, model_name="m")
    instance = run(deployment, gpu_host, MONDAY, declared_lost_at)
    Host.objects.filter(id=gpu_host.id).update(state=Host.State.UNREACHABLE, heartbeat_at=at(3, 8))

    invoice, _ = build(account, MONDAY, now=at(10))

    assert invoice.lines.get().instance_hours == 32  # Monday 00:00 → Tuesday 08:00, the last heartbeat
    assert invoice.lines.get().intervals.get().instance == instance


def test_pending_instances_accrue_nothing_and_a_week_without_uptime_has_no_invoice(account, user, h100):
    deployment = DeploymentFactory(user=user, gpu_type=h100, model_name="m")
    Instance.objects.create(deployment=deployment, last_error="no host with 1 free H100")

    assert build(account, MONDAY, now=at(10)) == (None, False)
    assert invoices.invoices_build_due(now=at(10, 2)) == []
    assert not Invoice.objects.exists()


def test_money_is_rounded_once_per_line_not_per_interval(clock, account, user, gpu_host):
    cheap = GpuTypeFactory(name="T4", hourly_price=Decimal("0.10"))
    deployment = DeploymentFactory(user=user, gpu_type=cheap, num_gpus=1, model_name="m")
    host = HostFactory(name="t4", gpu_type=cheap)
    for start in (at(2, 1), at(2, 2), at(2, 3)):
        run(deployment, host, start, start + timedelta(seconds=1001))  # 0.0278 USD each

    invoice, _ = build(account, MONDAY, now=at(10))

    assert invoice.lines.get().amount == Decimal("0.08")  # 3003 s × 0.10 / 3600 = 0.0834; per interval: 0.09
    assert invoice.lines.get().intervals.count() == 3


def test_building_twice_never_makes_a_second_invoice_or_line(account, user, gpu_host, h100, other_user):
    mine = DeploymentFactory(user=user, gpu_type=h100, model_name="m")
    theirs = DeploymentFactory(user=other_user, gpu_type=h100, model_name="t")
    run(mine, gpu_host, at(2), at(3))
    run(theirs, gpu_host, at(2), at(2, 6))
    run(mine, gpu_host, at(9, 5), at(9, 6))  # next week

    first = invoices.invoices_build_due(now=at(9, 2))
    again = invoices.invoices_build_due(now=at(9, 3))
    invoice, created = build(account, MONDAY, now=at(12))

    assert len(first) == 2 and again == [] and not created
    assert Invoice.objects.count() == 2 and InvoiceLine.objects.count() == 2
    assert invoice.total == Decimal("48.00")
    # The week just ended is built only after the grace period (lost hosts are known by then).
    assert invoices.invoices_build_due(now=at(16, 0, 30)) == []
    assert [i.total for i in invoices.invoices_build_due(now=at(16, 1, 1))] == [Decimal("2.00")]


def test_usage_follows_the_run_intervals_whatever_the_deployments_status(account, user, gpu_host, h100):
    from llmhub.billing.models import Suspension

    deployment = DeploymentFactory(user=user, gpu_type=h100, num_gpus=1, model_name="m")
    run(deployment, gpu_host, at(2), at(3))
    Suspension.objects.create(account=account, deployment=deployment, previous_status="running",
                              suspended_at=at(2, 6), resumed_at=at(2, 7))  # fmt: skip
    Suspension.objects.create(account=account, deployment=deployment, previous_status="running",
                              suspended_at=at(2, 20))  # fmt: skip

    run(deployment, gpu_host, at(2, 21), at(2, 22))  # started while suspended (status changed by hand)

    pieces = usage_pieces(start=MONDAY, end=at(9), now=at(9), user_ids=[user.id])

    # A container that ran is billed: a suspension stops the spend by stopping the containers.
    assert sorted((p.start, p.end) for p in pieces) == [(at(2), at(3)), (at(2, 21), at(2, 22))]
