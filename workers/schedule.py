"""The periodic schedule, in one place (read by Celery beat)."""

from django.conf import settings


def beat_schedule() -> dict:
    """Celery beat entries: task name → interval in seconds."""
    return {
        "reconcile-all": {
            "task": "workers.tasks.reconcile_all",
            "schedule": settings.RECONCILE_INTERVAL,
            "options": {"expires": settings.RECONCILE_INTERVAL * 2},
        },
        "autoscale-all": {
            "task": "workers.tasks.autoscale_all",
            "schedule": settings.AUTOSCALE_INTERVAL,
            "options": {"expires": settings.AUTOSCALE_INTERVAL * 2},
        },
    }
