"""The Celery app. Start a worker with `celery -A workers worker`, the schedule with `celery -A workers beat`.

The app itself (broker, queues, routes) is defined on the ground floor, llmhub/queue.py, where services send
tasks by name; here it learns the task modules and the beat schedule.
"""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmhub.settings")

from llmhub.queue import OUTBOUND_TASKS, app  # noqa: E402  (the settings module must be named first)

app.conf.include = ["workers.tasks"]

__all__ = ["OUTBOUND_TASKS", "app"]


def _beat_schedule():
    from workers.schedule import beat_schedule

    return beat_schedule()


app.conf.beat_schedule = _beat_schedule()
