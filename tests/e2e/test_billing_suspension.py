"""The spending limit against the real platform (web, worker, beat, Docker Engine, vLLM): the beat's check
suspends a running deployment at its limit, its container stops, the gateway names the limit, the spend
stops when the container stops (within one check interval of the running cost plus the stop); raising the
limit brings it back at its scale; the week's invoice matches the run intervals (`billing_audit`)."""

import time
from datetime import timedelta
from decimal import Decimal
from io import StringIO

import httpx
import pytest
from django.conf import settings
from django.core.management import call_command
from django.utils import timezone

from llmhub.billing import invoices, limits
from llmhub.billing.metering import cost_by_user
from llmhub.billing.models import Suspension
from llmhub.billing.periods import WEEK, month_start, week_start
from llmhub.deployments.models import Deployment
from llmhub.deployments.services import deployment_create
from llmhub.fleet import engine
from llmhub.fleet.models import GpuType, Instance
from tests.factories import UserFactory, token_for
from tests.stack import BILLING_CHECK_INTERVAL, DOCKER, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.docker, pytest.mark.vllm]

CHECK_INTERVAL = BILLING_CHECK_INTERVAL  # seconds, for the tests' platform
PRICE = Decimal("36")  # USD per GPU-hour: 0.01 USD a second, so the limit comes quickly


@pytest.fixture
def cpu_hourly_price():
    return PRICE


@pytest.fixture
def billing_stack(stack):
    """The shared platform (its spending check every CHECK_INTERVAL seconds, alert e-mails to its worker log),
    its CPU host priced at PRICE; yields (web URL, the CPU GPU type)."""
    return stack, GpuType.objects.get(name="CPU")


def spent(user) -> Decimal:
    from django.utils import timezone

    now = timezone.now()
    return cost_by_user(user_ids=[user.id], start=month_start(now), end=now, now=now)[user.id]


def chat(url, token, model):
    return httpx.post(
        f"{url}/v1/openai/chat/completions", headers={"Authorization": f"Bearer {token}"}, timeout=120,
        json={"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
    )  # fmt: skip


def status_of(deployment):
    deployment.refresh_from_db()
    return deployment.status


def our_containers():
    return engine.containers_list(DOCKER, installation=settings.CONTAINER_PREFIX)


def test_the_limit_suspends_a_running_deployment_and_raising_it_resumes(billing_stack):
    url, cpu = billing_stack
    user = UserFactory(username="dora", email="dora@example.com")
    token = token_for(user)
    deployment = deployment_create(user=user, model_name="tiny", gpu_type=cpu, num_gpus=1, max_batch_size=4,
                                   hf_repo="llmhub/tiny-random-llama", min_instances=1, max_instances=1)  # fmt: skip
    wait_for(lambda: status_of(deployment) in ("running", "failed"), timeout=420, what="the deployment to run")
    assert status_of(deployment) == "running", deployment.fail_reason
    assert chat(url, token, "dora/tiny").status_code == 200

    account = limits.billing_account_get(user=user)
    cap = (spent(user) + Decimal("0.06")).quantize(Decimal("0.01"))  # about 6 s more at 0.01 USD/s
    limits.billing_settings_update(account=account, monthly_limit=cap, alert_thresholds=[50, 80, 100])

    wait_for(lambda: status_of(deployment) == "suspended", timeout=90, interval=0.2, what="suspension")
    wait_for(lambda: not our_containers(), timeout=60, interval=0.5, what="the container to stop")
    assert not Instance.objects.filter(deployment=deployment, state__in=Instance.LIVE_STATES).exists()
    final = spent(user)
    time.sleep(3)
    assert spent(user) == final  # nothing accrues while suspended
    overshoot = final - cap
    # Billing follows the run intervals: the spend stops when the container has stopped.
    held_at = Suspension.objects.get(deployment=deployment).suspended_at
    stopped_at = Instance.objects.filter(deployment=deployment).latest("stopped_at").stopped_at
    stop_cost = PRICE * Decimal((stopped_at - held_at).total_seconds()) / 3600
    bound = PRICE * CHECK_INTERVAL / 3600  # one check interval at the running cost: 0.02 USD
    print(
        f"limit {cap} USD, spent {final:.4f} USD, overshoot {overshoot:.4f} USD, bound {bound:.4f} USD "
        f"+ {stop_cost:.4f} USD while the container stopped ({(stopped_at - held_at).total_seconds():.1f} s)"
    )
    # Beat's ticks are not exact on a busy 2-core machine: allow one more interval of scheduling delay.
    assert Decimal(0) <= overshoot <= 2 * bound + stop_cost

    refused = chat(url, token, "dora/tiny")
    assert refused.status_code == 402
    error = refused.json()["error"]
    assert error["code"] == "spending_limit_reached" and f"spending limit of {cap:,.2f} USD" in error["message"]
    assert deployment.fail_reason.startswith("suspended: spending limit reached")

    result = limits.billing_settings_update(account=account, monthly_limit=cap + 50, alert_thresholds=[50, 80, 100])
    assert result.resumed == 1
    wait_for(
        lambda: Instance.objects.filter(deployment=deployment, state=Instance.State.READY).exists(),
        timeout=420, what="a new ready instance",
    )  # fmt: skip
    deployment.refresh_from_db()
    assert (deployment.status, deployment.min_instances, deployment.max_instances) == (
        Deployment.Status.RUNNING, 1, 1
    )  # fmt: skip
    assert chat(url, token, "dora/tiny").status_code == 200
    kinds = list(deployment.events.order_by("id").values_list("kind", flat=True))
    assert kinds.index("suspended") < kinds.index("resumed") and kinds.count("ready") == 2

    # The week's invoice, built as the invoice run will after the week's end, matches the run intervals.
    later = week_start(timezone.now()) + WEEK + timedelta(hours=2)
    assert [i.account.user for i in invoices.invoices_build_due(now=later)] == [user]
    out = StringIO()
    call_command("billing_audit", "--now", later.isoformat(), stdout=out)
    assert "no differences" in out.getvalue()
