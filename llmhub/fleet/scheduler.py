"""Placement: which host and which GPU indexes an instance gets.

Bin-packing, best fit: among ready hosts of the requested GPU type with enough free GPUs, pick the
one with the fewest free GPUs (fill partly used hosts first, keep whole hosts free for large
deployments); reserve its lowest free indexes. Host rows are locked (SELECT … FOR UPDATE) while the
reservation is written, so concurrent reconciles never give one GPU to two instances.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.db import transaction

from .models import GpuType, Host, Instance


@dataclass(frozen=True)
class Placement:
    host: Host
    gpu_indexes: list[int]


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


def instance_place(*, instance_id: int, gpu_type: GpuType, num_gpus: int) -> Placement | None:
    """Reserve `num_gpus` GPUs of `gpu_type` for the pending instance `instance_id`.

    Moves the instance pending → starting with its host and GPU indexes, atomically. Returns the
    placement, or None when no host has capacity or the instance was no longer pending (someone
    else placed it).
    """
    with transaction.atomic():
        hosts = list(
            Host.objects.select_for_update()
            .filter(gpu_type=gpu_type, state=Host.State.READY, gpu_count__gte=num_gpus)
            .order_by("id")
        )
        used = used_gpu_indexes([h.id for h in hosts])
        best: Placement | None = None
        best_free = None
        for host in hosts:
            free = free_gpu_indexes(host, used[host.id])
            if len(free) >= num_gpus and (best_free is None or len(free) < best_free):
                best, best_free = Placement(host=host, gpu_indexes=free[:num_gpus]), len(free)
        if best is None:
            return None
        claimed = Instance.objects.filter(id=instance_id, state=Instance.State.PENDING).update(
            host=best.host, gpu_indexes=best.gpu_indexes, state=Instance.State.STARTING, last_error=""
        )
        return best if claimed else None
