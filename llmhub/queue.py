"""Queueing work for the workers: tasks are sent by name, once the current transaction commits.

On the ground floor: it imports no app and never `workers`, so any layer can queue work without an import
circle (the tasks in workers/tasks.py import the services, never the other way round). The Celery app is
defined here; workers/celery.py adds the task modules and the beat schedule to this same app.
"""

from celery import Celery
from django.db import InterfaceError, OperationalError, transaction

from llmhub.routing_generation import routing_changed

app = Celery("llmhub")
app.config_from_object("django.conf:settings", namespace="CELERY")

# Tasks that talk to user-supplied URLs (webhooks) go to a queue of their own with a worker of its own
# (llmhub/processes.py), so a slow or trickling endpoint never holds a worker that reconciles.
OUTBOUND_TASKS = ["workers.tasks.billing_alerts_deliver"]


def _task_routes() -> dict:
    from django.conf import settings

    return {name: {"queue": settings.OUTBOUND_QUEUE} for name in OUTBOUND_TASKS}


app.conf.task_routes = _task_routes()

# Options of the tasks queued by a change (a deployment created, an invoice built...): through an outage of
# PostgreSQL they retry with exponential backoff (2 s doubling up to 60 s, with jitter; 20 retries cover well
# over the 5 minutes the platform is built to ride out). Periodic tasks do not retry: their next tick does.
RETRY_ON_DATABASE_OUTAGE = {
    "autoretry_for": (OperationalError, InterfaceError),
    "retry_backoff": 2,
    "retry_backoff_max": 60,
    "retry_jitter": True,
    "max_retries": 20,
}


def task_send(name: str, *args: int) -> None:
    """Send task `name` (e.g. "workers.tasks.image_pull") with positional `args` (ids) once the current
    transaction commits (at once outside one), to its queue (`OUTBOUND_TASKS` or CELERY_TASK_DEFAULT_QUEUE).

    A broker that is down only logs an error (`robust`): the change is committed and a periodic task
    (workers/schedule.py) picks the work up, so the request that queued it still succeeds.
    """
    transaction.on_commit(lambda: app.send_task(name, args=args), robust=True)


def reconcile_soon(deployment_id: int) -> None:
    """Ask a worker to reconcile `deployment_id` once the current transaction commits, and tell the
    gateway that routing may have changed (this is called on every change of desired state).

    A broker that is down only logs an error: the periodic reconcile pass (beat, every RECONCILE_INTERVAL s)
    picks the deployment up, so the request still succeeds.
    """
    task_send("workers.tasks.reconcile_deployment", deployment_id)
    routing_changed()
