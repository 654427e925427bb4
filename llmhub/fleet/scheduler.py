"""Placement: which host and which GPU indexes an instance gets.

Bin-packing, best fit: among ready hosts of the requested GPU type with enough free GPUs, pick the
one with the fewest free GPUs (fill partly used hosts first, keep whole hosts free for large
deployments; ties go to the lowest host id); reserve its lowest free indexes. A host whose engine
failed its last call (`last_error` set, cleared by the next heartbeat) takes no new instances.

Placements of one GPU type are serialised by a transaction-level PostgreSQL advisory lock on that
type (``pg_advisory_xact_lock(7002, gpu type id)``), held from reading the reservations to writing
the new one, so concurrent reconciles never give one GPU to two instances: a second placement waits
for the first to commit, then sees its reservation. Host rows themselves are not locked, so
heartbeats, cordons and drains never wait for (or deadlock with) a placement.

Cost per placement: four queries (the type's lock, its ready hosts, GPUs used per host as one
aggregate, indexes used on the chosen host) plus the claim, whatever the number of instances.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.db import connection, transaction
from django.db.models import Count, Func, IntegerField, Max, OuterRef, Q, Subquery, Sum
from django.db.models.functions import Coalesce

from .models import GpuType, Host, Instance

PLACEMENT_LOCK_NAMESPACE = 7_002  # pg_advisory_xact_lock(namespace, GPU type id)


@dataclass(frozen=True)
class Placement:
    host: Host
    gpu_indexes: list[int]


class Cardinality(Func):
    """PostgreSQL ``cardinality(array)``: the number of elements (0 for an empty array)."""

    function = "cardinality"
    output_field = IntegerField()


def free_gpu_indexes(host: Host, used: set[int]) -> list[int]:
    """Indexes 0..gpu_count-1 of `host` not in `used`, ascending."""
    return [i for i in range(host.gpu_count) if i not in used]


def used_gpu_indexes(host_ids: list[int]) -> dict[int, set[int]]:
    """{host id: GPU indexes held by live instances on it}, in one query."""
    used: dict[int, set[int]] = {hid: set() for hid in host_ids}
    rows = Instance.objects.filter(host_id__in=host_ids, state__in=Instance.LIVE_STATES).values_list(
        "host_id", "gpu_indexes"
    )
    for host_id, indexes in rows:
        used[host_id].update(indexes)
    return used


def used_gpu_counts(host_ids: list[int]) -> dict[int, int]:
    """{host id: number of GPUs held by live instances on it}, one aggregate query (one row per host)."""
    counts = {hid: 0 for hid in host_ids}
    rows = (
        Instance.objects.filter(host_id__in=host_ids, state__in=Instance.LIVE_STATES)
        .values("host_id")
        .annotate(n=Sum(Cardinality("gpu_indexes")))
        .values_list("host_id", "n")
    )
    for host_id, n in rows:
        counts[host_id] = n or 0
    return counts


def placement_queue(*, now, gpu_type_id: int | None = None) -> list[tuple[int, int]]:
    """Pending instances of live deployments that may be placed now (not backing off after a crash),
    fairest first, as [(instance id, deployment id)]: instances of deployments below their min or with
    nothing serving before other deployments' extra instances, then the longest waiting (oldest
    instance) first. `gpu_type_id` limits it to one GPU type. One query.

    Placement tries them in this order and places each one that fits (a large instance that does not
    fit yet does not keep GPUs idle that a smaller one behind it can use).
    """
    ready = (
        Instance.objects.filter(deployment_id=OuterRef("deployment_id"), state=Instance.State.READY)
        .values("deployment_id")
        .annotate(n=Count("id"))
        .values("n")
    )
    rows = Instance.objects.filter(
        state=Instance.State.PENDING, deployment__status__in=["deploying", "running"]
    ).filter(Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=now))
    if gpu_type_id is not None:
        rows = rows.filter(deployment__gpu_type_id=gpu_type_id)
    rows = rows.annotate(serving=Coalesce(Subquery(ready), 0)).values_list(
        "id", "deployment_id", "serving", "deployment__min_instances", "created_at"
    )
    ranked = sorted(rows, key=lambda r: (0 if r[2] == 0 or r[2] < r[3] else 1, r[4], r[0]))
    return [(r[0], r[1]) for r in ranked]


def instance_place(
    *, instance_id: int, gpu_type: GpuType, num_gpus: int, avoid_host_id: int | None = None
) -> Placement | None:
    """Reserve `num_gpus` GPUs of `gpu_type` for the pending instance `instance_id`.

    Moves the instance pending → starting with its host, GPU indexes and billable facts (GPU type, GPU
    count), atomically. Host `avoid_host_id` (where the deployment's last instance crashed) is taken only
    when no other host fits. Returns the placement, or None when no ready host has `num_gpus` free GPUs of
    that type or the instance was no longer pending (someone else placed it).
    """
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s, %s)", [PLACEMENT_LOCK_NAMESPACE, gpu_type.id])
        hosts = list(
            Host.objects.filter(
                gpu_type=gpu_type, state=Host.State.READY, gpu_count__gte=num_gpus, last_error=""
            ).order_by("id")
        )
        used = used_gpu_counts([h.id for h in hosts])
        best, best_key = None, None
        for host in hosts:
            free = host.gpu_count - used[host.id]
            key = (host.id == avoid_host_id, free)
            if free >= num_gpus and (best_key is None or key < best_key):
                best, best_key = host, key
        if best is None:
            return None
        indexes = free_gpu_indexes(best, used_gpu_indexes([best.id])[best.id])
        if len(indexes) < num_gpus:  # indexes beyond gpu_count (host shrunk): counts and indexes disagree
            return None
        placement = Placement(host=best, gpu_indexes=indexes[:num_gpus])
        claimed = Instance.objects.filter(id=instance_id, state=Instance.State.PENDING).update(
            host=best,
            gpu_indexes=placement.gpu_indexes,
            gpu_type=gpu_type,  # the billable facts, fixed here
            num_gpus=num_gpus,
            state=Instance.State.STARTING,
            last_error="",
        )
        return placement if claimed else None


def capacity_problem(*, gpu_type: GpuType, num_gpus: int) -> tuple[str, bool]:
    """Why an instance of `num_gpus` × `gpu_type` cannot be placed now, and whether it lasts.

    The reason names no host (users see it): "no host with 2 free H100-80GB" (hosts are busy: it
    passes as instances stop, not lasting), "no ready host with H100-80GB GPUs" (all cordoned,
    draining or unreachable), "no H100-80GB host answers" (ready ones whose engine just failed), "no
    H100-80GB host has 16 GPUs (the largest has 8)"; those three last until an operator or an
    engine changes something.
    """
    ready = Host.objects.filter(gpu_type=gpu_type, state=Host.State.READY)
    largest = ready.filter(last_error="").aggregate(n=Max("gpu_count"))["n"]
    if largest is None:
        if ready.exists():
            return f"no {gpu_type.name} host answers", True
        return f"no ready host with {gpu_type.name} GPUs", True
    if largest < num_gpus:
        return f"no {gpu_type.name} host has {num_gpus} GPUs (the largest has {largest})", True
    return f"no host with {num_gpus} free {gpu_type.name}", False


def no_capacity_reason(*, gpu_type: GpuType, num_gpus: int) -> str:
    """The reason of `capacity_problem`, in words for the events."""
    return capacity_problem(gpu_type=gpu_type, num_gpus=num_gpus)[0]
