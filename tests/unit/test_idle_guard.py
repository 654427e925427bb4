"""The idle-cost guard under a controlled clock: a deployment running without a request for `idle_alert_hours`
alerts once per idle spell (banner, e-mail, webhook) with its cost since the last request and a one-click
"scale to zero"; `idle_stop_hours` scales it to zero by itself, saying why on its timeline."""

import json
import threading
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import time_machine
from django.core import mail
from django.test import Client

from llmhub.billing import alerts
from llmhub.billing.limits import billing_account_get
from llmhub.billing.models import AlertDelivery, IdleAlert
from llmhub.deployments.models import Deployment
from llmhub.gateway.idle import idle_check_all
from llmhub.gateway.models import UsageRecord
from tests.billing_support import at, run
from tests.factories import DeploymentFactory, GpuTypeFactory, HostFactory
from workers.schedule import beat_schedule

pytestmark = pytest.mark.django_db


@pytest.fixture
def clock():
    with time_machine.travel(at(2, 8), tick=False) as traveller:
        yield traveller


@pytest.fixture
def h100(clock):
    return GpuTypeFactory(name="H100", memory_gb=80, hourly_price=Decimal("2.50"), uses_devices=True)


@pytest.fixture
def host(h100):
    return HostFactory(name="gpu-1", gpu_type=h100, gpu_count=8)


@pytest.fixture
def account(user):
    user.email = "alice@example.com"
    user.save()
    return billing_account_get(user=user)


@pytest.fixture
def deployment(user, h100, host, account):
    """alice/chat on 2 × H100 (5.00 USD per hour per instance), one instance running since 08:00."""
    deployment = DeploymentFactory(user=user, gpu_type=h100, num_gpus=2, model_name="chat", status="running",
                                   min_instances=1, max_instances=3, target_instances=1)  # fmt: skip
    run(deployment, host, at(2, 8))
    return deployment


@pytest.fixture
def signed_in(client, user):
    client.force_login(user)
    return client


def request_at(deployment, moment):
    UsageRecord.objects.create(deployment=deployment, user=deployment.user, created_at=moment, endpoint="chat/completions",
                               status=200, latency_ms=100)  # fmt: skip


def check(clock, moment):
    clock.move_to(moment)
    return idle_check_all()


def test_one_alert_per_idle_spell_with_the_cost_since_the_last_request(clock, deployment):
    request_at(deployment, at(2, 9, 30))

    check(clock, at(2, 11, 29))  # 1 h 59 min without a request
    assert not IdleAlert.objects.exists()
    check(clock, at(2, 11, 30))
    check(clock, at(2, 12, 30))
    check(clock, at(2, 18))

    [alert] = IdleAlert.objects.all()
    assert (alert.deployment, alert.idle_since, alert.created_at) == (deployment, at(2, 9, 30), at(2, 11, 30))
    assert alert.cost == Decimal("10.00")  # 2 h × 2 GPUs × 2.50 USD
    assert alert.hourly == Decimal("5.00") and alert.instances == 1
    assert alert.message == (
        "alice/chat has had no request for 2 h 0 min (since 2026-03-02 09:30 UTC) while 1 instance runs "
        "(2 × H100): 10.00 USD since its last request, 5.00 USD per hour."
    )
    assert AlertDelivery.objects.filter(idle_alert=alert).count() == 1  # e-mail (no webhook set)


def test_a_new_request_ends_the_spell_and_the_next_spell_alerts_again(clock, deployment):
    request_at(deployment, at(2, 9))
    check(clock, at(2, 11, 5))
    request_at(deployment, at(2, 11, 10))
    check(clock, at(2, 11, 15))

    first = IdleAlert.objects.get()
    assert first.ended_at == at(2, 11, 15)
    check(clock, at(2, 13, 9))
    assert IdleAlert.objects.count() == 1
    check(clock, at(2, 13, 10))

    second = IdleAlert.objects.exclude(id=first.id).get()
    assert (second.idle_since, second.cost, second.ended_at) == (at(2, 11, 10), Decimal("10.00"), None)


def test_a_deployment_never_asked_anything_is_idle_since_its_instances_started(clock, deployment):
    check(clock, at(2, 9, 59))
    assert not IdleAlert.objects.exists()
    check(clock, at(2, 10))

    alert = IdleAlert.objects.get()
    assert alert.idle_since == at(2, 8) and alert.cost == Decimal("10.00")
    assert "has had no request since it started 2 h 0 min ago" in alert.message


def test_an_instance_started_long_after_the_last_request_counts_from_its_start(clock, deployment, host):
    Deployment.objects.filter(id=deployment.id).update(created_at=at(1))
    deployment.instances.update(started_at=at(2, 8), stopped_at=at(2, 8, 30), state="stopped")
    request_at(deployment, at(1, 12))
    run(deployment, host, at(2, 10))

    check(clock, at(2, 11))  # a day without a request, but running for an hour only
    assert not IdleAlert.objects.exists()
    check(clock, at(2, 12))

    alert = IdleAlert.objects.get()
    assert alert.cost == Decimal("12.50")  # since the last request: 08:00–08:30 and 10:00–12:00
    assert "no request for 24 h 0 min (since 2026-03-01 12:00 UTC)" in alert.message


def test_off_when_idle_alert_hours_is_null_and_at_its_own_hours_otherwise(clock, deployment, user, h100, host):
    Deployment.objects.filter(id=deployment.id).update(idle_alert_hours=None)
    patient = DeploymentFactory(user=user, gpu_type=h100, num_gpus=1, model_name="patient", status="running",
                                idle_alert_hours=0.5)  # fmt: skip
    run(patient, host, at(2, 8))

    check(clock, at(2, 8, 29))
    assert not IdleAlert.objects.exists()
    check(clock, at(2, 20))

    assert [a.deployment_id for a in IdleAlert.objects.all()] == [patient.id]


def test_nothing_running_no_alert_and_an_open_alert_ends(clock, deployment, user, h100):
    DeploymentFactory(user=user, gpu_type=h100, model_name="zero", status="running", min_instances=0,
                      target_instances=0)  # fmt: skip
    check(clock, at(2, 10))
    deployment.instances.update(stopped_at=at(2, 10, 30), state="stopped")

    check(clock, at(2, 11))

    [alert] = IdleAlert.objects.all()
    assert alert.deployment == deployment and alert.ended_at == at(2, 11)


def test_idle_stop_hours_scales_to_zero_with_an_event_saying_why(clock, deployment):
    Deployment.objects.filter(id=deployment.id).update(idle_stop_hours=3)
    request_at(deployment, at(2, 9))

    check(clock, at(2, 11, 59))
    deployment.refresh_from_db()
    assert (deployment.min_instances, deployment.desired_instances) == (1, 1)
    check(clock, at(2, 12))

    deployment.refresh_from_db()
    assert (deployment.min_instances, deployment.max_instances, deployment.desired_instances) == (0, 3, 0)
    event = deployment.events.first()
    assert event.kind == "scaled"
    assert event.message == "1–3 → 0–3 instances, scaled to zero: no request for 3 h 0 min (idle stop after 3 h)"
    assert IdleAlert.objects.get().ended_at == at(2, 12)  # the alert of that spell: nothing costs any more
    check(clock, at(2, 12, 5))
    assert deployment.events.filter(kind="scaled").count() == 1


def test_the_alert_email_and_webhook_name_the_cost_and_the_scale_to_zero_link(clock, deployment, account, settings):
    settings.WEBHOOK_ALLOW_PRIVATE = True  # the receiver is on 127.0.0.1
    received = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        account.alert_webhook_url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        account.save()
        request_at(deployment, at(2, 9, 30))
        check(clock, at(2, 12))
        assert alerts.alerts_deliver() == 2
    finally:
        server.shutdown()

    url = f"{settings.PUBLIC_URL}/deployments/{deployment.deploy_id}/scale-to-zero"
    [message] = mail.outbox
    assert message.to == ["alice@example.com"]
    assert message.subject == "LLMHub: alice/chat idle for 2 h 30 min, 12.50 USD since its last request"
    assert "12.50 USD since its last request, 5.00 USD per hour" in message.body
    assert url in message.body
    [payload] = received
    assert payload == {
        "type": "deployment.idle", "account": "alice", "deployment": "alice/chat", "deploy_id": deployment.deploy_id,
        "idle_since": "2026-03-02T09:30:00+00:00", "last_request_at": "2026-03-02T09:30:00+00:00",
        "idle_hours": 2.5, "instances": 1,
        "cost_since_last_request_usd": "12.50", "hourly_usd": "5.00", "scale_to_zero_url": url,
        "created_at": "2026-03-02T12:00:00+00:00",
    }  # fmt: skip
    assert set(AlertDelivery.objects.values_list("status", flat=True)) == {"sent"}


def test_the_banner_offers_a_one_click_scale_to_zero(clock, deployment, signed_in, other_user):
    check(clock, at(2, 10, 30))

    page = signed_in.get("/billing/").content.decode()
    assert "alice/chat has had no request since it started 2 h 30 min ago" in page
    assert f'action="/deployments/{deployment.deploy_id}/scale-to-zero"' in page
    assert "csrfmiddlewaretoken" in page

    response = signed_in.post(f"/deployments/{deployment.deploy_id}/scale-to-zero")
    assert response.status_code == 302
    deployment.refresh_from_db()
    assert (deployment.min_instances, deployment.desired_instances) == (0, 0)
    assert deployment.events.first().message == "1–3 → 0–3 instances, scaled to zero: by the owner"
    page = signed_in.get(response["Location"]).content.decode()
    assert "alice/chat scales to zero" in page
    assert "has had no request since" not in page  # the banner went with the spend

    signed_in.force_login(other_user)
    assert "alice/chat" not in signed_in.get("/billing/").content.decode()


def test_scale_to_zero_is_the_owners_only_and_needs_a_post_with_csrf(
    clock, deployment, signed_in, client, user, other_user
):
    url = f"/deployments/{deployment.deploy_id}/scale-to-zero"
    confirm = signed_in.get(url)  # the e-mail's link: a page with the button, nothing changes
    assert confirm.status_code == 200 and f'action="{url}"' in confirm.content.decode()
    deployment.refresh_from_db()
    assert deployment.min_instances == 1

    strict = Client(enforce_csrf_checks=True)
    strict.force_login(user)
    assert strict.post(url).status_code == 403
    assert signed_in.put(url).status_code == 405

    signed_in.force_login(other_user)
    assert signed_in.get(url).status_code == 404
    assert signed_in.post(url).status_code == 404
    client.logout()
    response = client.post(url)
    assert response.status_code == 302 and response["Location"].startswith("/login/")
    deployment.refresh_from_db()
    assert (deployment.min_instances, deployment.desired_instances) == (1, 1)


def test_the_check_runs_on_the_beat_schedule_through_a_thin_task(clock, deployment):
    from workers.tasks import idle_check

    assert "workers.tasks.idle_check" in {entry["task"] for entry in beat_schedule().values()}
    clock.move_to(at(2, 10))
    idle_check.apply()
    assert IdleAlert.objects.count() == 1


def test_an_instance_restart_within_a_spell_alerts_no_second_time(clock, deployment, host):
    check(clock, at(2, 10))
    deployment.instances.update(stopped_at=at(2, 11), state="stopped")  # crashed and replaced
    run(deployment, host, at(2, 11, 1))

    check(clock, at(2, 11, 5))
    check(clock, at(2, 14))

    [alert] = IdleAlert.objects.all()
    assert alert.ended_at is None
