"""Autoscaling decisions with time under the test's control: up at once, down after the cooldown,
to zero and back (wake), no flapping, always within min..max, every change an event with its signals."""

import asyncio
from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from django.db import connections
from django.utils import timezone

from llmhub.deployments import autoscaler
from llmhub.deployments.autoscaler import Signals, deployment_autoscale, target_concurrency
from llmhub.deployments.models import Deployment
from llmhub.gateway import services as gateway
from llmhub.gateway.routing import Route
from tests.factories import DeploymentFactory

pytestmark = pytest.mark.django_db

T0 = timezone.now()


def make(**kw):
    defaults = {"status": "running", "min_instances": 1, "max_instances": 4, "max_batch_size": 4,
                "cooldown_seconds": 300, "target_instances": 1, "busy_at": T0}  # fmt: skip
    return DeploymentFactory(**{**defaults, **kw})


def step(deployment, at_seconds, **signals):
    deployment.refresh_from_db()
    result = deployment_autoscale(
        deployment=deployment, signals=Signals(**signals), now=T0 + timedelta(seconds=at_seconds)
    )
    deployment.refresh_from_db()
    return result


def test_target_concurrency_is_three_quarters_of_the_batch():
    assert [target_concurrency(n) for n in (1, 2, 4, 8, 256)] == [1, 1, 3, 6, 192]


def test_scales_up_at_once_and_says_why():
    deployment = make()

    assert step(deployment, 1, inflight=7, running=5, waiting=1) == 3  # ceil(7 / 3)

    assert deployment.desired_instances == 3
    event = deployment.events.get(kind="scaled")
    assert "1 → 3 instances" in event.message and "in flight 7" in event.message and "waiting 1" in event.message


def test_engine_queues_count_when_they_exceed_the_gateways_view():
    deployment = make()

    assert step(deployment, 1, inflight=0, running=3, waiting=6) == 3  # 9 requests at the engines


def test_never_beyond_max_nor_below_min():
    deployment = make(min_instances=2, max_instances=3, target_instances=2)

    assert step(deployment, 1, inflight=100) == 3
    assert step(deployment, 10_000, inflight=0) == 2


def test_scales_down_only_after_the_cooldown_and_steady_load_does_not_flap():
    deployment = make(target_instances=3)
    step(deployment, 0, inflight=9)  # 3 instances justified: the cooldown restarts

    decisions = [step(deployment, t, inflight=3) for t in (60, 120, 240, 299)]  # 1 would do, cooldown runs
    assert decisions == [None] * 4 and deployment.desired_instances == 3
    assert step(deployment, 301, inflight=3) == 1
    assert [step(deployment, t, inflight=3) for t in (400, 800, 1600)] == [None] * 3  # steady: no flapping
    assert deployment.events.filter(kind="scaled").count() == 1
    assert "load below target for 300 s" in deployment.events.get(kind="scaled").message


def test_an_idle_deployment_with_min_zero_scales_to_zero_after_the_cooldown():
    deployment = make(min_instances=0, cooldown_seconds=60)

    assert step(deployment, 59, inflight=0) is None
    assert step(deployment, 61, inflight=0) == 0
    assert deployment.desired_instances == 0


def test_no_scale_down_while_instances_are_still_starting():
    deployment = make(min_instances=0, cooldown_seconds=5)

    assert step(deployment, 60, inflight=0, starting=1) is None  # warming up: the cooldown restarts
    assert step(deployment, 64, inflight=0) is None
    assert step(deployment, 66, inflight=0) == 0


def test_suspended_or_failed_deployments_are_left_alone():
    for status in (Deployment.Status.SUSPENDED, Deployment.Status.FAILED):
        assert step(make(status=status), 1, inflight=50) is None


@pytest.mark.django_db(transaction=True)  # the async ORM works in its own thread: data must be committed
def test_concurrent_requests_wake_a_deployment_at_zero_exactly_once():
    deployment = make(min_instances=0, target_instances=0)
    route = Route(deployment.id, deployment.user_id, deployment.full_name, "running", "", 0, [])

    async def wake_many():
        claims = await asyncio.gather(*(gateway.wake(route) for _ in range(5)))
        await sync_to_async(connections.close_all)()
        return claims

    claims = asyncio.run(wake_many())

    deployment.refresh_from_db()
    assert sorted(claims) == [False] * 4 + [True]
    assert deployment.desired_instances == 1
    assert deployment.events.filter(kind="scaled", message__contains="scale from zero").count() == 1


def test_autoscale_all_reads_the_engines_metrics(monkeypatch):
    deployment = make()
    monkeypatch.setattr(autoscaler, "engine_signals", lambda ds: {deployment.id: (2.0, 4.0, 0)})

    assert autoscaler.autoscale_all(inflight={deployment.id: 1}) == 1

    deployment.refresh_from_db()
    assert deployment.desired_instances == 2  # ceil(6 / 3)
