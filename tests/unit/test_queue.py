"""Work is queued by task name once the transaction commits; a broker that is down fails no request."""

import pytest
from django.db import transaction
from kombu.exceptions import OperationalError

from llmhub import queue
from tests.factories import DeploymentFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def sent(monkeypatch):
    sent = []
    monkeypatch.setattr(queue.app, "send_task", lambda name, args: sent.append((name, args)))
    return sent


def test_a_task_is_sent_by_name_only_once_the_transaction_commits(sent, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        with transaction.atomic():
            queue.task_send("workers.tasks.image_pull", 7, 2)
            assert sent == []
    assert sent == [("workers.tasks.image_pull", (7, 2))]


def test_reconcile_soon_sends_the_reconcile_task_by_name(sent, django_capture_on_commit_callbacks):
    deployment = DeploymentFactory()
    with django_capture_on_commit_callbacks(execute=True):
        queue.reconcile_soon(deployment.id)
    assert ("workers.tasks.reconcile_deployment", (deployment.id,)) in sent


def test_a_broker_that_is_down_does_not_fail_the_caller(monkeypatch, django_capture_on_commit_callbacks, caplog):
    def down(name, args):
        raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    monkeypatch.setattr(queue.app, "send_task", down)
    with django_capture_on_commit_callbacks(execute=True):
        queue.task_send("workers.tasks.billing_alerts_deliver")  # no exception: logged only
    assert "Connection refused" in caplog.text


def test_every_task_name_llmhub_sends_is_a_task_the_workers_have():
    import re
    from pathlib import Path

    import workers.tasks  # noqa: F401  (registers the tasks, as a worker does)
    from workers.celery import app

    sources = "".join(p.read_text() for p in Path(queue.__file__).parent.rglob("*.py"))
    names = set(re.findall(r'"(workers\.tasks\.\w+)"', sources))
    assert queue.app is app
    assert {"workers.tasks.reconcile_deployment", "workers.tasks.image_pull", "workers.tasks.billing_invoice_push",
            "workers.tasks.billing_alerts_deliver"} <= names  # fmt: skip
    assert names <= set(app.tasks)


def test_a_task_queued_by_a_change_retries_through_a_database_outage(monkeypatch):
    """PostgreSQL away for the first two tries: the reconcile of a new deployment runs on the third, not lost."""
    from django.db import OperationalError as DatabaseDown

    from llmhub.fleet import reconcile
    from workers import tasks

    calls = []

    def flaky(*, deployment_id):
        calls.append(deployment_id)
        if len(calls) < 3:
            raise DatabaseDown("connection to server at 127.0.0.1 failed")

    monkeypatch.setattr(reconcile, "deployment_reconcile", flaky)
    result = tasks.reconcile_deployment.apply(args=[42])
    assert result.successful() and calls == [42, 42, 42]
    # Backoff: 2 s doubling, at most 60 s, long enough to ride out a 5-minute outage.
    task = tasks.reconcile_deployment
    assert task.max_retries * task.retry_backoff_max >= 5 * 60


def test_periodic_tasks_do_not_retry_their_next_tick_does():
    from workers import tasks
    from workers.schedule import beat_schedule

    periodic = {entry["task"] for entry in beat_schedule().values()}
    assert "workers.tasks.reconcile_all" in periodic
    for name in periodic - {"workers.tasks.billing_alerts_deliver"}:
        assert not getattr(tasks.app.tasks[name], "autoretry_for", ()), name
