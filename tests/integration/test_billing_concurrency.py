"""Concurrent workers on the real PostgreSQL: several limit checks at once alert exactly once and suspend
once; several delivery runs send each alert once; several invoice builds make one invoice."""

import threading
from decimal import Decimal

import pytest
import time_machine
from django.core import mail
from django.db import connection

from llmhub.billing import alerts, invoices, limits
from llmhub.billing.models import AlertDelivery, Invoice, InvoiceLine, SpendingAlert, Suspension
from tests.billing_support import at, run
from tests.factories import DeploymentFactory, GpuTypeFactory, HostFactory

pytestmark = pytest.mark.django_db(transaction=True)
WORKERS = 8


def at_once(fn, n=WORKERS):
    """Run `fn()` in `n` threads released together; returns their results (re-raises the first error)."""
    barrier, results, errors = threading.Barrier(n), [None] * n, []

    def work(i):
        try:
            barrier.wait()
            results[i] = fn()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


@pytest.fixture
def spender(user):
    user.email = "alice@example.com"
    user.save()
    with time_machine.travel(at(1), tick=False):
        h100 = GpuTypeFactory(name="H100", hourly_price=Decimal("2.00"), uses_devices=True)
    host = HostFactory(name="gpu-1", gpu_type=h100, gpu_count=8)
    for name in ("a", "b", "c"):
        deployment = DeploymentFactory(user=user, gpu_type=h100, num_gpus=1, model_name=name, status="running")
        run(deployment, host, at(2))
    account = limits.billing_account_get(user=user)
    limits.billing_settings_update(account=account, monthly_limit=Decimal("60"), alert_thresholds=[50, 80, 100],
                                     now=at(2))  # fmt: skip
    return account


def test_concurrent_checks_alert_once_per_threshold_and_suspend_once(spender, monkeypatch):
    monkeypatch.setattr(alerts, "task_send", lambda *args: None)  # only these threads deliver
    half = at_once(lambda: limits.spending_check_all(now=at(2, 5))[0])  # 30 USD: 50 %
    full = at_once(lambda: limits.spending_check_all(now=at(2, 10))[0])  # 60 USD: 80 % and 100 %

    assert sorted(r.alerts for r in half) == [[]] * (WORKERS - 1) + [[50]]
    assert sorted(r.alerts for r in full) == [[]] * (WORKERS - 1) + [[80, 100]]
    assert sorted(r.suspended for r in full) == [0] * (WORKERS - 1) + [3]
    assert SpendingAlert.objects.count() == 3
    assert Suspension.objects.count() == 3
    assert AlertDelivery.objects.count() == 2  # 50 % and 100 % (80 % passed in the same check)

    sent = at_once(lambda: alerts.alerts_deliver(now=at(2, 10)))

    assert sum(sent) == 2
    assert sorted(m.subject.split(":")[1].split("%")[0].strip() for m in mail.outbox) == ["100", "50"]
    assert set(AlertDelivery.objects.values_list("status", "attempts")) == {("sent", 1)}


def test_concurrent_invoice_builds_make_one_invoice(spender):
    results = at_once(lambda: invoices.invoices_build_due(now=at(10)))

    assert sum(len(created) for created in results) == 1
    assert Invoice.objects.count() == 1 and InvoiceLine.objects.count() == 3
    assert Invoice.objects.get().total == Decimal("1008.00")  # 3 GPUs × 168 h × 2.00 USD
