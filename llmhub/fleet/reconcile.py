"""Reconcile: converge each deployment's instances and containers to its desired count.

One pass over a deployment (`deployment_reconcile`) is idempotent and safe to run concurrently:
a PostgreSQL advisory lock lets one worker at a time reconcile a deployment, every state change is
a conditional ``UPDATE … WHERE state = old`` claim, and containers are named ``<prefix>-<instance id>``
so a repeated start adopts the container a killed worker already made.

Instance life cycle: pending → (placed) starting → (engine /health 200) ready → stopping → stopped.
A container that exits on its own is a crash: the instance stops (its billed interval closes when
the container finished) and a replacement is queued after an exponential backoff; after
`INSTANCE_MAX_RESTARTS` crashes the deployment is `failed`, its `fail_reason` the last lines of the
container log. A container stopped from outside (its engine restarted, ``docker stop``: exit code 0,
143, or 137 without the OOM killer) or removed behind LLMHub's back is not the deployment's fault:
the instance is lost and replaced at once, without counting a crash.

`reconcile_all` is the periodic pass: it observes every host once (see `hosts`), reconciles the
deployments that have something to do (all of them with ``full=True``), places pending instances
again when the pass freed GPUs, completes drains and removes orphan containers. Its database
queries do not grow with the number of instances, and a deployment in its steady state costs none.
"""

from __future__ import annotations

import contextlib
import logging
from datetime import datetime, timedelta

from django.conf import settings
from django.db import connection
from django.utils import timezone

from llmhub.deployments.models import Deployment
from llmhub.deployments.services import event_record

from . import engine, notices, vllm
from .containers import container_spec
from .hosts import Observation, drains_complete, hosts_observe, orphans_sweep
from .models import Host, ImagePull, Instance
from .scheduler import instance_place, no_capacity_reason
from .services import image_pull_request

log = logging.getLogger(__name__)

ADVISORY_LOCK_NAMESPACE = 7_001  # pg_try_advisory_lock(namespace, deployment id)
BACKOFF_BASE_SECONDS = 5.0
BACKOFF_MAX_SECONDS = 300.0
LOG_TAIL_LINES = 12
CRASH_COUNT_RESET_SECONDS = 600.0
# Exit codes of a container stopped from outside rather than crashed: 0 (vLLM's graceful shutdown on
# SIGTERM), 143 (128 + SIGTERM), 137 (128 + SIGKILL, e.g. after the engine's stop timeout) unless the
# kernel's OOM killer sent it.
STOPPED_FROM_OUTSIDE_EXIT_CODES = (0, 137, 143)
# Rank when choosing which instances to stop: the least advanced first.
_STOP_RANK = {Instance.State.PENDING: 0, Instance.State.STARTING: 1, Instance.State.READY: 2}


def restart_backoff(restarts: int) -> float:
    """Seconds to wait before restart number `restarts` (1, 2, …): 5 s × 2^(n-1), at most 300 s."""
    return min(BACKOFF_BASE_SECONDS * 2 ** max(restarts - 1, 0), BACKOFF_MAX_SECONDS)


def stopped_from_outside(info: engine.ContainerInfo) -> bool:
    """True when an exited container was stopped by its engine or an operator, not crashed by itself."""
    return info.exit_code in STOPPED_FROM_OUTSIDE_EXIT_CODES and not (info.exit_code == 137 and info.oom_killed)


@contextlib.contextmanager
def _deployment_lock(deployment_id: int):
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_lock(%s, %s)", [ADVISORY_LOCK_NAMESPACE, deployment_id])
        acquired = cursor.fetchone()[0]
    try:
        yield acquired
    finally:
        if acquired:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_unlock(%s, %s)", [ADVISORY_LOCK_NAMESPACE, deployment_id])


def _claim(instance: Instance, old: str, **changes) -> bool:
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


def _scale(deployment: Deployment, live: list[Instance]) -> None:
    """Add pending instances or mark extra ones stopping so that the live count matches the desired count.

    Instances on a draining host do not count: each gets a replacement, and keeps serving until
    enough replacements are ready (make before break); then it stops.
    """
    desired = deployment.desired_instances
    moving = [i for i in live if _on_draining_host(i)]
    active = [i for i in live if i.state != Instance.State.STOPPING and not _on_draining_host(i)]
    for _ in range(desired - len(active)):
        instance = Instance.objects.create(deployment=deployment)
        live.append(instance)
        active.append(instance)
    if len(active) > desired:
        # Stop the least advanced first: pending, then starting, then ready; newest first within a state.
        for instance in sorted(active, key=lambda i: (_STOP_RANK[i.state], -i.id))[: len(active) - desired]:
            _claim(instance, instance.state, state=Instance.State.STOPPING)
    ready = sum(1 for i in active if i.state == Instance.State.READY)
    still_needed = max(desired - ready, 0)
    for instance in sorted(moving, key=lambda i: (_STOP_RANK[i.state], -i.id))[: max(len(moving) - still_needed, 0)]:
        if _claim(instance, instance.state, state=Instance.State.STOPPING):
            event_record(
                deployment=deployment,
                kind="moved",
                message=notices.moved(instance.id),
            )


def _place_and_start(deployment: Deployment, instance: Instance, observation: Observation | None) -> None:
    if instance.next_attempt_at and instance.next_attempt_at > timezone.now():
        return  # backing off after a crash
    gpu_type_id, num_gpus = deployment.gpu_type_id, deployment.num_gpus
    if observation is not None and num_gpus >= observation.capacity_exhausted.get(gpu_type_id, num_gpus + 1):
        return  # this pass already found no room for as many GPUs of this type
    placement = instance_place(instance_id=instance.id, gpu_type=deployment.gpu_type, num_gpus=num_gpus)
    if placement is None:
        if observation is not None:
            observation.capacity_exhausted[gpu_type_id] = min(
                num_gpus, observation.capacity_exhausted.get(gpu_type_id, num_gpus)
            )
        reason = no_capacity_reason(gpu_type=deployment.gpu_type, num_gpus=num_gpus)
        if (
            Instance.objects.filter(id=instance.id, state=Instance.State.PENDING)
            .exclude(last_error=reason)
            .update(last_error=reason)
        ):
            event_record(deployment=deployment, kind="pending", message=f"instance {instance.id} waits: {reason}")
        return
    instance.state, instance.host, instance.gpu_indexes = Instance.State.STARTING, placement.host, placement.gpu_indexes
    event_record(deployment=deployment, kind="scheduled", message=notices.placed(instance.id, num_gpus))
    _start_container(deployment, instance, observation)


def _image_ready(deployment: Deployment, instance: Instance, observation: Observation | None) -> bool:
    """True when the host has the engine image; otherwise make sure a worker pulls it and return False.

    A pull that failed recently fails the instance start (a crash, so a missing image ends in a
    failed deployment that says so).
    """
    host = instance.host
    if engine.image_present(host.endpoint, host.engine_image):
        return True
    pull, started = image_pull_request(host=host, image=host.engine_image)
    if pull.state == ImagePull.State.FAILED:
        detail = f"host {host.name} cannot pull {host.engine_image}: {pull.error}"
        _end(deployment, instance, notices.IMAGE_PULL_FAILED, observation, detail=detail)
    elif started:
        event_record(deployment=deployment, kind="pulling", message=notices.image_pulling())
    return False


def _start_container(deployment: Deployment, instance: Instance, observation: Observation | None) -> None:
    """Create (or adopt) the instance's container and record its id, port and start time.

    A host that lacks the engine image pulls it first, in a worker task (events "pulling"); the
    instance keeps its GPUs meanwhile and is not billed. An engine that does not answer gives the
    GPUs back (the instance is pending again, placed elsewhere).
    """
    host = instance.host
    try:
        if not _image_ready(deployment, instance, observation):
            return
        info = engine.container_run(host.endpoint, container_spec(instance))
    except engine.EngineUnreachable as exc:
        _unplace(deployment, instance, str(exc))
        return
    except engine.EngineError as exc:
        _end(deployment, instance, notices.ENGINE_REFUSED, observation, detail=str(exc))
        return
    now = timezone.now()
    started_at = min(info.started_at or now, now)  # the engine's clock; never in the future
    if not Instance.objects.filter(id=instance.id, state=Instance.State.STARTING, container_id="").update(
        container_id=info.id, port=info.host_port, started_at=started_at
    ):
        return  # stopped or lost meanwhile: the stop or the orphan sweep removes the container
    instance.container_id, instance.port, instance.started_at = info.id, info.host_port, started_at
    event_record(deployment=deployment, kind="starting", message=notices.started(instance.id, deployment.hf_repo))


def _unplace(deployment: Deployment, instance: Instance, reason: str) -> None:
    """The host's engine did not answer at start: give the GPUs back, mark the host silent, place again."""
    host = instance.host
    Host.objects.filter(id=host.id, last_error="").update(last_error=reason)
    if Instance.objects.filter(id=instance.id, state=Instance.State.STARTING, container_id="").update(
        state=Instance.State.PENDING, host=None, gpu_indexes=[], last_error=reason
    ):
        instance.state, instance.host, instance.gpu_indexes = Instance.State.PENDING, None, []
        event_record(deployment=deployment, kind="unplaced", message=notices.unplaced(instance.id))


def _check_running(deployment: Deployment, instance: Instance, observation: Observation | None) -> None:
    """For a starting or ready instance: detect a crash or a loss; promote starting → ready once /health answers."""
    host = instance.host
    if not instance.container_id:
        _start_container(deployment, instance, observation)  # placed, image pulling or worker died before recording
        return
    if observation is not None and host.id in observation.unreachable:
        return  # engine silent: the instance stays as it is until the host is declared lost
    info = observation.container(host.id, instance.container_name) if observation is not None else None
    if info is None or not info.running:
        try:
            info = engine.container_get(host.endpoint, instance.container_name)  # confirm, with exit code and times
        except engine.EngineError as exc:
            log.warning("instance %s: %s", instance.id, exc)
            return
    if info is None:
        _end(deployment, instance, "container disappeared", observation, crashed=False)
        return
    if info.status == "created":
        _start_existing(deployment, instance, observation)
        return
    if info.status in ("exited", "dead"):
        if stopped_from_outside(info):
            reason = (
                f"container stopped from outside (exit code {info.exit_code}: engine restarted or container stopped)"
            )
            _end(deployment, instance, reason, observation, ended_at=info.finished_at, crashed=False)
        else:
            oom = " (killed: out of memory)" if info.oom_killed else ""
            reason = f"container exited with code {info.exit_code}{oom}"
            _end(deployment, instance, reason, observation, ended_at=info.finished_at)
        return
    if not info.running:
        return  # paused or being removed by someone: look again next pass
    if info.host_port and info.host_port != instance.port:
        Instance.objects.filter(id=instance.id).update(port=info.host_port)
        instance.port = info.host_port
    if instance.state == Instance.State.STARTING:
        if vllm.engine_healthy(instance.base_url, key=instance.engine_key):
            if _claim(instance, Instance.State.STARTING, state=Instance.State.READY, ready_at=timezone.now()):
                event_record(deployment=deployment, kind="ready", message=f"instance {instance.id} is serving")
        elif instance.started_at and timezone.now() - instance.started_at > timedelta(
            seconds=settings.INSTANCE_START_TIMEOUT
        ):
            _end(deployment, instance, f"engine not healthy after {settings.INSTANCE_START_TIMEOUT:.0f} s", observation)


def _start_existing(deployment: Deployment, instance: Instance, observation: Observation | None) -> None:
    """A recorded container that was created but never started: start it (same spec, same name)."""
    try:
        info = engine.container_run(instance.host.endpoint, container_spec(instance))
    except engine.EngineError as exc:
        log.warning("instance %s: %s", instance.id, exc)
        return
    Instance.objects.filter(id=instance.id).update(port=info.host_port)
    instance.port = info.host_port


def _end(
    deployment: Deployment,
    instance: Instance,
    reason: str,
    observation: Observation | None,
    *,
    ended_at: datetime | None = None,
    crashed: bool = True,
    detail: str = "",
) -> None:
    """Close an instance whose container is gone or unusable, and replace it.

    `crashed`: the container failed by itself; the instance is stopped and its replacement waits
    an exponential backoff, or the deployment fails after too many crashes (fail_reason = `reason`
    + the container's last log lines). Otherwise the instance is lost and replaced at once, with
    the crash count it had. The billed interval ends at `ended_at` (when the engine says the
    container finished), else now. `reason` is shown to the user (events, fail_reason: see `notices`);
    `detail` (an engine's error: may name hosts and addresses) goes only to the instance's last_error.
    """
    logs = ""
    if instance.host_id:
        with contextlib.suppress(engine.EngineError):
            if crashed:
                logs = engine.container_logs(instance.host.endpoint, instance.container_name, tail=LOG_TAIL_LINES)
            engine.container_remove(instance.host.endpoint, instance.container_name)
    shown = f"{reason}\n{notices.redact(logs, host=instance.host)}".strip()
    detail = f"{reason}: {detail}\n{logs}".strip() if detail else f"{reason}\n{logs}".strip()
    now = timezone.now()
    stopped_at = min(max(ended_at or now, instance.started_at), now) if instance.started_at else None
    state = Instance.State.STOPPED if crashed else Instance.State.LOST
    if not _claim(instance, instance.state, state=state, stopped_at=stopped_at, last_error=detail):
        return
    if observation is not None and instance.gpu_indexes:
        observation.gpus_freed()
    if not crashed:
        Instance.objects.create(deployment=deployment, restarts=instance.restarts)
        event_record(
            deployment=deployment, kind="lost", message=f"instance {instance.id}: {reason}; replaced (not a crash)"
        )
        return
    # A crash after a long healthy run starts a fresh count, as Kubernetes resets its crash backoff.
    healthy_for = (now - instance.ready_at).total_seconds() if instance.ready_at else 0
    restarts = 1 if healthy_for > CRASH_COUNT_RESET_SECONDS else instance.restarts + 1
    if restarts > settings.INSTANCE_MAX_RESTARTS:
        if Deployment.objects.filter(
            id=deployment.id, status__in=[Deployment.Status.DEPLOYING, Deployment.Status.RUNNING]
        ).update(status=Deployment.Status.FAILED, fail_reason=shown, updated_at=now):
            deployment.status, deployment.fail_reason = Deployment.Status.FAILED, shown
        event_record(
            deployment=deployment, kind="failed", message=f"instance {instance.id} crashed {restarts} times: {shown}"
        )
        return
    delay = restart_backoff(restarts)
    Instance.objects.create(deployment=deployment, restarts=restarts, next_attempt_at=now + timedelta(seconds=delay))
    event_record(
        deployment=deployment,
        kind="crashed",
        message=f"instance {instance.id}: {reason}; restart {restarts} of {settings.INSTANCE_MAX_RESTARTS} in {delay:.0f} s",
    )


def _stop(deployment: Deployment, instance: Instance, observation: Observation | None) -> None:
    if instance.host_id:
        if observation is not None and instance.host_id in observation.unreachable:
            return  # try again next pass; a lost host takes the instance with it
        try:
            engine.container_remove(instance.host.endpoint, instance.container_name)
        except engine.EngineError as exc:
            log.warning("instance %s: %s", instance.id, exc)
            return  # try again next pass
    now = timezone.now()
    if _claim(
        instance, Instance.State.STOPPING, state=Instance.State.STOPPED, stopped_at=now if instance.started_at else None
    ):
        if observation is not None and instance.gpu_indexes:
            observation.gpus_freed()
        event_record(deployment=deployment, kind="stopped", message=f"instance {instance.id} stopped")


def _update_status(deployment: Deployment) -> None:
    live = Instance.objects.filter(deployment=deployment, state__in=Instance.LIVE_STATES)
    now = timezone.now()
    if deployment.status == Deployment.Status.DELETING and not live.exists():
        if Deployment.objects.filter(id=deployment.id, status=Deployment.Status.DELETING).update(
            status=Deployment.Status.DELETED, deleted_at=now, updated_at=now
        ):
            event_record(deployment=deployment, kind="deleted", message="all instances stopped; deployment deleted")
    elif deployment.status == Deployment.Status.DEPLOYING and live.filter(state=Instance.State.READY).exists():
        if Deployment.objects.filter(id=deployment.id, status=Deployment.Status.DEPLOYING).update(
            status=Deployment.Status.RUNNING, updated_at=now
        ):
            event_record(deployment=deployment, kind="running", message="deployment is serving")


def deployment_reconcile(*, deployment_id: int, observation: Observation | None = None) -> bool:
    """One reconcile pass over deployment `deployment_id`.

    `observation` is the periodic pass's view of the engines (containers per host, silent hosts);
    without it (a reconcile asked for on a change) each container is inspected on its engine.
    Returns False when another worker holds the deployment's lock (it is being reconciled now),
    True otherwise. Engine failures are recorded on instances and events, never raised.
    Queries: four (lock, deployment, its live instances, unlock), plus the writes of what changed;
    none per unchanged instance.
    """
    with _deployment_lock(deployment_id) as acquired:
        if not acquired:
            return False
        deployment = Deployment.objects.select_related("user", "gpu_type").filter(id=deployment_id).first()
        if deployment is None or deployment.status == Deployment.Status.DELETED:
            return True
        live = list(
            Instance.objects.filter(deployment=deployment, state__in=Instance.LIVE_STATES).select_related(
                "host__gpu_type"
            )
        )
        _scale(deployment, live)
        for instance in live:
            instance.deployment = deployment
            if instance.state == Instance.State.PENDING:
                _place_and_start(deployment, instance, observation)
            elif instance.state in (Instance.State.STARTING, Instance.State.READY):
                _check_running(deployment, instance, observation)
            elif instance.state == Instance.State.STOPPING:
                _stop(deployment, instance, observation)
        if deployment.desired_instances == 0 and any(
            i.state in (Instance.State.PENDING, Instance.State.STARTING, Instance.State.READY) for i in live
        ):
            # Failed while this pass ran: stop what is left now rather than next pass.
            left = [i for i in live if i.state in Instance.LIVE_STATES]
            _scale(deployment, left)
            for instance in left:
                if instance.state == Instance.State.STOPPING:
                    _stop(deployment, instance, observation)
        _update_status(deployment)
        return True


def _needs_work(
    deployment: Deployment, instances: list[Instance], hosts: dict[int, Host], observation: Observation
) -> bool:
    """False only for a deployment in its steady state: settled status, exactly the desired number of
    instances, all ready on a host that is not draining with their container running on the port
    recorded (or on a host that is silent now, where nothing can be done before it is declared lost)."""
    if deployment.status not in (Deployment.Status.RUNNING, Deployment.Status.FAILED, Deployment.Status.SUSPENDED):
        return True
    if len(instances) != deployment.desired_instances:
        return True
    for instance in instances:
        host = hosts.get(instance.host_id)
        if instance.state != Instance.State.READY or host is None or host.state == Host.State.DRAINING:
            return True
        if host.id in observation.unreachable:
            continue
        info = observation.container(host.id, instance.container_name)
        if info is None or not info.running or info.host_port != instance.port:
            return True
    return False


def reconcile_all(*, full: bool = False) -> int:
    """The periodic pass: observe hosts, reconcile deployments, place again where GPUs were freed,
    complete drains, sweep orphan containers.

    With `full`, every deployment that is not deleted is reconciled under its lock, even in its
    steady state (the benchmark's "full pass"). Returns the number of deployments reconciled.
    Queries per pass: a constant number, plus about seven per deployment that needs work.
    """
    hosts = list(Host.objects.select_related("gpu_type"))
    observation = hosts_observe(hosts)
    hosts_by_id = {h.id: h for h in hosts}
    deployments = list(Deployment.objects.exclude(status=Deployment.Status.DELETED).select_related("user"))
    by_deployment: dict[int, list[Instance]] = {d.id: [] for d in deployments}
    for instance in Instance.objects.filter(state__in=Instance.LIVE_STATES).only(
        "id", "deployment_id", "host_id", "state", "port"
    ):
        by_deployment.setdefault(instance.deployment_id, []).append(instance)
    done = 0
    for deployment in deployments:
        if full or _needs_work(deployment, by_deployment[deployment.id], hosts_by_id, observation):
            done += deployment_reconcile(deployment_id=deployment.id, observation=observation)
    if observation.capacity_freed:
        # GPUs freed during the pass: give instances still pending (of deployments seen earlier) their chance now.
        waiting = (
            Instance.objects.filter(state=Instance.State.PENDING)
            .values_list("deployment_id", flat=True)
            .distinct()
            .order_by()
        )
        observation.capacity_exhausted.clear()
        for deployment_id in list(waiting):
            deployment_reconcile(deployment_id=deployment_id, observation=observation)
    drains_complete()
    orphans_sweep(hosts, observation)
    return done


def host_sweep(*, host: Host) -> list[str]:
    """Observe one host and remove its orphan containers (see `hosts.orphans_sweep`); returns their names."""
    return orphans_sweep([host], hosts_observe([host]))
