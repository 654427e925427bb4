"""Scaling a deployment's instances: add pending ones, choose which to stop, stop them gracefully.

When instances must stop (scale-down, lower max, a draining host's instance whose replacement
serves), the least advanced go first (pending, then starting, then ready), and among ready ones the
least loaded: fewest requests in flight at the gateway, which every web process publishes per
instance to Redis under INSTANCE_INFLIGHT_PREFIX (`gateway.load` writes it; the key layout lives here,
on the lower layer, so the fleet never imports the gateway). A ready instance of a live deployment
is drained before its container is removed: it leaves routing at once (it is no longer ready), and
is removed once DRAIN_MIN_SECONDS have passed (every gateway process has dropped its route and
published the requests it sent there) and its in-flight count is 0, or after DRAIN_MAX_SECONDS.
Stops of failed, suspended or deleted deployments are immediate.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import redis
from django.conf import settings
from django.utils import timezone

from llmhub.deployments.models import Deployment
from llmhub.deployments.timeline import event_record

from . import engine, notices
from .hosts import Observation
from .models import Host, Instance

log = logging.getLogger(__name__)

INSTANCE_INFLIGHT_PREFIX = f"{settings.REDIS_KEY_PREFIX}instance-inflight:"  # + "<host>:<pid>": {instance id: n}
DRAIN_MIN_SECONDS = 2.0  # > the gateway's routing check (0.25 s) + its publish interval (1 s)
DRAIN_MAX_SECONDS = 300.0  # the gateway's default upstream timeout: longer requests are cut
# Rank when choosing which instances to stop: the least advanced first.
_STOP_RANK = {Instance.State.PENDING: 0, Instance.State.STARTING: 1, Instance.State.READY: 2}


def instance_inflight() -> dict[int, int]:
    """{instance id: requests in flight at the gateway, summed over its live web processes}; {} when
    Redis does not answer (then a drain waits DRAIN_MIN_SECONDS only)."""
    try:
        client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=2)
        totals: dict[int, int] = {}
        for key in client.scan_iter(match=f"{INSTANCE_INFLIGHT_PREFIX}*"):
            for instance_id, count in client.hgetall(key).items():
                totals[int(instance_id)] = totals.get(int(instance_id), 0) + int(count)
        return totals
    except (redis.RedisError, ValueError) as exc:
        log.warning("in-flight counts unreadable: %s", exc)
        return {}


def claim(instance: Instance, old: str, **changes) -> bool:
    """Conditional update: apply `changes` only if the instance is still in state `old`."""
    done = Instance.objects.filter(id=instance.id, state=old).update(**changes)
    if done:
        for key, value in changes.items():
            setattr(instance, key, value)
    return bool(done)


def _on_draining_host(instance: Instance) -> bool:
    return (
        instance.state in (Instance.State.STARTING, Instance.State.READY)
        and instance.host is not None
        and instance.host.state == Host.State.DRAINING
    )


def _being_replaced(instance: Instance) -> bool:
    """On a draining host, or asked to be replaced (`Instance.replace_requested_at`): it serves until its
    replacement does."""
    return _on_draining_host(instance) or (
        instance.state in (Instance.State.STARTING, Instance.State.READY) and instance.replace_requested_at is not None
    )


def _stop_order(instances: list[Instance]) -> list[Instance]:
    """Least advanced first; among ready ones the least loaded (gateway in-flight); newest on a tie."""
    loads = instance_inflight() if any(i.state == Instance.State.READY for i in instances) else {}
    return sorted(instances, key=lambda i: (_STOP_RANK[i.state], loads.get(i.id, 0), -i.id))


def instances_scale(deployment: Deployment, live: list[Instance]) -> None:
    """Add pending instances or mark extra ones stopping so that the live count matches the desired count.

    Instances on a draining host, or asked to be replaced (LoRA adapters they cannot load at run time),
    do not count: each gets a replacement, and keeps serving until enough replacements are ready (make
    before break); then it stops.
    """
    desired = deployment.desired_instances
    now = timezone.now()
    moving = [i for i in live if _being_replaced(i)]
    active = [i for i in live if i.state != Instance.State.STOPPING and not _being_replaced(i)]
    for _ in range(desired - len(active)):
        instance = Instance.objects.create(deployment=deployment)
        live.append(instance)
        active.append(instance)
    if len(active) > desired:
        for instance in _stop_order(active)[: len(active) - desired]:
            claim(instance, instance.state, state=Instance.State.STOPPING, stopping_at=now)
    ready = sum(1 for i in active if i.state == Instance.State.READY)
    still_needed = max(desired - ready, 0)
    if len(moving) > still_needed:
        for instance in _stop_order(moving)[: len(moving) - still_needed]:
            if claim(instance, instance.state, state=Instance.State.STOPPING, stopping_at=now):
                if instance.replace_requested_at is not None:
                    event_record(deployment=deployment, kind="replaced", message=notices.replaced(instance.id))
                else:
                    event_record(deployment=deployment, kind="moved", message=notices.moved(instance.id))


def _draining(deployment: Deployment, instance: Instance) -> bool:
    """True while a serving instance of a live deployment still has requests to finish (see module)."""
    if deployment.status not in (Deployment.Status.DEPLOYING, Deployment.Status.RUNNING):
        return False  # failed, suspended (spending limit) or deleted: stop now
    if not instance.ready_at or not instance.container_id:
        return False
    stopping_for = timezone.now() - (instance.stopping_at or timezone.now())
    if stopping_for < timedelta(seconds=DRAIN_MIN_SECONDS):
        return True
    return stopping_for < timedelta(seconds=DRAIN_MAX_SECONDS) and instance_inflight().get(instance.id, 0) > 0


def instance_stop(deployment: Deployment, instance: Instance, observation: Observation) -> None:
    """Remove a stopping instance's container (once drained) and mark it stopped; retried next pass on
    an engine error, or when the pass's `observation` found the host's engine silent. Freed GPUs clear
    the pass's capacity memo."""
    if instance.stopping_at is None:
        claim(instance, Instance.State.STOPPING, stopping_at=timezone.now())
    if _draining(deployment, instance):
        return
    if instance.host_id:
        if instance.host_id in observation.unreachable:
            return  # try again next pass; a lost host takes the instance with it
        try:
            engine.container_remove(instance.host.endpoint, instance.container_name)
        except engine.EngineError as exc:
            log.warning("instance %s: %s", instance.id, exc)
            return  # try again next pass
    now = timezone.now()
    if claim(
        instance, Instance.State.STOPPING, state=Instance.State.STOPPED, stopped_at=now if instance.started_at else None
    ):
        if instance.gpu_indexes:
            observation.gpus_freed()
        event_record(deployment=deployment, kind="stopped", message=f"instance {instance.id} stopped")
