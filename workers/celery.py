"""The Celery app. Start a worker with `celery -A workers worker`, the schedule with `celery -A workers beat`."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmhub.settings")

app = Celery("llmhub")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.conf.include = ["workers.tasks"]

# Tasks that talk to user-supplied URLs (webhooks) go to a queue of their own with a worker of its own
# (llmhub/processes.py), so a slow or trickling endpoint never holds a worker that reconciles.
OUTBOUND_TASKS = ["workers.tasks.billing_alerts_deliver"]


def _task_routes():
    from django.conf import settings

    return {name: {"queue": settings.OUTBOUND_QUEUE} for name in OUTBOUND_TASKS}


app.conf.task_routes = _task_routes()


def _beat_schedule():
    from workers.schedule import beat_schedule

    return beat_schedule()


app.conf.beat_schedule = _beat_schedule()
