"""Metering: GPU uptime of instances turned into priced pieces of time.

An instance accrues from its container start (`Instance.started_at`) until it stops (`stopped_at`, or
now while it runs): seconds × GPUs × the GPU type's price per GPU-hour ÷ 3600, with the GPU type and
count fixed on the instance when it was placed (never the deployment's current fields). Pending
instances (no `started_at`) accrue nothing. The run intervals are the only source of billed time: a
deployment's status (suspended by the limit, or edited by hand) changes nothing here; suspension stops
the spend by stopping the containers. Two things cut an interval short or into pieces:

- its host was lost (`Host.state` unreachable): billed up to the host's last heartbeat;
- boundaries asked for by the caller (weeks, days) and price changes (`GpuPrice.effective_at`).

Nothing here rounds: money is rounded once per invoice line (see invoices.invoice_build).
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from django.db.models import Q

from llmhub.fleet.models import GpuType, Host, Instance

from .models import GpuPrice
from .periods import seconds_between

SECONDS_PER_HOUR = Decimal(3600)


class Metered:
    """GPU-seconds and cost of a stretch of uptime: `seconds` (signed: negative for a credit) × `num_gpus`
    GPUs at `hourly_rate` USD per GPU-hour. Subclasses give `seconds`, `num_gpus` and `hourly_rate`."""

    @property
    def gpu_seconds(self) -> Decimal:
        return self.seconds * self.num_gpus

    @property
    def cost(self) -> Decimal:
        """USD, unrounded (negative for a credit)."""
        return self.gpu_seconds * self.hourly_rate / SECONDS_PER_HOUR


@dataclass(frozen=True)
class Piece(Metered):
    """A stretch of one instance's uptime at one price, inside the window asked for."""

    instance_id: int
    deployment_id: int
    user_id: int
    host_name: str
    num_gpus: int
    start: datetime
    end: datetime
    hourly_rate: Decimal  # USD per GPU-hour
    gpu_type_id: int = 0

    @property
    def seconds(self) -> Decimal:
        return seconds_between(self.start, self.end)


class PriceBook:
    """Prices per GPU type over time, from `GpuPrice` (falling back to `GpuType.hourly_price` for a type
    without history)."""

    def __init__(self, gpu_type_ids: Iterable[int]):
        ids = set(gpu_type_ids)
        self._times: dict[int, list[datetime]] = defaultdict(list)
        self._prices: dict[int, list[Decimal]] = defaultdict(list)
        for price in GpuPrice.objects.filter(gpu_type_id__in=ids).order_by("gpu_type_id", "effective_at"):
            self._times[price.gpu_type_id].append(price.effective_at)
            self._prices[price.gpu_type_id].append(price.hourly_price)
        self._fallback = dict(GpuType.objects.filter(id__in=ids).values_list("id", "hourly_price"))

    def rate_at(self, gpu_type_id: int, moment: datetime) -> Decimal:
        """USD per GPU-hour in force at `moment` (the first known price before any was in force)."""
        times = self._times.get(gpu_type_id)
        if not times:
            return self._fallback.get(gpu_type_id, Decimal(0))
        index = bisect.bisect_right(times, moment) - 1
        return self._prices[gpu_type_id][max(index, 0)]

    def changes_between(self, gpu_type_id: int, start: datetime, end: datetime) -> list[datetime]:
        """Effective times of price changes strictly inside (start, end)."""
        return [t for t in self._times.get(gpu_type_id, []) if start < t < end]


def billed_end(instance: Instance, *, now: datetime) -> datetime:
    """Where an instance's billed interval ends: its stop, or `now` while it runs; for an instance whose
    host is lost (unreachable), no later than the host's last heartbeat."""
    end = instance.stopped_at or now
    host = instance.host
    if host is not None and host.state == Host.State.UNREACHABLE and host.heartbeat_at is not None:
        end = min(end, max(host.heartbeat_at, instance.started_at))
    return end


def billable_facts(instance: Instance) -> tuple[int, int]:
    """(GPU type id, GPU count) fixed on `instance` at placement. An instance that ran without them (only
    rows older than the facts, which the migration filled in) falls back to its deployment's."""
    if instance.gpu_type_id is not None and instance.num_gpus is not None:
        return instance.gpu_type_id, instance.num_gpus
    return instance.deployment.gpu_type_id, instance.deployment.num_gpus


def usage_pieces(
    *,
    start: datetime,
    end: datetime,
    now: datetime,
    user_ids: Iterable[int] | None = None,
    deployment_ids: Iterable[int] | None = None,
    boundaries: Iterable[datetime] = (),
) -> list[Piece]:
    """Priced pieces of instance uptime inside [start, end), cut at price changes and at `boundaries`.

    `now` ends the intervals of instances still running (so a window reaching past now holds usage only
    up to now). Filters by owner (`user_ids`) or deployment when given. Returns pieces in no set order.
    """
    instances = Instance.objects.filter(started_at__isnull=False, started_at__lt=end).filter(
        Q(stopped_at__isnull=True) | Q(stopped_at__gt=start)
    )
    if user_ids is not None:
        instances = instances.filter(deployment__user_id__in=list(user_ids))
    if deployment_ids is not None:
        instances = instances.filter(deployment_id__in=list(deployment_ids))
    instances = list(instances.select_related("deployment", "host"))
    if not instances:
        return []
    facts = {i.id: billable_facts(i) for i in instances}
    prices = PriceBook({gpu_type_id for gpu_type_id, _ in facts.values()})
    cuts = sorted(set(boundaries))

    pieces = []
    for instance in instances:
        gpu_type_id, num_gpus = facts[instance.id]
        s = max(instance.started_at, start)
        e = min(billed_end(instance, now=now), end, now)
        if e <= s:
            continue
        inner = [t for t in cuts if s < t < e]
        inner += prices.changes_between(gpu_type_id, s, e)
        edges = [s, *sorted(set(inner)), e]
        for a, b in zip(edges, edges[1:]):
            pieces.append(
                Piece(
                    instance_id=instance.id,
                    deployment_id=instance.deployment_id,
                    user_id=instance.deployment.user_id,
                    host_name=instance.host.name if instance.host else "",
                    num_gpus=num_gpus,
                    start=a,
                    end=b,
                    hourly_rate=prices.rate_at(gpu_type_id, a),
                    gpu_type_id=gpu_type_id,
                )
            )
    return pieces


def running_hourly_cost(*, user_ids: Iterable[int], now: datetime) -> dict[int, Decimal]:
    """{user id: USD per hour} that the users' instances accrue right now (started, not stopped, host not
    lost): Σ GPUs × price per GPU-hour in force now."""
    ids = list(user_ids)
    instances = list(
        Instance.objects.filter(started_at__isnull=False, stopped_at__isnull=True, deployment__user_id__in=ids)
        .exclude(host__state=Host.State.UNREACHABLE)
        .select_related("deployment")
    )
    facts = {i.id: billable_facts(i) for i in instances}
    prices = PriceBook({gpu_type_id for gpu_type_id, _ in facts.values()})
    out = {user_id: Decimal(0) for user_id in ids}
    for instance in instances:
        gpu_type_id, num_gpus = facts[instance.id]
        out[instance.deployment.user_id] += num_gpus * prices.rate_at(gpu_type_id, now)
    return out


def cost_by_user(*, user_ids: Iterable[int], start: datetime, end: datetime, now: datetime) -> dict[int, Decimal]:
    """{user id: USD (unrounded)} accrued inside [start, min(end, now))."""
    ids = list(user_ids)
    out = {user_id: Decimal(0) for user_id in ids}
    for piece in usage_pieces(start=start, end=end, now=now, user_ids=ids):
        out[piece.user_id] += piece.cost
    return out
