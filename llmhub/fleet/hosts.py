"""Host health, once per reconcile pass: what each engine reports, heartbeats, lost hosts, orphans.

`hosts_observe` lists this installation's containers on every host (one engine call per host, in
parallel), removes the old ones no live instance accounts for (`orphans_sweep`), records a heartbeat
for each engine that answered and turns an engine that has not
answered for longer than `settings.HOST_UNREACHABLE_GRACE` seconds into an unreachable host: its
instances are marked lost, their billed interval closed at the host's last heartbeat, and the
reconcile pass replaces them elsewhere. A host that answers again returns to the state it had
once its old containers are confirmed gone: until then (and while any old container of a host
cannot be removed) its `last_error` says so and no GPU of it is handed out (the scheduler skips
hosts with an error), so two containers never share a GPU.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

from django.conf import settings
from django.db import transaction
from django.db.models import Exists, F, OuterRef
from django.utils import timezone

from llmhub.deployments.timeline import event_record

from . import engine, notices
from .models import Host, Instance

log = logging.getLogger(__name__)

OBSERVE_THREADS = 16  # engines listed at once


@dataclass
class Observation:
    """What the engines reported at the start of one reconcile pass.

    `containers`: {host id: {container name: info}} for hosts whose engine answered; `unreachable`:
    ids of hosts whose engine did not. `capacity_exhausted`: {GPU type id: the smallest GPU count no
    host could place in this pass} (`room_known_lacking`: placements that need as many or more are not
    tried again until `gpus_freed`); a pass-local memo, not a source of truth. An empty observation
    (nothing listed) knows no container and no silent host.
    """

    containers: dict[int, dict[str, engine.ContainerInfo]] = field(default_factory=dict)
    unreachable: set[int] = field(default_factory=set)
    capacity_exhausted: dict[int, int] = field(default_factory=dict)

    def container(self, host_id: int, name: str) -> engine.ContainerInfo | None:
        """The container `name` as host `host_id`'s engine listed it; None when it was not listed there."""
        return self.containers.get(host_id, {}).get(name)

    def room_known_lacking(self, gpu_type_id: int, num_gpus: int) -> bool:
        """True when this pass already failed to place as many or fewer GPUs of this type."""
        return num_gpus >= self.capacity_exhausted.get(gpu_type_id, num_gpus + 1)

    def no_room(self, gpu_type_id: int, num_gpus: int) -> None:
        """Remember that no host could place `num_gpus` GPUs of this type in this pass."""
        self.capacity_exhausted[gpu_type_id] = min(num_gpus, self.capacity_exhausted.get(gpu_type_id, num_gpus))

    def gpus_freed(self) -> None:
        """An instance gave its GPUs back during the pass: every placement may be tried again."""
        self.capacity_exhausted.clear()


def _list(host: Host) -> list[engine.ContainerInfo] | Exception:
    try:
        return engine.containers_list(host.endpoint, installation=settings.CONTAINER_PREFIX)
    except engine.EngineError as exc:
        return exc
    except ValueError as exc:  # TLS key that the encryption key cannot decrypt
        return exc


def hosts_observe(hosts: list[Host], *, now: datetime | None = None) -> Observation:
    """List containers on every host in `hosts`, remove old ones (`orphans_sweep`), record heartbeats,
    declare long-silent hosts lost. A host whose old containers are not all confirmed removed gets
    its heartbeat with `last_error` saying so (no placement there), and an unreachable one stays so.

    Queries: one for the sweep, two for the heartbeats, plus a few per host whose reachability or
    sweep changed (rare).
    Returns the Observation the reconcile pass works from. Raises nothing for engine failures.
    """
    now = now or timezone.now()
    observation = Observation()
    if not hosts:
        return observation
    with ThreadPoolExecutor(max_workers=min(OBSERVE_THREADS, len(hosts))) as pool:
        results = list(pool.map(_list, hosts))
    answered = []
    for host, result in zip(hosts, results):
        if isinstance(result, Exception):
            observation.unreachable.add(host.id)
            _silent(host, str(result), now=now)
        else:
            observation.containers[host.id] = {c.name: c for c in result}
            answered.append(host)
    _, dirty = _sweep(answered, observation)
    clean = [h for h in answered if h.id not in dirty]
    if clean:
        _heartbeats([h.id for h in clean], now=now)
    for host in answered:
        host.heartbeat_at = now
        if host.id in dirty:
            Host.objects.filter(id=host.id).update(heartbeat_at=now, last_error=dirty[host.id])
            host.last_error = dirty[host.id]
        elif host.state == Host.State.UNREACHABLE:
            host_returned(host)
    return observation


def _heartbeats(host_ids: list[int], *, now: datetime) -> None:
    """Record that these hosts' engines answered (and clear their last error), in one update.

    Rows are locked in id order and rows locked by someone else are skipped (their heartbeat waits
    for the next pass), so concurrent passes and operators' changes never wait on or deadlock with it.
    """
    with transaction.atomic():
        free = Host.objects.select_for_update(skip_locked=True).filter(id__in=host_ids).order_by("id")
        Host.objects.filter(id__in=list(free.values_list("id", flat=True))).update(heartbeat_at=now, last_error="")


def _silent(host: Host, error: str, *, now: datetime) -> None:
    """An engine did not answer: note the error; past the grace period, the host is lost."""
    if host.last_error != error:
        Host.objects.filter(id=host.id).update(last_error=error)
        host.last_error = error
    if host.state == Host.State.UNREACHABLE:
        return
    last_seen = host.heartbeat_at or host.created_at
    if (now - last_seen).total_seconds() > settings.HOST_UNREACHABLE_GRACE:
        host_lost(host, reason=error)


def host_lost(host: Host, *, reason: str) -> int:
    """Mark `host` unreachable and its live instances lost; returns how many instances were lost.

    Each lost instance's billed interval closes at the host's last heartbeat (not before its own
    start); its deployment gets a "lost" event, and the next reconcile of that deployment schedules
    a replacement on another host. A host already unreachable is left alone (returns 0).
    """
    if (
        not Host.objects.filter(id=host.id)
        .exclude(state=Host.State.UNREACHABLE)
        .update(
            state=Host.State.UNREACHABLE,
            resume_state=F("state"),  # SET sees the old row: the state it had
        )
    ):
        return 0
    host.resume_state, host.state = host.state, Host.State.UNREACHABLE
    last_seen = host.heartbeat_at or host.created_at
    log.warning("host %s unreachable since %s: %s", host.name, last_seen.isoformat(), reason)
    lost = 0
    for instance in Instance.objects.filter(host=host, state__in=Instance.LIVE_STATES).select_related(
        "deployment__user"
    ):
        stopped_at = max(last_seen, instance.started_at) if instance.started_at else None
        if Instance.objects.filter(id=instance.id, state=instance.state).update(
            state=Instance.State.LOST,
            stopped_at=stopped_at,
            last_error=f"host {host.name} unreachable since {last_seen:%Y-%m-%d %H:%M:%S} UTC: {reason}",
        ):
            lost += 1
            event_record(
                deployment=instance.deployment,
                kind="lost",
                message=notices.host_lost(instance.id, last_seen),
            )
    return lost


def host_returned(host: Host) -> bool:
    """An unreachable host answers again: back to the state it had (ready, cordoned or draining)."""
    resume = host.resume_state or Host.State.READY
    if Host.objects.filter(id=host.id, state=Host.State.UNREACHABLE).update(state=resume, resume_state=""):
        log.warning("host %s answers again: %s", host.name, resume)
        host.state, host.resume_state = resume, ""
        return True
    return False


def drains_complete() -> int:
    """Cordon every draining host that has no live instance left (one query). Returns how many."""
    live = Instance.objects.filter(host=OuterRef("pk"), state__in=Instance.LIVE_STATES)
    return Host.objects.filter(state=Host.State.DRAINING).exclude(Exists(live)).update(state=Host.State.CORDONED)


def orphans_sweep(hosts: list[Host], observation: Observation) -> list[str]:
    """Remove this installation's containers that no live instance placed on their host accounts for.

    Works from the observation (containers listed before the instances are read, so a container
    made meanwhile is never mistaken for an orphan): one query for all hosts. A container whose
    label is not an instance id is removed too. Returns the names removed.
    """
    return _sweep(hosts, observation)[0]


def _sweep(hosts: list[Host], observation: Observation) -> tuple[list[str], dict[int, str]]:
    """`orphans_sweep`, also returning {host id: error} for hosts with an old container not removed."""
    labelled: dict[int, list[tuple[int | None, engine.ContainerInfo]]] = {}
    ids: set[int] = set()
    for host in hosts:
        for info in observation.containers.get(host.id, {}).values():
            label = info.labels.get(engine.LABEL_INSTANCE, "")
            instance_id = int(label) if label.isdigit() else None
            labelled.setdefault(host.id, []).append((instance_id, info))
            if instance_id is not None:
                ids.add(instance_id)
    if not labelled:
        return [], {}
    placed = set(Instance.objects.filter(id__in=ids, state__in=Instance.LIVE_STATES).values_list("id", "host_id"))
    removed, dirty = [], {}
    for host in hosts:
        for instance_id, info in labelled.get(host.id, []):
            if (instance_id, host.id) in placed:
                continue
            try:
                if engine.container_remove(host.endpoint, info.name):  # False: someone removed it meanwhile
                    removed.append(info.name)
                    log.info("host %s: removed orphan container %s", host.name, info.name)
                observation.containers.get(host.id, {}).pop(info.name, None)
            except engine.EngineError as exc:
                dirty[host.id] = f"old container {info.name} not removed yet: {exc}"
    return removed, dirty
