"""A slow webhook endpoint must never delay reconcile: deliveries go to their own queue, consumed by a worker
process of their own. Run with the platform's real worker processes (as `bin/up` starts them) on the test
database and Redis, against trickling endpoints that hold every delivery slot."""

import os

import pytest
from django.conf import settings

from llmhub import processes
from llmhub.deployments.models import Deployment
from tests.factories import DeploymentFactory, UserFactory
from tests.fakes.webhook_server import endpoint_running
from tests.security.support import webhook_delivery
from tests.stack import database_url, wait_for
from workers import tasks
from workers.celery import app


def test_deliveries_are_routed_to_the_outbound_queue_and_reconcile_is_not():
    route = app.amqp.router.route

    assert route({}, "workers.tasks.billing_alerts_deliver")["queue"].name == settings.OUTBOUND_QUEUE
    assert route({}, "workers.tasks.reconcile_all")["queue"].name == settings.CELERY_TASK_DEFAULT_QUEUE
    commands = processes.platform_commands(port=8000, schedule="beat-schedule")
    assert commands["outbound"][commands["outbound"].index("-Q") + 1] == settings.OUTBOUND_QUEUE
    assert commands["worker"][commands["worker"].index("-Q") + 1] == settings.CELERY_TASK_DEFAULT_QUEUE


@pytest.mark.django_db(transaction=True)
def test_reconcile_runs_while_trickling_endpoints_hold_every_delivery_slot(user, tmp_path):
    commands = processes.platform_commands(port=0, schedule=tmp_path / "beat-schedule")
    env = {
        **os.environ, "DATABASE_URL": database_url(), "LLMHUB_QUEUE": settings.CELERY_TASK_DEFAULT_QUEUE,
        "LLMHUB_CONTAINER_PREFIX": settings.CONTAINER_PREFIX, "LLMHUB_WEBHOOK_ALLOW_PRIVATE": "1",
        "LLMHUB_BILLING_WEBHOOK_TIMEOUT": "60",
    }  # fmt: skip
    with endpoint_running(behaviour="trickle", interval=1, duration=60) as slow:
        for other in ("carol", "dave"):  # as many as the delivery worker has slots (concurrency 2)
            webhook_delivery(UserFactory(username=other), slow.url)
        children = processes.start(
            {name: commands[name] for name in ("worker", "outbound")}, log_dir=tmp_path, env=env
        )  # fmt: skip
        try:
            tasks.billing_alerts_deliver.delay()
            tasks.billing_alerts_deliver.delay()
            wait_for(lambda: len(slow.received) == 2, timeout=60, interval=0.5, what="both deliveries under way")

            deployment = DeploymentFactory(user=user, status="deleting")  # no instances: reconcile deletes it
            tasks.reconcile_deployment.delay(deployment.id)
            wait_for(
                lambda: Deployment.objects.get(id=deployment.id).status == "deleted",
                timeout=20, interval=0.5, what="reconcile while the deliveries trickle",
            )  # fmt: skip
        finally:
            processes.stop(children, grace=1)  # the outbound worker is mid-delivery: it would use all its grace
