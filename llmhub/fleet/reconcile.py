"""Reconcile: converge each deployment's instances and containers to its desired count.

One pass over a deployment (`deployment_reconcile`) is idempotent and safe to run concurrently:
a PostgreSQL advisory lock lets one worker at a time reconcile a deployment, every state change is
a conditional ``UPDATE … WHERE state = old`` claim, and containers are named ``<prefix>-<instance id>``
so a repeated start adopts the container a killed worker already made.

Instance life cycle: pending → (placed) starting → (engine /health 200) ready → stopping → stopped.
A container that exits without LLMHub asking is a crash, whatever its exit code; a container gone
behind LLMHub's back or stopped by its engine's restart is lost (see `crashes`). A ready instance
that must stop (scale-down, drain) first drains its in-flight requests.

`reconcile_all` is the periodic pass: it observes every host once (see `hosts`), reconciles the
deployments that have something to do (all of them with ``full=True``), places pending instances
again when the pass freed GPUs, completes drains and removes orphan containers. Its database
queries do not grow with the number of instances, and a deployment in its steady state costs none.

What a pass knows of the engines is decided once, when it is made: a `ReconcilePass` works from the
periodic pass's `Observation`; `deployment_reconcile` (on a change) makes a `ChangePass`, which lists
no engine and inspects each container on its own engine.
"""

from __future__ import annotations

import contextlib
import logging
from datetime import timedelta

from django.conf import settings
from django.db import connection
from django.utils import timezone

from llmhub.deployments.models import Deployment
from llmhub.deployments.timeline import event_record

from . import engine, notices, vllm
from .containers import container_spec
from .crashes import engine_restarted, exit_reason, instance_end, last_crash_host_id
from .hosts import Observation, drains_complete, hosts_observe, orphans_sweep
from .models import Host, ImagePull, Instance
from .scaling import claim, instance_stop, instances_scale
from .scheduler import capacity_problem, instance_place, placement_queue
from .services import image_pull_request

log = logging.getLogger(__name__)

ADVISORY_LOCK_NAMESPACE = 7_001  # pg_try_advisory_lock(namespace, deployment id)


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


class ReconcilePass:
    """One periodic reconcile pass, working from its observation of every host (`hosts.hosts_observe`):
    a container the observation lists running is trusted, one it does not list (or lists stopped) is
    inspected on its engine, and the instances of a host whose engine was silent are left as they are
    until the host is declared lost. Pending instances are placed in fair order (`place_one`, called in
    `scheduler.placement_queue` order); a GPU count this pass found no room for is not tried again until
    an instance frees GPUs (the observation's capacity memo).

    A pass asked for when one deployment changed is a `ChangePass`: it lists no engine.
    Engine failures are recorded on instances and events, never raised.
    """

    def __init__(self, observation: Observation):
        self.observation = observation

    def deployment(self, deployment_id: int, *, place: bool) -> bool:
        """Reconcile deployment `deployment_id` under its advisory lock; `place`: place its pending
        instances now (the periodic pass places every deployment's afterwards, in fair order).

        Returns False when another worker holds the lock (it is being reconciled now), True otherwise.
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
            instances_scale(deployment, live)
            for instance in live:
                instance.deployment = deployment
                if instance.state == Instance.State.PENDING:
                    if place:
                        self._place_and_start(deployment, instance)
                elif instance.state in (Instance.State.STARTING, Instance.State.READY):
                    self._check_running(deployment, instance)
                elif instance.state == Instance.State.STOPPING:
                    instance_stop(deployment, instance, self.observation)
            if deployment.desired_instances == 0 and any(
                i.state in (Instance.State.PENDING, Instance.State.STARTING, Instance.State.READY) for i in live
            ):
                # Failed while this pass ran: stop what is left now rather than next pass.
                left = [i for i in live if i.state in Instance.LIVE_STATES]
                instances_scale(deployment, left)
                for instance in left:
                    if instance.state == Instance.State.STOPPING:
                        instance_stop(deployment, instance, self.observation)
            if not any(i.state == Instance.State.PENDING for i in live):
                _capacity_reason(deployment, "")  # nothing waits for GPUs (any more)
            _update_status(deployment)
            return True

    def place_one(self, deployment_id: int, instance_id: int) -> None:
        """Place one pending instance under its deployment's lock (skipped when another worker holds it)."""
        with _deployment_lock(deployment_id) as acquired:
            if not acquired:
                return
            deployment = Deployment.objects.select_related("user", "gpu_type").filter(id=deployment_id).first()
            instance = Instance.objects.filter(id=instance_id, state=Instance.State.PENDING).first()
            if deployment is None or instance is None or deployment.desired_instances == 0:
                return
            instance.deployment = deployment
            self._place_and_start(deployment, instance)

    def needs_work(self, deployment: Deployment, instances: list[Instance], hosts: dict[int, Host]) -> bool:
        """False only for a deployment in its steady state: settled status, exactly the desired number of
        instances, all ready on a host that is not draining with their container running on the port
        recorded (or on a host that is silent now, where nothing can be done before it is declared lost)."""
        if deployment.status not in (
            Deployment.Status.RUNNING,
            Deployment.Status.FAILED,
            Deployment.Status.SUSPENDED,
        ):
            return True
        if len(instances) != deployment.desired_instances:
            return True
        for instance in instances:
            host = hosts.get(instance.host_id)
            if instance.state != Instance.State.READY or host is None or host.state == Host.State.DRAINING:
                return True
            if host.id in self.observation.unreachable:
                continue
            info = self.observation.container(host.id, instance.container_name)
            if info is None or not info.running or info.host_port != instance.port:
                return True
        return False

    def _waits_in_queue(self, deployment: Deployment, instance: Instance) -> bool:
        """True when `instance` must leave its placement to a pass in fair order; this pass is one."""
        return False

    def _place_and_start(self, deployment: Deployment, instance: Instance) -> None:
        if instance.next_attempt_at and instance.next_attempt_at > timezone.now():
            return  # backing off after a crash
        gpu_type_id, num_gpus = deployment.gpu_type_id, deployment.num_gpus
        if self.observation.room_known_lacking(gpu_type_id, num_gpus):
            return  # this pass already found no room for as many GPUs of this type
        if self._waits_in_queue(deployment, instance):
            return  # another deployment waits longer or needs it more
        avoid = None
        if instance.restarts:  # a crash replacement: elsewhere than the last crash when another host fits
            avoid = last_crash_host_id(deployment, now=timezone.now())
        placement = instance_place(
            instance_id=instance.id, gpu_type=deployment.gpu_type, num_gpus=num_gpus, avoid_host_id=avoid
        )
        if placement is None:
            self._no_room(gpu_type_id, num_gpus)
            reason, lasting = capacity_problem(gpu_type=deployment.gpu_type, num_gpus=num_gpus)
            if (
                Instance.objects.filter(id=instance.id, state=Instance.State.PENDING)
                .exclude(last_error=reason)
                .update(last_error=reason)
            ):
                event_record(deployment=deployment, kind="pending", message=f"instance {instance.id} waits: {reason}")
            _capacity_reason(deployment, reason if lasting else "")
            return
        _capacity_reason(deployment, "")
        instance.state, instance.host, instance.gpu_indexes = (
            Instance.State.STARTING,
            placement.host,
            placement.gpu_indexes,
        )
        event_record(deployment=deployment, kind="scheduled", message=notices.placed(instance.id, num_gpus))
        self._start_container(deployment, instance)

    def _no_room(self, gpu_type_id: int, num_gpus: int) -> None:
        self.observation.no_room(gpu_type_id, num_gpus)

    def _image_ready(self, deployment: Deployment, instance: Instance) -> bool:
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
            instance_end(deployment, instance, notices.IMAGE_PULL_FAILED, self.observation, detail=detail)
        elif started:
            event_record(deployment=deployment, kind="pulling", message=notices.image_pulling())
        return False

    def _start_container(self, deployment: Deployment, instance: Instance) -> None:
        """Create (or adopt) the instance's container and record its id, port and start time.

        A host that lacks the engine image pulls it first, in a worker task (events "pulling"); the
        instance keeps its GPUs meanwhile and is not billed. An engine that does not answer gives the
        GPUs back (the instance is pending again, placed elsewhere).
        """
        host = instance.host
        try:
            if not self._image_ready(deployment, instance):
                return
            info = engine.container_run(host.endpoint, container_spec(instance))
        except engine.EngineUnreachable as exc:
            _unplace(deployment, instance, str(exc))
            return
        except engine.EngineError as exc:
            instance_end(deployment, instance, notices.ENGINE_REFUSED, self.observation, detail=str(exc))
            return
        now = timezone.now()
        started_at = min(info.started_at or now, now)  # the engine's clock; never in the future
        if not Instance.objects.filter(id=instance.id, state=Instance.State.STARTING, container_id="").update(
            container_id=info.id, port=info.host_port, started_at=started_at
        ):
            return  # stopped or lost meanwhile: the stop or the orphan sweep removes the container
        instance.container_id, instance.port, instance.started_at = info.id, info.host_port, started_at
        event_record(deployment=deployment, kind="starting", message=notices.started(instance.id, deployment.hf_repo))

    def _check_running(self, deployment: Deployment, instance: Instance) -> None:
        """For a starting or ready instance: detect a crash or a loss; promote starting → ready once /health
        answers."""
        host = instance.host
        if not instance.container_id:
            self._start_container(deployment, instance)  # placed, image pulling or worker died before recording
            return
        if host.id in self.observation.unreachable:
            return  # engine silent: the instance stays as it is until the host is declared lost
        info = self.observation.container(host.id, instance.container_name)
        if info is None or not info.running:
            try:
                info = engine.container_get(host.endpoint, instance.container_name)  # with exit code and times
            except engine.EngineError as exc:
                log.warning("instance %s: %s", instance.id, exc)
                return
        if info is None:
            instance_end(deployment, instance, "container disappeared", self.observation, crashed=False)
            return
        if info.status == "created":
            _start_existing(instance)
            return
        if info.status in ("exited", "dead"):
            if engine_restarted(host, info):
                reason = f"container stopped from outside: its engine restarted (exit code {info.exit_code})"
                instance_end(deployment, instance, reason, self.observation, ended_at=info.finished_at, crashed=False)
            else:
                instance_end(deployment, instance, exit_reason(info), self.observation, ended_at=info.finished_at)
            return
        if not info.running:
            return  # paused or being removed by someone: look again next pass
        if info.host_port and info.host_port != instance.port:
            Instance.objects.filter(id=instance.id).update(port=info.host_port)
            instance.port = info.host_port
        if instance.state == Instance.State.STARTING:
            if vllm.engine_healthy(instance.base_url, key=instance.engine_key):
                if claim(instance, Instance.State.STARTING, state=Instance.State.READY, ready_at=timezone.now()):
                    event_record(deployment=deployment, kind="ready", message=f"instance {instance.id} is serving")
            elif instance.started_at and timezone.now() - instance.started_at > timedelta(
                seconds=settings.INSTANCE_START_TIMEOUT
            ):
                reason = f"engine not healthy after {settings.INSTANCE_START_TIMEOUT:.0f} s"
                instance_end(deployment, instance, reason, self.observation)


class ChangePass(ReconcilePass):
    """A pass asked for when one deployment changed (created, scaled, deleted, an engine event): no
    engine is listed, so every container is inspected on its engine, no host is known silent, and each
    pending instance is tried (no capacity memo). A pending instance waits when another deployment's
    comes first in the fair placement order (`scheduler.placement_queue`): the periodic pass places in
    that order."""

    def __init__(self):
        super().__init__(Observation())

    def _waits_in_queue(self, deployment: Deployment, instance: Instance) -> bool:
        return _queue_ahead(deployment, instance)

    def _no_room(self, gpu_type_id: int, num_gpus: int) -> None:
        pass  # one deployment's pass: each of its pending instances is tried and says why it waits


def _queue_ahead(deployment: Deployment, instance: Instance) -> bool:
    """True when a pending instance of another deployment of the same GPU type comes before `instance`
    in the fair placement order (see `scheduler.placement_queue`)."""
    for instance_id, deployment_id in placement_queue(now=timezone.now(), gpu_type_id=deployment.gpu_type_id):
        if instance_id == instance.id:
            return False
        if deployment_id != deployment.id:
            return True
    return False


def _capacity_reason(deployment: Deployment, reason: str) -> None:
    """Show (or clear, with "") why a live deployment's instances cannot be placed in its `fail_reason`,
    without host names: e.g. "no H100-80GB host has 16 GPUs (the largest has 8)". Failed and suspended
    deployments keep their reason."""
    if deployment.fail_reason == reason or deployment.status not in (
        Deployment.Status.DEPLOYING,
        Deployment.Status.RUNNING,
    ):
        return
    if Deployment.objects.filter(
        id=deployment.id,
        status__in=[Deployment.Status.DEPLOYING, Deployment.Status.RUNNING],
        fail_reason=deployment.fail_reason,
    ).update(fail_reason=reason):
        deployment.fail_reason = reason


def _unplace(deployment: Deployment, instance: Instance, reason: str) -> None:
    """The host's engine did not answer at start: give the GPUs back, mark the host silent, place again."""
    host = instance.host
    Host.objects.filter(id=host.id, last_error="").update(last_error=reason)
    if Instance.objects.filter(id=instance.id, state=Instance.State.STARTING, container_id="").update(
        state=Instance.State.PENDING, host=None, gpu_indexes=[], last_error=reason
    ):
        instance.state, instance.host, instance.gpu_indexes = Instance.State.PENDING, None, []
        event_record(deployment=deployment, kind="unplaced", message=notices.unplaced(instance.id))


def _start_existing(instance: Instance) -> None:
    """A recorded container that was created but never started: start it (same spec, same name)."""
    try:
        info = engine.container_run(instance.host.endpoint, container_spec(instance))
    except engine.EngineError as exc:
        log.warning("instance %s: %s", instance.id, exc)
        return
    Instance.objects.filter(id=instance.id).update(port=info.host_port)
    instance.port = info.host_port


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
    """Reconcile deployment `deployment_id` now, because it changed (a `ChangePass`: its containers are
    inspected on their engines, its pending instances placed unless another deployment comes first in
    the fair order). Returns False when another worker holds the deployment's lock (it is being
    reconciled now), True otherwise. Engine failures are recorded on instances and events, never raised.
    """
    return ChangePass().deployment(deployment_id, place=True)


def reconcile_all(*, full: bool = False) -> int:
    """The periodic pass: observe hosts (and sweep their orphan containers), reconcile deployments,
    place every pending instance in fair order (`scheduler.placement_queue`), complete drains.

    With `full`, every deployment that is not deleted is reconciled under its lock, even in its
    steady state (the benchmark's "full pass"). Returns the number of deployments reconciled.
    Queries per pass: a constant number, plus about seven per deployment that needs work and four per
    pending instance tried.
    """
    hosts = list(Host.objects.select_related("gpu_type"))
    one_pass = ReconcilePass(hosts_observe(hosts))
    hosts_by_id = {h.id: h for h in hosts}
    deployments = list(Deployment.objects.exclude(status=Deployment.Status.DELETED).select_related("user"))
    by_deployment: dict[int, list[Instance]] = {d.id: [] for d in deployments}
    for instance in Instance.objects.filter(state__in=Instance.LIVE_STATES).only(
        "id", "deployment_id", "host_id", "state", "port"
    ):
        by_deployment.setdefault(instance.deployment_id, []).append(instance)
    done = 0
    for deployment in deployments:
        if full or one_pass.needs_work(deployment, by_deployment[deployment.id], hosts_by_id):
            done += one_pass.deployment(deployment.id, place=False)
    for instance_id, deployment_id in placement_queue(now=timezone.now()):
        one_pass.place_one(deployment_id, instance_id)
    drains_complete()
    return done


def host_sweep(*, host: Host) -> list[str]:
    """Observe one host and remove its orphan containers (see `hosts.orphans_sweep`); returns their names."""
    observation = Observation(containers={host.id: {}})
    try:
        observation.containers[host.id] = {
            c.name: c for c in engine.containers_list(host.endpoint, installation=settings.CONTAINER_PREFIX)
        }
    except engine.EngineError:
        return []
    return orphans_sweep([host], observation)
