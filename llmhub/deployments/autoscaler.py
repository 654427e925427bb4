"""The autoscaler: load signals → a deployment's target instance count, between min and max.

Signals: requests in flight at the gateway (all web processes, via Redis: `gateway.load`) and each
ready engine's `vllm:num_requests_running` + `vllm:num_requests_waiting` (vLLM /metrics). The load is
the larger of the two; each instance should carry `target_concurrency(max_batch_size)` requests
(75 % of its batch slots), so the recommendation is ceil(load / that). Scaling up happens at once;
scaling down only once the load has stayed below the current scale for the deployment's cooldown
(like Kubernetes' HPA stabilization window), which also keeps a steady load from flapping; while
instances are still pending or starting the cooldown does not run. With
min_instances = 0 an idle deployment goes to zero; the gateway wakes it (`gateway.services.wake`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.utils import timezone

from llmhub.fleet import vllm
from llmhub.fleet.models import Instance

from .models import Deployment
from .services import event_record, reconcile_soon

TARGET_UTILIZATION = 0.75


@dataclass(frozen=True)
class Signals:
    """Load of one deployment: gateway in-flight requests; engine running and waiting, summed over instances."""

    inflight: int = 0
    running: float = 0
    waiting: float = 0
    starting: int = 0  # instances pending or starting: no scale-down while they warm up

    @property
    def load(self) -> float:
        return max(self.inflight, self.running + self.waiting)

    def describe(self) -> str:
        return f"in flight {self.inflight}, engines running {self.running:g}, waiting {self.waiting:g}"


def target_concurrency(max_batch_size: int) -> int:
    """Requests one instance should carry: 75 % of its batch slots (at least 1)."""
    return max(1, math.floor(max_batch_size * TARGET_UTILIZATION))


def recommend(load: float, max_batch_size: int) -> int:
    """Instances needed for `load` concurrent requests (before clamping to min..max)."""
    return math.ceil(load / target_concurrency(max_batch_size))


def engine_signals(deployment: Deployment) -> tuple[float, float, int]:
    """(running, waiting) summed over the deployment's ready instances' /metrics, and how many of its
    instances are still pending or starting."""
    running = waiting = 0.0
    starting = 0
    for instance in Instance.objects.filter(deployment=deployment, state__in=Instance.LIVE_STATES).select_related(
        "host"
    ):
        if instance.state in (Instance.State.PENDING, Instance.State.STARTING):
            starting += 1
        elif instance.state == Instance.State.READY and (
            measured := vllm.engine_load(instance.base_url, key=instance.engine_key)
        ):
            running, waiting = running + measured[0], waiting + measured[1]
    return running, waiting, starting


def deployment_autoscale(*, deployment: Deployment, signals: Signals, now: datetime | None = None) -> int | None:
    """Apply one autoscaling decision. Returns the new target, or None when it stays.

    Up: at once to min(max, recommendation). Down: to max(min, recommendation) once the load has not
    justified the current count for `cooldown_seconds`. Every change is an event naming the signals.
    A conditional UPDATE on the old target makes concurrent passes harmless.
    """
    if deployment.status not in (Deployment.Status.DEPLOYING, Deployment.Status.RUNNING):
        return None
    now = now or timezone.now()
    current = deployment.desired_instances
    wanted = max(
        deployment.min_instances, min(deployment.max_instances, recommend(signals.load, deployment.max_batch_size))
    )
    rows = Deployment.objects.filter(id=deployment.id, target_instances=deployment.target_instances)
    if wanted >= current or signals.starting:
        updated = rows.update(busy_at=now, **({"target_instances": wanted} if wanted > current else {}))
        if wanted <= current or not updated:
            return None
        reason = "load above target"
    else:
        quiet_since = deployment.busy_at or deployment.created_at
        if now - quiet_since < timedelta(seconds=deployment.cooldown_seconds):
            return None
        if not rows.update(target_instances=wanted, busy_at=now):
            return None
        reason = f"load below target for {deployment.cooldown_seconds} s"
    per = target_concurrency(deployment.max_batch_size)
    event_record(
        deployment=deployment,
        kind="scaled",
        message=f"{current} → {wanted} instances: {reason} ({signals.describe()}; {per} per instance)",
    )
    reconcile_soon(deployment.id)
    return wanted


def autoscale_all(*, inflight: dict[int, int], now: datetime | None = None) -> int:
    """One autoscaler pass over every live deployment. `inflight`: {deployment id: gateway in-flight}.

    Returns the number of deployments whose target changed.
    """
    changed = 0
    live = Deployment.objects.filter(status__in=[Deployment.Status.DEPLOYING, Deployment.Status.RUNNING])
    for deployment in live.select_related("user"):
        running, waiting, starting = engine_signals(deployment)
        signals = Signals(inflight.get(deployment.id, 0), running, waiting, starting)
        changed += deployment_autoscale(deployment=deployment, signals=signals, now=now) is not None
    return changed
