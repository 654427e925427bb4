"""The idle-cost guard: deployments that run without a request.

Here, in the gateway's layer, because the gateway is what knows the requests (its usage records); the alerts
and their cost are billing's (`billing.idle`), scaling to zero is the deployments' service. A deployment is
idle from its last request, or from when its running instances started if that is later (so a deployment
woken or scaled up by hand is not blamed for the hours it ran nothing); a new request ends the spell.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.db.models import Max, Q
from django.utils import timezone

from llmhub.billing.idle import idle_alert_raise, idle_alerts_end
from llmhub.billing.models import IdleAlert, hours_minutes
from llmhub.deployments.models import Deployment
from llmhub.deployments.services import deployment_scale_to_zero
from llmhub.fleet.models import Instance

from .models import UsageRecord

LIVE = (Deployment.Status.DEPLOYING, Deployment.Status.RUNNING)


@dataclass
class IdleCheck:
    """What one pass found and did (deployment ids)."""

    alerted: list[int] = field(default_factory=list)
    stopped: list[int] = field(default_factory=list)
    ended: int = 0  # idle alerts whose spell ended


def running_instances(deployment: Deployment) -> list[Instance]:
    """The deployment's instances that accrue cost now (container started, not stopped)."""
    return list(deployment.instances.filter(started_at__isnull=False, stopped_at__isnull=True).select_related("host"))


def last_request_at(deployment: Deployment) -> datetime | None:
    """When the gateway last recorded a request to the deployment (None: never); one index lookup."""
    return UsageRecord.objects.filter(deployment=deployment).aggregate(at=Max("created_at"))["at"]


def idle_check_all(*, now: datetime | None = None) -> IdleCheck:
    """One pass of the guard over live deployments with an idle setting (beat, every LLMHUB_IDLE_CHECK_INTERVAL s).

    For each with running instances: quiet for `idle_alert_hours` → one idle alert for the spell (banner,
    e-mail, webhook: `billing.idle.idle_alert_raise`); quiet for `idle_stop_hours` → min instances 0 and
    every instance stopped (`deployment_scale_to_zero`, the event saying why). Spells that a request ended,
    or whose deployment no longer runs anything, have their alert ended. Returns what it did.
    """
    now = now or timezone.now()
    result = IdleCheck()
    watched = (
        Deployment.objects.filter(status__in=LIVE)
        .filter(Q(idle_alert_hours__isnull=False) | Q(idle_stop_hours__isnull=False))
        .filter(instances__started_at__isnull=False, instances__stopped_at__isnull=True)
        .distinct()
        .select_related("user", "gpu_type")
    )
    for deployment in watched:
        _check(deployment, now=now, result=result)
    # Open alerts of deployments that stopped running (or were deleted, or lost their settings) end here.
    for alert in (
        IdleAlert.objects.filter(ended_at__isnull=True).exclude(deployment__in=watched).select_related("deployment")
    ):
        result.ended += idle_alerts_end(deployment=alert.deployment, now=now)
    return result


def _check(deployment: Deployment, *, now: datetime, result: IdleCheck) -> None:
    instances = running_instances(deployment)
    if not instances or deployment.desired_instances == 0:  # stopping: nothing left to warn about
        result.ended += idle_alerts_end(deployment=deployment, now=now)
        return
    last = last_request_at(deployment)
    running_since = min(i.started_at for i in instances)
    idle_since = max(last, running_since) if last else running_since
    open_alert = IdleAlert.objects.filter(deployment=deployment, ended_at__isnull=True).first()
    if open_alert is not None and (last is None or last <= open_alert.idle_since):
        idle_since = open_alert.idle_since  # no request since: the same spell (an instance restart starts none)
    result.ended += idle_alerts_end(deployment=deployment, now=now, before=idle_since)
    quiet = now - idle_since
    stop_hours, alert_hours = deployment.idle_stop_hours, deployment.idle_alert_hours
    if stop_hours is not None and quiet >= timedelta(hours=stop_hours):
        reason = f"no request for {hours_minutes(quiet.total_seconds())} (idle stop after {stop_hours:g} h)"
        if deployment_scale_to_zero(deployment=deployment, reason=reason):
            result.stopped.append(deployment.id)
            result.ended += idle_alerts_end(deployment=deployment, now=now)
        return
    if alert_hours is not None and quiet >= timedelta(hours=alert_hours):
        if idle_alert_raise(
            deployment=deployment, idle_since=idle_since, last_request_at=last, instances=instances, now=now
        ):
            result.alerted.append(deployment.id)
