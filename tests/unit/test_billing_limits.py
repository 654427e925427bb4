"""Spending limits under a controlled clock: thresholds alert once a month, 100 % suspends and stops the
spend, raising/removing the limit or a new month resumes, the overshoot is at most one check interval of
the running cost, alerts are delivered from the outbox with retries, the gateway names the limit."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.core import mail

from llmhub.billing import alerts, limits
from llmhub.billing.metering import cost_by_user
from llmhub.billing.models import AlertDelivery, SpendingAlert, Suspension
from llmhub.billing.periods import month_start
from llmhub.deployments.models import Deployment
from llmhub.fleet import reconcile
from llmhub.fleet.models import Instance
from tests.billing_support import at, run
from tests.factories import DeploymentFactory, GpuTypeFactory, HostFactory
from tests.fakes.http import Handler, serve
from tests.gateway_support import assert_openai_error, chat
from tests.stack import free_port

pytestmark = pytest.mark.django_db


@pytest.fixture
def a100(clock):
    return GpuTypeFactory(name="A100", memory_gb=80, hourly_price=Decimal("3.00"), uses_devices=True)


@pytest.fixture
def host(a100):
    return HostFactory(name="gpu-1", gpu_type=a100, gpu_count=8)


@pytest.fixture
def account(user):
    user.email = "alice@example.com"
    user.save()
    return limits.billing_account_get(user=user)


def limit(account, value, **kwargs):
    return limits.billing_settings_update(
        account=account, monthly_limit=None if value is None else Decimal(value),
        alert_thresholds=kwargs.pop("thresholds", [50, 80, 100]), **kwargs,
    )  # fmt: skip


def spent(user, now):
    return cost_by_user(user_ids=[user.id], start=month_start(now), end=now, now=now)[user.id]


def test_each_threshold_alerts_once_and_100_percent_suspends(clock, account, user, host, a100):
    running = DeploymentFactory(user=user, gpu_type=a100, num_gpus=1, model_name="a", status="running")
    deploying = DeploymentFactory(user=user, gpu_type=a100, num_gpus=1, model_name="b", status="deploying")
    failed = DeploymentFactory(user=user, gpu_type=a100, model_name="c", status="failed", fail_reason="OOM")
    run(running, host, at(2))  # 3.00 USD per hour from Monday 00:00
    limit(account, "30.00")  # reached after 10 hours

    results = {}
    for hour in (4, 5, 6, 7, 8, 9, 10, 11):
        results[hour] = limits.spending_check_all(now=at(2, hour))[0]

    assert [(h, r.alerts, r.suspended) for h, r in results.items() if r.alerts or r.suspended] == [
        (5, [50], 0), (8, [80], 0), (10, [100], 2)
    ]  # fmt: skip
    assert list(SpendingAlert.objects.order_by("threshold").values_list("threshold", "spent")) == [
        (50, Decimal("15.00")), (80, Decimal("24.00")), (100, Decimal("30.00"))
    ]  # fmt: skip
    running.refresh_from_db(), deploying.refresh_from_db(), failed.refresh_from_db()
    assert (running.status, deploying.status, failed.status) == ("suspended", "suspended", "failed")
    assert running.fail_reason.startswith("suspended: spending limit reached (monthly limit 30.00 USD)")
    assert running.desired_instances == 0
    assert dict(Suspension.objects.values_list("deployment__model_name", "previous_status")) == {
        "a": "running", "b": "deploying"
    }  # fmt: skip
    # Billing follows the run intervals: the spend stops when the reconciler stops the container.
    Instance.objects.filter(deployment=running).update(state="stopped", stopped_at=at(2, 10))
    assert spent(user, at(2, 11)) == Decimal("30.00") == spent(user, at(20))
    assert AlertDelivery.objects.filter(channel="email").count() == 3


def test_suspended_deployments_are_scaled_to_zero_by_the_reconciler(fake, clock, account, user, a100):  # noqa: F811
    HostFactory(name="gpu-9", gpu_type=a100, gpu_count=4)
    deployment = DeploymentFactory(user=user, gpu_type=a100, num_gpus=2, model_name="m", min_instances=1)
    reconcile.deployment_reconcile(deployment_id=deployment.id)
    reconcile.deployment_reconcile(deployment_id=deployment.id)
    assert len(fake.containers) == 1

    clock.move_to(at(1, 5))
    result = limit(account, "25.00")  # 5 h × 2 GPUs × 3.00 = 30 USD: already past it
    reconcile.deployment_reconcile(deployment_id=deployment.id)

    assert result.suspended == 1 and result.alerts == [50, 80, 100]
    assert fake.containers == {}
    assert Instance.objects.get().state == Instance.State.STOPPED
    deployment.refresh_from_db()
    assert (deployment.status, deployment.min_instances, deployment.max_instances) == ("suspended", 1, 1)
    # Set below this month's spend: one alert goes out, for 100 %, not three.
    assert list(SpendingAlert.objects.filter(superseded=False).values_list("threshold", flat=True)) == [100]
    assert AlertDelivery.objects.count() == 1

    clock.move_to(at(1, 6))
    result = limit(account, "100.00")  # raised: back to its previous status and scale
    reconcile.deployment_reconcile(deployment_id=deployment.id)

    deployment.refresh_from_db()
    assert result.resumed == 1
    assert (deployment.status, deployment.fail_reason) == ("running", "")
    assert len(fake.containers) == 1
    assert Suspension.objects.get().resumed_at == at(1, 6)
    kinds = list(deployment.events.order_by("id").values_list("kind", flat=True))
    assert kinds[4:] == ["suspended", "stopped", "resumed", "scheduled", "starting"]


def test_removing_the_limit_or_a_new_month_resumes(clock, account, user, host, a100):
    deployment = DeploymentFactory(user=user, gpu_type=a100, num_gpus=1, model_name="m", status="running")
    run(deployment, host, at(2))
    limit(account, "3.00")
    limits.spending_check_all(now=at(2, 2))
    deployment.refresh_from_db()
    assert deployment.status == "suspended"

    clock.move_to(at(2, 3))
    assert limit(account, None).resumed == 1
    deployment.refresh_from_db()
    assert deployment.status == "running"

    limit(account, "3.00", now=at(2, 3))  # 3 USD spent before the suspension: held again at once
    deployment.refresh_from_db()
    assert deployment.status == "suspended"
    # March's spend stays at the limit; on April 1st the limit holds again from zero.
    assert limits.spending_check_all(now=at(31, 23))[0].resumed == 0
    assert limits.spending_check_all(now=at(1, 0, 0, 1, month=4))[0].resumed == 1
    deployment.refresh_from_db()
    assert deployment.status == "running"


@pytest.mark.parametrize("interval", [10, 30, 300])
@pytest.mark.parametrize("phase", [0, 7, 19])
def test_overshoot_is_at_most_one_check_interval_of_the_running_cost(clock, account, user, host, a100, interval, phase):
    """Three GPUs at 3.00 USD/GPU-hour (9 USD/h) run from 00:00; checks every `interval` s from `phase` s.
    (Billing follows the run intervals: the time the reconciler takes to stop the containers is billed
    too; here they stop at the check.)"""
    for name, gpus in (("a", 1), ("b", 2)):
        deployment = DeploymentFactory(user=user, gpu_type=a100, num_gpus=gpus, model_name=name, status="running")
        run(deployment, host, at(2))
    cap = Decimal("7.77")
    limit(account, cap, now=at(2))
    rate = Decimal(9)  # USD per hour

    now = at(2) + timedelta(seconds=phase)
    while not limits.spending_check_all(now=now)[0].suspended:
        now += timedelta(seconds=interval)
        assert now < at(3), "never suspended"
    Instance.objects.update(state="stopped", stopped_at=now)  # the reconciler stops the containers

    overshoot = spent(user, at(20)) - cap
    bound = rate * interval / 3600
    assert Decimal(0) <= overshoot <= bound
    assert all(d.status == "suspended" for d in Deployment.objects.all())


def test_alerts_are_delivered_by_email_and_webhook_with_retries(clock, account, user, host, a100, settings):
    settings.WEBHOOK_ALLOW_PRIVATE = True  # the receiver is on 127.0.0.1
    received, answers = [], [500, 500, 200]

    class Receiver(Handler):
        def do_POST(self):  # noqa: N802
            received.append((self.headers["Content-Type"], self.read_json()))
            self.reply(answers.pop(0))

    server = serve(Receiver)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        deployment = DeploymentFactory(user=user, gpu_type=a100, num_gpus=1, model_name="m", status="running")
        run(deployment, host, at(2))
        limit(account, "10.00", alert_webhook_url=url, thresholds=[80])
        limits.spending_check_all(now=at(2, 3))  # 9 USD: 80 % reached

        t0 = at(2, 3)
        assert alerts.alerts_deliver(now=t0) == 1  # e-mail sent, webhook failed (HTTP 500)
        assert alerts.alerts_deliver(now=t0 + timedelta(seconds=20)) == 0  # webhook backing off (30 s)
        assert alerts.alerts_deliver(now=t0 + timedelta(seconds=31)) == 0  # failed again: next in 60 s
        assert alerts.alerts_deliver(now=t0 + timedelta(seconds=92)) == 1
        assert alerts.alerts_deliver(now=t0 + timedelta(hours=5)) == 0
    finally:
        server.shutdown()

    assert len(mail.outbox) == 1
    message = mail.outbox[0]
    assert message.to == ["alice@example.com"]
    assert message.subject == "LLMHub: 80 % of your monthly spending limit reached (9.00 of 10.00 USD)"
    assert "9.00 USD of 10.00 USD" in message.body
    assert len(received) == 3
    content_type, payload = received[-1]
    assert content_type == "application/json"
    assert payload["type"] == "spending_limit.threshold_reached"
    assert (payload["threshold_percent"], payload["limit_usd"], payload["spent_usd"]) == (80, "10.00", "9.00")
    assert payload["deployments_suspended"] is False
    hook = AlertDelivery.objects.get(channel="webhook")
    assert (hook.status, hook.attempts, hook.last_error) == ("sent", 3, "")


def test_a_webhook_that_never_answers_gives_up_after_eight_attempts(clock, account, user, host, a100, settings):
    settings.WEBHOOK_ALLOW_PRIVATE = True  # the unused port is on 127.0.0.1
    deployment = DeploymentFactory(user=user, gpu_type=a100, num_gpus=1, model_name="m", status="running")
    run(deployment, host, at(2))
    limit(account, "1.00", alert_webhook_url=f"http://127.0.0.1:{free_port()}/nothing-listens", thresholds=[100])
    limits.spending_check_all(now=at(2, 1))
    AlertDelivery.objects.filter(channel="email").delete()

    now = at(2, 1)
    for _ in range(20):
        alerts.alerts_deliver(now=now)
        now += timedelta(hours=2)

    hook = AlertDelivery.objects.get()
    assert (hook.status, hook.attempts) == ("failed", 8)
    assert hook.last_error == "connection refused"  # generic: shown to the user


def test_the_gateway_answers_a_suspended_deployment_with_the_limit(client, auth, account, user, host, a100):
    deployment = DeploymentFactory(user=user, gpu_type=a100, num_gpus=1, model_name="m", status="running")
    run(deployment, host, at(1))
    limit(account, "1.50", now=at(1, 1))

    response = chat(client, auth, model="alice/m")

    assert_openai_error(response, 402, "spending_limit_reached")
    message = response.json()["error"]["message"]
    assert "'alice/m' is suspended" in message and "spending limit of 1.50 USD" in message
    assert "/billing/settings/" in message


def test_the_banner_shows_the_threshold_then_the_suspension(client, account, user, host, a100, clock):
    client.force_login(user)
    deployment = DeploymentFactory(user=user, gpu_type=a100, num_gpus=1, model_name="m", status="running")
    run(deployment, host, at(1))
    assert 'id="billing-banner"' not in client.get("/deployments/").content.decode()

    clock.move_to(at(1, 1))
    limit(account, "5.00")  # 3 USD: 50 % reached
    page = client.get("/deployments/").content.decode()
    assert "You have reached 50 % of your monthly spending limit (3.00 of 5.00 USD this month)." in page

    clock.move_to(at(1, 2))
    limits.spending_check_all()  # 6 USD
    page = client.get("/deployments/").content.decode()
    assert "Spending limit reached: your deployments are suspended" in page
    assert "suspended: spending limit reached" in page  # the deployment's row
