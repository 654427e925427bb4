"""Reads for the fleet."""

from django.db.models import QuerySet

from .models import GpuType, Host, Instance


def gpu_types_offered() -> QuerySet[GpuType]:
    """GPU types at least one reachable host offers, by name."""
    return GpuType.objects.filter(hosts__state__in=Host.SCHEDULABLE_OR_SOON).distinct().order_by("name")


def instance_counts(deployment_ids: list[int]) -> dict[int, dict[str, int]]:
    """{deployment id: {"running": ready instances, "pending": pending + starting}} in one query."""
    counts = {did: {"running": 0, "pending": 0} for did in deployment_ids}
    rows = Instance.objects.filter(
        deployment_id__in=deployment_ids,
        state__in=[Instance.State.PENDING, Instance.State.STARTING, Instance.State.READY],
    ).values_list("deployment_id", "state")
    for deployment_id, state in rows:
        counts[deployment_id]["running" if state == Instance.State.READY else "pending"] += 1
    return counts
