"""The Celery app. Start a worker with `celery -A workers worker`, the schedule with `celery -A workers beat`."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmhub.settings")

app = Celery("llmhub")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.conf.include = ["workers.tasks"]


def _beat_schedule():
    from workers.schedule import beat_schedule

    return beat_schedule()


app.conf.beat_schedule = _beat_schedule()
