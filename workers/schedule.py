"""The periodic schedule, in one place (read by Celery beat)."""

from celery.schedules import crontab
from django.conf import settings


def beat_schedule() -> dict:
    """Celery beat entries: task name → interval in seconds (or a crontab)."""
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
        "billing-check": {
            "task": "workers.tasks.billing_check",
            "schedule": settings.BILLING_CHECK_INTERVAL,
            "options": {"expires": settings.BILLING_CHECK_INTERVAL * 2},
        },
        "billing-alerts-deliver": {"task": "workers.tasks.billing_alerts_deliver", "schedule": 15.0},
        # Hourly at minute 5 (an interval would wait an hour after every restart before its first run).
        "billing-invoices": {"task": "workers.tasks.billing_invoices", "schedule": crontab(minute="5")},
        "idle-check": {
            "task": "workers.tasks.idle_check",
            "schedule": settings.IDLE_CHECK_INTERVAL,
            "options": {"expires": settings.IDLE_CHECK_INTERVAL * 2},
        },
        "request-logs-purge": {"task": "workers.tasks.request_logs_purge", "schedule": crontab(minute="35")},
    }
