"""Reads for the fleet."""

from django.db.models import Max, Q, QuerySet, Sum

from . import engine, notices
from .models import GpuType, Host, Instance
from .scheduler import Cardinality


def gpu_types_offered() -> QuerySet[GpuType]:
    """GPU types at least one reachable host offers, by name."""
    return GpuType.objects.filter(hosts__state__in=Host.SCHEDULABLE_OR_SOON).distinct().order_by("name")


def largest_host_gpus(gpu_type: GpuType) -> int | None:
    """GPUs of the largest host of `gpu_type` that is ready, cordoned or draining (None: no such host):
    the most GPUs one instance of that type can ever get now."""
    hosts = Host.objects.filter(gpu_type=gpu_type, state__in=Host.SCHEDULABLE_OR_SOON)
    return hosts.aggregate(n=Max("gpu_count"))["n"]


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


def instance_log_tail(instance: Instance, *, lines: int = 100) -> str:
    """The last `lines` lines of the instance's container log (host facts redacted: see `notices`), or a
    sentence saying why there are none. Shown to the deployment's owner: never an engine's error text."""
    if instance.host is None or not instance.container_id:
        return "This instance has not started a container yet."
    try:
        text = engine.container_logs(instance.host.endpoint, instance.container_name, tail=lines)
    except (engine.EngineError, ValueError):  # ValueError: a TLS key the encryption key cannot decrypt
        return notices.ENGINE_SILENT
    return notices.redact(text, host=instance.host) or notices.NO_LOG


def hosts_with_gpus_used(hosts: QuerySet[Host]) -> QuerySet[Host]:
    """`hosts` annotated with `gpus_used`: GPUs reserved by their live instances (None when none)."""
    live = Q(instances__state__in=Instance.LIVE_STATES)
    return hosts.annotate(gpus_used=Sum(Cardinality("instances__gpu_indexes"), filter=live))
