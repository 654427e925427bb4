"""Reconcile: converge each deployment's instances and containers to its desired count.

One pass over a deployment (`deployment_reconcile`) is idempotent and safe to run concurrently:
a PostgreSQL advisory lock lets one worker at a time reconcile a deployment, every state change is
a conditional ``UPDATE … WHERE state = old`` claim, and containers are named ``llmhub-<instance id>``
so a repeated start adopts the container a crashed worker already made.

Instance life cycle: pending → (placed) starting → (engine /health 200) ready → stopping → stopped.
A container that exits is a crash: the instance stops (its billed interval closes) and a
replacement is queued after an exponential backoff; after `INSTANCE_MAX_RESTARTS` crashes the
deployment is `failed`, its `fail_reason` the last lines of the container log.
"""

from __future__ import annotations

import contextlib
import logging
from datetime import timedelta

from django.conf import settings
from django.db import connection
from django.utils import timezone

from llmhub import crypto
from llmhub.deployments.models import Deployment
from llmhub.deployments.services import event_record

from . import engine, vllm
from .models import Host, Instance
from .scheduler import instance_place

log = logging.getLogger(__name__)

ADVISORY_LOCK_NAMESPACE = 7_001  # pg_try_advisory_lock(namespace, deployment id)
BACKOFF_BASE_SECONDS = 5.0
BACKOFF_MAX_SECONDS = 300.0
LOG_TAIL_LINES = 12
CRASH_COUNT_RESET_SECONDS = 600.0


def restart_backoff(restarts: int) -> float:
    """Seconds to wait before restart number `restarts` (1, 2, …): 5 s × 2^(n-1), at most 300 s."""
    return min(BACKOFF_BASE_SECONDS * 2 ** max(restarts - 1, 0), BACKOFF_MAX_SECONDS)


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


def container_spec(instance: Instance) -> engine.ContainerSpec:
    """The container for `instance` (host and GPU indexes already reserved).

    vLLM OpenAI server arguments: ``--model <hf repo> [--revision r] --served-model-name
    <username/model_name> --max-num-seqs <max batch size> --tensor-parallel-size <num GPUs>``.
    GPU hosts get a device request for exactly the reserved indexes; CPU hosts none.
    """
    deployment = instance.deployment
    host = instance.host
    args = ["--model", deployment.hf_repo]
    if deployment.hf_revision:
        args += ["--revision", deployment.hf_revision]
    args += [
        "--served-model-name", deployment.full_name,
        "--max-num-seqs", str(deployment.max_batch_size),
        "--tensor-parallel-size", str(deployment.num_gpus),
        "--host", "0.0.0.0",
        "--port", str(engine.ENGINE_PORT),
    ]  # fmt: skip
    environment = {}
    hf_token = crypto.decrypt(deployment.hf_token_encrypted)
    if hf_token:
        environment["HF_TOKEN"] = hf_token
    return engine.ContainerSpec(
        name=instance.container_name,
        image=host.engine_image,
        args=args,
        labels={
            engine.LABEL_INSTANCE: str(instance.id),
            engine.LABEL_DEPLOYMENT: deployment.deploy_id,
            engine.LABEL_INSTALLATION: settings.CONTAINER_PREFIX,
        },
        environment=environment,
        device_ids=[str(i) for i in instance.gpu_indexes] if host.gpu_type.uses_devices else None,
        publish_ip=host.address,
    )


def _claim(instance: Instance, old: str, **changes) -> bool:
    """Conditional update: apply `changes` only if the instance is still in state `old`."""
    done = Instance.objects.filter(id=instance.id, state=old).update(**changes)
    if done:
        for key, value in changes.items():
            setattr(instance, key, value)
    return bool(done)


def _scale(deployment: Deployment, live: list[Instance]) -> None:
    """Add pending instances or mark extra ones stopping so that the live count matches the desired count."""
    desired = deployment.desired_instances
    active = [i for i in live if i.state != Instance.State.STOPPING]
    for _ in range(desired - len(active)):
        instance = Instance.objects.create(deployment=deployment)
        live.append(instance)
    if len(active) > desired:
        # Stop the least advanced first: pending, then starting, then ready; newest first within a state.
        rank = {Instance.State.PENDING: 0, Instance.State.STARTING: 1, Instance.State.READY: 2}
        for instance in sorted(active, key=lambda i: (rank[i.state], -i.id))[: len(active) - desired]:
            _claim(instance, instance.state, state=Instance.State.STOPPING)


def _place_and_start(deployment: Deployment, instance: Instance) -> None:
    if instance.next_attempt_at and instance.next_attempt_at > timezone.now():
        return  # backing off after a crash
    placement = instance_place(instance_id=instance.id, gpu_type=deployment.gpu_type, num_gpus=deployment.num_gpus)
    if placement is None:
        reason = f"no host with {deployment.num_gpus} free {deployment.gpu_type.name}"
        if (
            Instance.objects.filter(id=instance.id, state=Instance.State.PENDING)
            .exclude(last_error=reason)
            .update(last_error=reason)
        ):
            event_record(deployment=deployment, kind="pending", message=f"instance {instance.id} waits: {reason}")
        return
    instance.state, instance.host, instance.gpu_indexes = Instance.State.STARTING, placement.host, placement.gpu_indexes
    gpus = ", ".join(map(str, placement.gpu_indexes))
    event_record(
        deployment=deployment,
        kind="scheduled",
        message=f"instance {instance.id} on host {placement.host.name}, GPUs [{gpus}]",
    )
    _start_container(deployment, instance)


def _start_container(deployment: Deployment, instance: Instance) -> None:
    """Create (or adopt) the instance's container and record its id, port and start time.

    A host that lacks the engine image pulls it first (event "pulling").
    """
    host = instance.host
    try:
        if not engine.image_present(host.docker_url, host.engine_image):
            event_record(deployment=deployment, kind="pulling", message=f"host {host.name} pulls {host.engine_image}")
            engine.image_pull(host.docker_url, host.engine_image)
        info = engine.container_run(host.docker_url, container_spec(instance))
    except engine.EngineError as exc:
        _crash(deployment, instance, str(exc))
        return
    Instance.objects.filter(id=instance.id).update(
        container_id=info.id, port=info.host_port, started_at=instance.started_at or timezone.now()
    )
    instance.container_id, instance.port = info.id, info.host_port
    event_record(
        deployment=deployment,
        kind="starting",
        message=f"instance {instance.id}: container {info.name} started, engine loading {deployment.hf_repo}",
    )


def _check_running(deployment: Deployment, instance: Instance) -> None:
    """For a starting or ready instance: detect a crash; promote starting → ready once /health answers."""
    host = instance.host
    if not instance.container_id:
        _start_container(deployment, instance)  # a worker died between placement and container start
        return
    try:
        info = engine.container_get(host.docker_url, instance.container_name)
    except engine.EngineError as exc:
        log.warning("instance %s: %s", instance.id, exc)
        return  # engine unreachable: leave the instance as it is until the host is declared lost
    if info is None or not info.running:
        reason = "container disappeared" if info is None else f"container exited with code {info.exit_code}"
        _crash(deployment, instance, reason)
        return
    if instance.state == Instance.State.STARTING:
        if vllm.engine_healthy(instance.base_url):
            if _claim(instance, Instance.State.STARTING, state=Instance.State.READY, ready_at=timezone.now()):
                event_record(deployment=deployment, kind="ready", message=f"instance {instance.id} is serving")
        elif instance.started_at and timezone.now() - instance.started_at > timedelta(
            seconds=settings.INSTANCE_START_TIMEOUT
        ):
            _crash(deployment, instance, f"engine not healthy after {settings.INSTANCE_START_TIMEOUT:.0f} s")


def _crash(deployment: Deployment, instance: Instance, reason: str) -> None:
    """Close a crashed instance and queue its replacement with backoff, or fail the deployment."""
    logs = ""
    if instance.host_id:
        with contextlib.suppress(engine.EngineError):
            logs = engine.container_logs(instance.host.docker_url, instance.container_name, tail=LOG_TAIL_LINES)
            engine.container_remove(instance.host.docker_url, instance.container_name)
    detail = f"{reason}\n{logs}".strip()
    now = timezone.now()
    if not _claim(
        instance, instance.state, state=Instance.State.STOPPED, stopped_at=now if instance.started_at else None,
        last_error=detail,
    ):  # fmt: skip
        return
    # A crash after a long healthy run starts a fresh count, as Kubernetes resets its crash backoff.
    healthy_for = (now - instance.ready_at).total_seconds() if instance.ready_at else 0
    restarts = 1 if healthy_for > CRASH_COUNT_RESET_SECONDS else instance.restarts + 1
    if restarts > settings.INSTANCE_MAX_RESTARTS:
        Deployment.objects.filter(
            id=deployment.id, status__in=[Deployment.Status.DEPLOYING, Deployment.Status.RUNNING]
        ).update(status=Deployment.Status.FAILED, fail_reason=detail, updated_at=now)
        event_record(
            deployment=deployment, kind="failed", message=f"instance {instance.id} crashed {restarts} times: {detail}"
        )
        return
    delay = restart_backoff(restarts)
    Instance.objects.create(deployment=deployment, restarts=restarts, next_attempt_at=now + timedelta(seconds=delay))
    event_record(
        deployment=deployment,
        kind="crashed",
        message=f"instance {instance.id}: {reason}; restart {restarts} of {settings.INSTANCE_MAX_RESTARTS} in {delay:.0f} s",
    )


def _stop(deployment: Deployment, instance: Instance) -> None:
    if instance.host_id:
        try:
            engine.container_remove(instance.host.docker_url, instance.container_name)
        except engine.EngineError as exc:
            log.warning("instance %s: %s", instance.id, exc)
            return  # try again next pass
    now = timezone.now()
    if _claim(
        instance, Instance.State.STOPPING, state=Instance.State.STOPPED, stopped_at=now if instance.started_at else None
    ):
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


def deployment_reconcile(*, deployment_id: int) -> bool:
    """One reconcile pass over deployment `deployment_id`.

    Returns False when another worker holds the deployment's lock (it is being reconciled now),
    True otherwise. Engine failures are recorded on instances and events, never raised.
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
                _place_and_start(deployment, instance)
            elif instance.state in (Instance.State.STARTING, Instance.State.READY):
                _check_running(deployment, instance)
            elif instance.state == Instance.State.STOPPING:
                _stop(deployment, instance)
        deployment.refresh_from_db(fields=["status"])
        if deployment.desired_instances == 0 and any(
            i.state in (Instance.State.PENDING, Instance.State.STARTING, Instance.State.READY) for i in live
        ):
            # Failed while this pass ran: stop what is left now rather than next pass.
            _scale(deployment, [i for i in live if i.state in Instance.LIVE_STATES])
        _update_status(deployment)
        return True


def host_sweep(*, host: Host) -> list[str]:
    """Remove this installation's containers on `host` that have no live instance row (orphans).

    Returns the names of the containers removed. Raises nothing: an unreachable engine sweeps nothing.
    """
    try:
        containers = engine.containers_list(host.docker_url, installation=settings.CONTAINER_PREFIX)
    except engine.EngineError:
        return []
    ids = {
        int(c.labels[engine.LABEL_INSTANCE]) for c in containers if c.labels.get(engine.LABEL_INSTANCE, "").isdigit()
    }
    live = set(Instance.objects.filter(id__in=ids, state__in=Instance.LIVE_STATES).values_list("id", flat=True))
    removed = []
    for c in containers:
        label = c.labels.get(engine.LABEL_INSTANCE, "")
        if not label.isdigit() or int(label) not in live:
            with contextlib.suppress(engine.EngineError):
                engine.container_remove(host.docker_url, c.name)
                removed.append(c.name)
    Host.objects.filter(id=host.id).update(heartbeat_at=timezone.now())
    return removed


def reconcile_all() -> int:
    """Reconcile every deployment that is not deleted, then sweep orphan containers on every host.

    Returns the number of deployments reconciled by this call.
    """
    done = 0
    ids = Deployment.objects.exclude(status=Deployment.Status.DELETED).values_list("id", flat=True)
    for deployment_id in list(ids):
        done += deployment_reconcile(deployment_id=deployment_id)
    for host in Host.objects.exclude(state=Host.State.UNREACHABLE):
        host_sweep(host=host)
    return done
