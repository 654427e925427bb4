"""The autoscaler: load signals → a deployment's target instance count, between min and max.

Signals: requests in flight at the gateway (all web processes, via Redis: `gateway.load`) and each
ready engine's `vllm:num_requests_running` + `vllm:num_requests_waiting` (vLLM /metrics, every engine
read at once with one deadline per pass, so a wedged engine delays nobody). The load is the larger of
the two; each instance should carry `target_concurrency(max_batch_size)` requests (75 % of its batch
slots), so the recommendation is ceil(load / that), within min..max. The stored target is always the
current decision within min..max. Scaling up happens at once; scaling down goes to the largest
recommendation of the last `cooldown_seconds` (a sliding-window maximum, as Kubernetes' HPA
stabilization window), and not before `cooldown_seconds` after the last scale-up or wake, nor while
an instance is starting (its engine loading); pending instances (no GPUs yet) do not hold it. The
window is never shorter than MIN_WINDOW_SECONDS, so a wake survives until the gateway's count of the
waiting request is seen. With min_instances = 0 an idle deployment goes to zero; the gateway wakes
it (`gateway.services.wake`).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.utils import timezone

from llmhub.fleet import vllm
from llmhub.fleet.models import Instance
from llmhub.queue import reconcile_soon

from .models import Deployment
from .timeline import event_record

TARGET_UTILIZATION = 0.75
MIN_WINDOW_SECONDS = 5.0  # > the gateway's publish interval (1 s) + an autoscaler tick (2 s): a wake's request is seen
METRICS_DEADLINE_SECONDS = 1.5  # one deadline for every engine's /metrics in a pass (the beat runs every 2 s)
METRICS_THREADS = 32


@dataclass(frozen=True)
class Signals:
    """Load of one deployment: gateway in-flight requests; engine running and waiting, summed over instances."""

    inflight: int = 0
    running: float = 0
    waiting: float = 0
    starting: int = 0  # instances starting (GPUs held, engine loading): no scale-down while they warm up

    @property
    def load(self) -> float:
        return max(self.inflight, self.running + self.waiting)

    def describe(self) -> str:
        return f"in flight {self.inflight}, engines running {self.running:g}, waiting {self.waiting:g}"


def target_concurrency(max_batch_size: int) -> int:
    """Requests one instance should carry: 75 % of its batch slots (at least 1)."""
    return max(1, math.floor(max_batch_size * TARGET_UTILIZATION))


def recommend(load: float, max_batch_size: int) -> int:
    """Instances needed for `load` concurrent requests (before clamping to min..max)."""
    return math.ceil(load / target_concurrency(max_batch_size))


def engine_loads(instances: list[Instance], *, deadline: float) -> dict[int, tuple[float, float]]:
    """{instance id: (running, waiting)} from every instance's vLLM /metrics, read at once; engines that
    have not answered within `deadline` seconds (one deadline for all) are left out."""
    if not instances:
        return {}
    pool = ThreadPoolExecutor(max_workers=min(METRICS_THREADS, len(instances)))
    futures = {pool.submit(vllm.engine_load, i.base_url, key=i.engine_key, timeout=deadline): i.id for i in instances}
    done, _ = wait(futures, timeout=deadline)
    pool.shutdown(wait=False, cancel_futures=True)  # a wedged engine's thread ends at its own timeout
    return {futures[f]: f.result() for f in done if f.exception() is None and f.result() is not None}


def engine_signals(deployments: list[Deployment]) -> dict[int, tuple[float, float, int]]:
    """{deployment id: (running, waiting summed over its ready instances' /metrics, instances starting)}.
    One query, then every ready engine read at once (`engine_loads`)."""
    instances = list(
        Instance.objects.filter(
            deployment__in=deployments, state__in=[Instance.State.STARTING, Instance.State.READY]
        ).select_related("host")
    )
    loads = engine_loads(
        [i for i in instances if i.state == Instance.State.READY and i.port], deadline=METRICS_DEADLINE_SECONDS
    )
    signals = {d.id: (0.0, 0.0, 0) for d in deployments}
    for instance in instances:
        running, waiting, starting = signals[instance.deployment_id]
        if instance.state == Instance.State.STARTING:
            starting += 1
        elif instance.id in loads:
            running, waiting = running + loads[instance.id][0], waiting + loads[instance.id][1]
        signals[instance.deployment_id] = (running, waiting, starting)
    return signals


def load_window(deployment: Deployment) -> float:
    """Seconds of load history a scale-down looks at: the cooldown, at least MIN_WINDOW_SECONDS."""
    return max(float(deployment.cooldown_seconds), MIN_WINDOW_SECONDS)


def window_peaks(peaks: list, *, now: float, wanted: int, window: float) -> list[list[float]]:
    """The sliding-window maximum after a new recommendation: [[unix time, instances], …] kept within
    `window` seconds of `now`, decreasing in instances (the first is the window's maximum)."""
    kept = [[t, n] for t, n in peaks if t >= now - window]
    while kept and kept[-1][1] <= wanted:
        kept.pop()
    return [*kept, [now, wanted]]


def deployment_autoscale(*, deployment: Deployment, signals: Signals, now: datetime | None = None) -> int | None:
    """Apply one autoscaling decision. Returns the new target, or None when it stays.

    Up: at once to min(max, recommendation). Down: to the largest recommendation of the window
    (`load_window`), once that is below the current count and the last scale-up (`busy_at`) is a
    window ago, and no instance is starting. The decision is stored every pass (within min..max),
    with the window's peaks; every change is an event naming the signals. A conditional UPDATE on
    the old target makes concurrent passes (and wakes, and owners' changes) harmless.
    """
    if deployment.status not in (Deployment.Status.DEPLOYING, Deployment.Status.RUNNING):
        return None
    now = now or timezone.now()
    current = deployment.desired_instances
    wanted = max(
        deployment.min_instances, min(deployment.max_instances, recommend(signals.load, deployment.max_batch_size))
    )
    window = load_window(deployment)
    peaks = window_peaks(deployment.load_peaks or [], now=now.timestamp(), wanted=wanted, window=window)
    peak = int(peaks[0][1])
    busy_at = deployment.busy_at or deployment.created_at
    target, reason = current, None
    if wanted > current:
        target, busy_at, reason = wanted, now, "load above target"
    elif signals.starting or wanted == current:
        busy_at = now  # the current count is justified (or still warming up): the cooldown restarts
    elif peak < current and now - busy_at >= timedelta(seconds=window):
        target, busy_at = peak, now
        reason = f"load below target for {deployment.cooldown_seconds} s (the largest of that window: {peak})"
    updated = Deployment.objects.filter(id=deployment.id, target_instances=deployment.target_instances).update(
        target_instances=target, busy_at=busy_at, load_peaks=peaks
    )
    if not updated or reason is None:
        return None
    per = target_concurrency(deployment.max_batch_size)
    event_record(
        deployment=deployment,
        kind="scaled",
        message=f"{current} → {target} instances: {reason} ({signals.describe()}; {per} per instance)",
    )
    reconcile_soon(deployment.id)
    return target


def autoscale_all(*, inflight: dict[int, int], now: datetime | None = None) -> int:
    """One autoscaler pass over every live deployment. `inflight`: {deployment id: gateway in-flight}.

    Returns the number of deployments whose target changed.
    """
    changed = 0
    live = Deployment.objects.filter(status__in=[Deployment.Status.DEPLOYING, Deployment.Status.RUNNING])
    deployments = list(live.select_related("user"))
    engines = engine_signals(deployments)
    for deployment in deployments:
        running, waiting, starting = engines.get(deployment.id, (0.0, 0.0, 0))
        signals = Signals(inflight.get(deployment.id, 0), running, waiting, starting)
        changed += deployment_autoscale(deployment=deployment, signals=signals, now=now) is not None
    return changed
