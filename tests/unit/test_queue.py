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


def test_the_names_sent_are_tasks_the_workers_have():
    import workers.tasks  # noqa: F401  (registers the tasks, as a worker does)
    from workers.celery import app

    assert queue.app is app
    for name in ("workers.tasks.reconcile_deployment", "workers.tasks.image_pull",
                 "workers.tasks.billing_invoice_push", "workers.tasks.billing_alerts_deliver"):  # fmt: skip
        assert name in app.tasks
