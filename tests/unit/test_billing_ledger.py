"""The billing ledger under a controlled clock: each scenario of a worker lagging across a week's end, a
price saved or scheduled badly, a deployment edited or deleted in the admin, a suspension undone by hand,
one account failing the run for the others, alerts once a month, invoice numbers, and the audit."""

from decimal import Decimal
from io import StringIO
from zoneinfo import ZoneInfo

import pytest
from django.core.exceptions import ValidationError
from django.core.management import call_command
from prometheus_client import REGISTRY

from llmhub.billing import invoices, limits, prices
from llmhub.billing.models import GpuPrice, Invoice, InvoiceLine, SpendingAlert, Suspension
from llmhub.deployments.models import Deployment
from llmhub.fleet import reconcile
from llmhub.fleet.models import GpuType, Instance
from tests.billing_support import MONDAY, at, run
from tests.factories import DeploymentFactory, GpuTypeFactory, HostFactory

pytestmark = pytest.mark.django_db

WEEK10, WEEK11, WEEK12 = MONDAY, at(9), at(16)


@pytest.fixture
def h100(clock):
    return GpuTypeFactory(name="H100", memory_gb=80, hourly_price=Decimal("2.00"), uses_devices=True)


@pytest.fixture
def gpu_host(h100):
    return HostFactory(name="gpu-1", gpu_type=h100, gpu_count=8)


def invoiced(account) -> Decimal:
    return sum(Invoice.objects.filter(account=account).values_list("total", flat=True), Decimal(0))


def failures(job: str) -> float:
    return REGISTRY.get_sample_value("llmhub_billing_account_failures_total", {"job": job}) or 0.0


def test_a_stop_recorded_after_the_weeks_invoice_is_credited_on_the_next(client, clock, account, user, gpu_host, h100):
    deployment = DeploymentFactory(user=user, gpu_type=h100, num_gpus=1, model_name="m")
    instance = run(deployment, gpu_host, at(7, 12))  # Saturday 12:00, still running as far as we know
    clock.move_to(at(9, 1, 5))
    invoices.invoices_build_due()  # billed to the week's end: 36 h × 2.00
    clock.move_to(at(9, 1, 6))
    # The reconciler lagged: the container had crashed on Sunday at 20:00.
    Instance.objects.filter(id=instance.id).update(state=Instance.State.STOPPED, stopped_at=at(8, 20))
    clock.move_to(at(16, 1, 5))

    invoices.invoices_build_due()

    assert Invoice.objects.get(period_start=WEEK10).total == Decimal("72.00")
    adjustment = Invoice.objects.get(period_start=WEEK11).lines.get()
    assert adjustment.is_adjustment and adjustment.week_start == WEEK10 and adjustment.instance_id == instance.id
    assert adjustment.amount == Decimal("-8.00") and adjustment.gpu_seconds == -4 * 3600
    assert "2026-03-02" in adjustment.description and f"instance {instance.id}" in adjustment.description
    assert invoiced(account) == Decimal("64.00")  # 32 h that ran
    client.force_login(user)
    page = client.get(f"/billing/invoices/{adjustment.invoice.number}/").content.decode()
    assert f"credit for the week of 2026-03-02, instance #{instance.id}" in page and "-8.00" in page


def test_a_start_recorded_after_the_weeks_invoice_is_billed_on_the_next(clock, account, user, gpu_host, h100):
    deployment = DeploymentFactory(user=user, gpu_type=h100, num_gpus=1, model_name="m")
    run(deployment, gpu_host, at(2), at(2, 1))  # the week has an invoice for this hour
    clock.move_to(at(9, 1, 5))
    invoices.invoices_build_due()
    clock.move_to(at(9, 1, 6))
    late = run(deployment, gpu_host, at(8, 22), at(9, 2))  # created Sunday 22:00, adopted Monday 01:06
    clock.move_to(at(16, 1, 5))

    invoices.invoices_build_due()

    lines = Invoice.objects.get(period_start=WEEK11).lines.order_by("week_start")
    assert [(line.week_start, line.is_adjustment, line.instance_id, line.gpu_seconds) for line in lines] == [
        (WEEK10, True, late.id, 2 * 3600), (WEEK11, False, None, 2 * 3600)
    ]  # fmt: skip
    assert invoiced(account) == Decimal("10.00")  # 1 h + 4 h at 2.00


def test_usage_older_than_any_look_back_is_invoiced(clock, account, user, gpu_host, h100):
    deployment = DeploymentFactory(user=user, gpu_type=h100, num_gpus=1, model_name="m")
    run(deployment, gpu_host, at(2), at(2, 3))
    clock.move_to(at(1, 2, month=6))  # thirteen weeks later, the first invoice run

    invoices.invoices_build_due()

    assert Invoice.objects.get(period_start=WEEK10).total == Decimal("6.00")


def test_saving_a_gpu_type_cannot_undo_a_scheduled_price(clock, account, user, gpu_host, h100):
    clock.move_to(at(3, 9))
    prices.gpu_price_schedule(gpu_type=h100, hourly_price=Decimal("3.00"), effective_at=at(3, 10))
    clock.move_to(at(3, 10, 30))  # the periodic sync has not run yet
    stale = GpuType.objects.get(id=h100.id)
    stale.memory_gb = 94
    stale.save()  # e.g. an operator fixing the memory size in the admin

    deployment = DeploymentFactory(user=user, gpu_type=h100, num_gpus=1, model_name="m")
    run(deployment, gpu_host, at(3, 10), at(3, 11))
    invoice, _ = invoices.invoice_build(account=account, period_start=WEEK10, now=at(10))

    assert invoice.total == Decimal("3.00")
    assert list(GpuPrice.objects.filter(gpu_type=h100).values_list("hourly_price", flat=True)) == [2, 3]


def test_a_price_edited_before_a_scheduled_one_never_overrides_it(clock, h100):
    prices.gpu_price_schedule(gpu_type=h100, hourly_price=Decimal("3.00"), effective_at=at(5))
    clock.move_to(at(2))
    h100.hourly_price = Decimal("2.50")
    h100.save()
    clock.move_to(at(6))
    GpuType.objects.get(id=h100.id).save()  # the sync has not run: the stored price is 2.50, stale

    rows = list(GpuPrice.objects.filter(gpu_type=h100).values_list("hourly_price", "effective_at"))
    assert rows == [(Decimal("2.0000"), at(1)), (Decimal("2.5000"), at(2)), (Decimal("3.0000"), at(5))]
    assert GpuType.objects.get(id=h100.id).hourly_price == Decimal("3.00")


def test_a_price_cannot_start_even_a_few_seconds_ago(clock, h100):
    clock.move_to(at(3, 12))
    with pytest.raises(ValidationError, match="past"):
        prices.gpu_price_schedule(gpu_type=h100, hourly_price=Decimal("9.00"), effective_at=at(3, 11, 59, 30))
    assert GpuPrice.objects.filter(gpu_type=h100).count() == 1


def test_editing_a_deployments_gpus_never_reprices_the_past(fake, clock, account, user, gpu_host, h100):  # noqa: F811
    t4 = GpuTypeFactory(name="T4", hourly_price=Decimal("0.50"))
    deployment = DeploymentFactory(user=user, gpu_type=h100, num_gpus=1, model_name="m", min_instances=1)
    clock.move_to(at(2))
    reconcile.deployment_reconcile(deployment_id=deployment.id)  # placed on gpu-1: 1 × H100
    reconcile.deployment_reconcile(deployment_id=deployment.id)
    instance = Instance.objects.get()
    assert (instance.gpu_type_id, instance.num_gpus) == (h100.id, 1)
    clock.move_to(at(3))
    Instance.objects.filter(id=instance.id).update(state=Instance.State.STOPPED, stopped_at=at(3))
    Deployment.objects.filter(id=deployment.id).update(num_gpus=8, gpu_type=t4)  # an admin edit

    invoice, _ = invoices.invoice_build(account=account, period_start=WEEK10, now=at(10))

    line = invoice.lines.get()
    assert (line.gpu_type_name, line.num_gpus, line.amount) == ("H100", 1, Decimal("48.00"))


def test_a_status_set_back_by_hand_cannot_hide_a_running_container(clock, account, user, gpu_host, h100, other_user):
    mine = DeploymentFactory(user=user, gpu_type=h100, num_gpus=1, model_name="m", status="running")
    run(mine, gpu_host, at(2))
    limits.billing_settings_update(account=account, monthly_limit=Decimal(50), alert_thresholds=[100], now=at(2))
    limits.spending_check_all(now=at(3, 1))  # 50.00: suspended
    Deployment.objects.filter(id=mine.id).update(status="running")  # by hand: the container keeps running
    theirs = DeploymentFactory(user=other_user, gpu_type=h100, num_gpus=1, model_name="t", status="running")
    run(theirs, gpu_host, at(2))
    other = limits.billing_account_get(user=other_user)
    limits.billing_settings_update(account=other, monthly_limit=Decimal(100), alert_thresholds=[100], now=at(2))

    limits.spending_check_all(now=at(4, 12))  # must neither crash on mine nor skip theirs

    theirs.refresh_from_db(), mine.refresh_from_db()
    assert theirs.status == "suspended" and mine.status == "suspended"
    assert Suspension.objects.filter(deployment=mine, resumed_at__isnull=True).count() == 1
    invoice, _ = invoices.invoice_build(account=account, period_start=WEEK10, now=at(10))
    assert invoice.total == Decimal("336.00")  # the container ran all week: 168 h × 2.00


def test_one_accounts_failure_is_that_accounts_alone(clock, user, other_user, gpu_host, h100, monkeypatch, caplog):
    for owner, name in ((user, "m"), (other_user, "t")):
        deployment = DeploymentFactory(user=owner, gpu_type=h100, num_gpus=1, model_name=name, status="running")
        run(deployment, gpu_host, at(2), at(4))
        limits.billing_settings_update(
            account=limits.billing_account_get(user=owner), monthly_limit=Decimal(10), alert_thresholds=[100]
        )
    broken = limits.billing_account_get(user=user).id
    original_check, original_build = limits.account_check, invoices.invoice_build

    def check(*, account_id, **kwargs):
        if account_id == broken:
            raise RuntimeError("injected")
        return original_check(account_id=account_id, **kwargs)

    def build(*, account, **kwargs):
        if account.id == broken:
            raise RuntimeError("injected")
        return original_build(account=account, **kwargs)

    monkeypatch.setattr(limits, "account_check", check)
    monkeypatch.setattr(invoices, "invoice_build", build)
    before = failures("spending_check"), failures("invoices")

    results = limits.spending_check_all(now=at(3))
    built = invoices.invoices_build_due(now=at(9, 2))

    assert [r.suspended for r in results] == [1]
    assert [i.account.user for i in built] == [other_user]
    assert (failures("spending_check"), failures("invoices")) == (before[0] + 1, before[1] + 1)
    assert f"account {broken}" in caplog.text and "injected" in caplog.text


def test_each_threshold_alerts_once_a_month_whatever_the_limit(clock, account, user, gpu_host, h100):
    deployment = DeploymentFactory(user=user, gpu_type=h100, num_gpus=1, model_name="m", status="running")
    run(deployment, gpu_host, at(2), at(3, 1))  # 50.00 USD
    for value in (100, 101, 100):
        limits.billing_settings_update(account=account, monthly_limit=Decimal(value), alert_thresholds=[50, 100],
                                       now=at(4))  # fmt: skip
    limits.billing_settings_update(account=account, monthly_limit=Decimal(40), alert_thresholds=[50, 80, 100],
                                   now=at(4))  # fmt: skip

    alerts = list(SpendingAlert.objects.order_by("id").values_list("threshold", "superseded"))
    assert alerts == [(50, False), (80, True), (100, False)]  # one alert per threshold, the highest sent


def test_invoice_numbers_come_from_utc_period_starts(clock, account, user, gpu_host, h100):
    deployment = DeploymentFactory(user=user, gpu_type=h100, num_gpus=1, model_name="m")
    run(deployment, gpu_host, at(2), at(2, 1))
    new_york = MONDAY.astimezone(ZoneInfo("America/New_York"))  # Sunday 19:00 there, ISO week 9

    invoice, created = invoices.invoice_build(account=account, period_start=new_york, now=at(10))

    assert created and invoice.number == f"2026W10-{account.id:05d}"


def test_an_invoice_number_clash_is_an_error_naming_both(clock, account, user, gpu_host, h100):
    deployment = DeploymentFactory(user=user, gpu_type=h100, num_gpus=1, model_name="m")
    run(deployment, gpu_host, at(2), at(2, 1))
    squatter = Invoice.objects.create(account=account, number=f"2026W10-{account.id:05d}", period_start=at(1, month=1),
                                      period_end=at(8, month=1), created_at=at(1))  # fmt: skip

    with pytest.raises(invoices.InvoiceNumberClash) as caught:
        invoices.invoice_build(account=account, period_start=WEEK10, now=at(10))

    assert squatter.number in str(caught.value) and "2026-03-02" in str(caught.value)
    assert "2026-01-01" in str(caught.value)


def test_the_audit_finds_no_difference_then_every_one(clock, account, user, gpu_host, h100):
    deployment = DeploymentFactory(user=user, gpu_type=h100, num_gpus=2, model_name="m")
    run(deployment, gpu_host, at(7, 12), at(9, 3))
    invoices.invoices_build_due(now=at(16, 2))
    clock.move_to(at(16, 3))
    out = StringIO()
    call_command("billing_audit", stdout=out)
    assert "no differences" in out.getvalue()

    InvoiceLine.objects.filter(invoice__period_start=WEEK11).update(amount=Decimal("1.00"))
    late = run(deployment, gpu_host, at(15, 23), at(16, 1))  # recorded after week 11's invoice
    out = StringIO()
    with pytest.raises(SystemExit) as exit_:
        call_command("billing_audit", stdout=out)

    assert exit_.value.code == 1
    report = out.getvalue()
    assert f"{user.username} week 2026-03-09" in report and "amount" in report
    assert f"instance {late.id}" in report or "gpu-seconds" in report


def test_admin_keeps_the_past(admin_client, clock, account, user, gpu_host, h100):
    deployment = DeploymentFactory(user=user, gpu_type=h100, num_gpus=1, model_name="m", status="running")
    instance = run(deployment, gpu_host, at(2), at(2, 1))

    response = admin_client.post(f"/admin/deployments/deployment/{deployment.id}/delete/", {"post": "yes"})
    assert response.status_code == 302
    deployment.refresh_from_db()
    assert deployment.status == "deleting" and Instance.objects.filter(id=instance.id).exists()
    assert admin_client.post(f"/admin/fleet/instance/{instance.id}/delete/", {"post": "yes"}).status_code == 403
    assert admin_client.post(f"/admin/accounts/user/{user.id}/delete/", {"post": "yes"}).status_code == 403
    page = admin_client.get(f"/admin/deployments/deployment/{deployment.id}/change/").content.decode()
    for field in ("gpu_type", "num_gpus", "model_name", "status"):
        assert f'name="{field}"' not in page


def test_the_admin_audit_page_and_suspension_actions(admin_client, clock, account, user, gpu_host, h100):
    deployment = DeploymentFactory(user=user, gpu_type=h100, num_gpus=1, model_name="m", status="running")
    run(deployment, gpu_host, at(2), at(2, 1))
    invoices.invoices_build_due(now=at(9, 2))
    clock.move_to(at(9, 3))
    assert 'id="billing-audit-clean"' in admin_client.get("/admin/billing/billingaccount/audit/").content.decode()

    changelist = "/admin/billing/billingaccount/"
    admin_client.post(changelist, {"action": "hold", "_selected_action": [account.id]})
    deployment.refresh_from_db()
    assert deployment.status == "suspended"
    admin_client.post(changelist, {"action": "release", "_selected_action": [account.id]})
    deployment.refresh_from_db()
    assert deployment.status == "running"
    page = admin_client.get(f"{changelist}{account.id}/change/").content.decode()
    assert 'name="suspended_at"' not in page and 'name="operator_hold"' not in page


def test_a_price_form_refuses_a_start_in_the_past(admin_client, clock, h100):
    clock.move_to(at(3, 12))
    response = admin_client.post("/admin/billing/gpuprice/add/", {
        "gpu_type": h100.id, "hourly_price": "9.00", "effective_at": "2026-03-03 11:59:59",
    })  # fmt: skip
    assert "A price cannot start in the past" in response.content.decode()
    response = admin_client.post("/admin/billing/gpuprice/add/", {"gpu_type": h100.id, "hourly_price": "9.00"})
    assert response.status_code == 302
    assert GpuPrice.objects.filter(gpu_type=h100).latest("effective_at").effective_at == at(3, 12)
