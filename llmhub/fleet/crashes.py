"""Instances that end without LLMHub asking: crashes (with backoff and a crash limit) and losses.

Any exit LLMHub did not ask for is a crash, whatever its code (0, 137, 143 included: a container
that keeps exiting by itself must not be replaced at once for ever). Two ends are proven not to be
the deployment's fault and are losses, replaced at once without counting: the container is gone
(removed behind LLMHub's back), or the host's engine restarted after the container ended (Docker
keeps its events in the daemon's memory only, so an engine without the container's ``die`` event
was restarted since; see `engine.container_death_seen`).

Crash counts belong to the deployment's recent history: the crashes of its instances in the last
`crash_history_seconds()`, counted since the end of its last healthy run (an instance ready for
CRASH_COUNT_RESET_SECONDS, as Kubernetes resets its crash backoff after 10 minutes of running).
A replacement waits `restart_backoff(count)`; past `INSTANCE_MAX_RESTARTS` the deployment fails
with the reason and the container's last log lines.
"""

from __future__ import annotations

import contextlib
import logging
import re
from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import DateTimeField, ExpressionWrapper, F, Max, Q
from django.utils import timezone

from llmhub.deployments.models import Deployment
from llmhub.deployments.timeline import event_record

from . import engine, notices
from .hosts import Observation
from .models import Host, Instance

log = logging.getLogger(__name__)

BACKOFF_BASE_SECONDS = 5.0
BACKOFF_MAX_SECONDS = 300.0
LOG_TAIL_LINES = 12
# Lines read back to find the engine's own error (`engine_error`): vLLM prints the root cause well above its
# launcher's final traceback (about 150 lines for a refused quantization on the CPU engine).
CAUSE_SEARCH_LINES = 400
CAUSE_MAX_CHARS = 300
_LOG_PREFIX = re.compile(r"^(?:\([^)]*\)\s+)?(?:[A-Z]+\s+\d\d-\d\d \d\d:\d\d:\d\d\s+\[[^\]]*\]\s+)?")
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception)): (\S.*)$")
# vLLM's launcher wraps the engine's failure in these; the cause is the exception before them.
_WRAPPERS = ("See root cause above", "Engine core initialization failed")
CRASH_COUNT_RESET_SECONDS = 600.0
CRASH_HISTORY_MIN_SECONDS = 3600.0


def restart_backoff(restarts: int) -> float:
    """Seconds to wait before restart number `restarts` (1, 2, …): 5 s × 2^(n-1), at most 300 s."""
    return min(BACKOFF_BASE_SECONDS * 2 ** max(restarts - 1, 0), BACKOFF_MAX_SECONDS)


def crash_history_seconds() -> float:
    """How far back crashes count: an hour, or longer when a whole crash loop up to the limit takes
    longer (each crash comes at most the longest backoff plus the start timeout after the previous)."""
    loop = settings.INSTANCE_MAX_RESTARTS * (BACKOFF_MAX_SECONDS + settings.INSTANCE_START_TIMEOUT)
    return max(CRASH_HISTORY_MIN_SECONDS, loop)


def crash_count(deployment: Deployment, *, now: datetime) -> int:
    """Crashes of `deployment`'s instances that count now: within `crash_history_seconds()` and after
    the end of its last healthy run (an instance ready for CRASH_COUNT_RESET_SECONDS). Two queries."""
    reset = timedelta(seconds=CRASH_COUNT_RESET_SECONDS)
    healthy_until = ExpressionWrapper(F("ready_at") + reset, output_field=DateTimeField())
    healthy = (
        Instance.objects.filter(deployment=deployment, ready_at__isnull=False)
        .filter(Q(stopped_at__isnull=True, ready_at__lte=now - reset) | Q(stopped_at__gte=healthy_until))
        .aggregate(t=Max(healthy_until))["t"]
    )
    since = now - timedelta(seconds=crash_history_seconds())
    if healthy is not None and healthy > since:
        since = healthy
    return Instance.objects.filter(deployment=deployment, crashed_at__gte=since).count()


def last_crash_host_id(deployment: Deployment, *, now: datetime) -> int | None:
    """The host where the deployment's latest recent crash happened (a replacement avoids it), or None."""
    since = now - timedelta(seconds=crash_history_seconds())
    return (
        Instance.objects.filter(deployment=deployment, crashed_at__gte=since, host__isnull=False)
        .order_by("-crashed_at", "-id")
        .values_list("host_id", flat=True)
        .first()
    )


def engine_restarted(host: Host, info: engine.ContainerInfo) -> bool:
    """True only when the engine proves it restarted after `info`'s container ended: it has no record
    of the container's death. False when it saw it die, or cannot say (engine error, no finish time)."""
    if info.finished_at is None:
        return False
    try:
        return not engine.container_death_seen(host.endpoint, info.id, finished_at=info.finished_at)
    except engine.EngineError as exc:
        log.warning("host %s: cannot read the events of %s: %s", host.name, info.name, exc)
        return False


def exit_reason(info: engine.ContainerInfo) -> str:
    """The words for a container that exited by itself, e.g. "container exited with code 137 (killed: out of memory)"."""
    if info.oom_killed:
        return f"container exited with code {info.exit_code} (killed: out of memory)"
    if info.exit_code == 0:
        return "container exited with code 0 (the engine stopped by itself)"
    if info.exit_code in (137, 143):
        return f"container exited with code {info.exit_code} (killed by a signal LLMHub did not send)"
    return f"container exited with code {info.exit_code}"


def engine_error(logs: str) -> str:
    """The engine's own reason in a container log: the last ``SomethingError: message`` line (vLLM's
    ``(EngineCore pid=N) ERROR <date> [file:line]`` prefix removed) that is not the launcher's wrapper
    ("Engine core initialization failed. See root cause above"), at most CAUSE_MAX_CHARS characters;
    "" when the log has none. Example (vLLM 0.32 CPU engine, ``--quantization fp8``): ``RuntimeError:
    _C::static_scaled_fp8_quant() expected at most 0 argument(s) but received 4 argument(s)...``."""
    found = ""
    for line in logs.splitlines():
        match = _EXCEPTION_LINE.match(_LOG_PREFIX.sub("", line.strip(), count=1))
        if match and not any(wrapper in match.group(2) for wrapper in _WRAPPERS):
            found = f"{match.group(1)}: {match.group(2)}"
    return found[:CAUSE_MAX_CHARS]


def instance_end(
    deployment: Deployment,
    instance: Instance,
    reason: str,
    observation: Observation,
    *,
    ended_at: datetime | None = None,
    crashed: bool = True,
    detail: str = "",
) -> None:
    """Close an instance whose container is gone or unusable, and replace it.

    `crashed`: the container failed by itself; the instance is stopped, the crash recorded
    (`crashed_at`), and its replacement waits an exponential backoff, or the deployment fails once
    its recent crashes pass the limit (fail_reason = `reason` + the container's last log lines).
    Otherwise the instance is lost and replaced at once, with a fresh count. The billed interval ends
    at `ended_at` (when the engine says the container finished), else now. A container that cannot
    be removed marks its host (`last_error`): its GPUs are not handed out again until it is gone.
    `reason` is shown to the user (events, fail_reason: see `notices`; the log tail with host facts
    redacted); `detail` (an engine's error: may name hosts and addresses) goes only to the instance's
    last_error, for operators. Freed GPUs clear the pass's capacity memo (`observation.gpus_freed`).
    """
    logs = ""
    if instance.host_id:
        try:
            if crashed:
                with contextlib.suppress(engine.EngineError):
                    logs = engine.container_logs(
                        instance.host.endpoint, instance.container_name, tail=CAUSE_SEARCH_LINES
                    )
            engine.container_remove(instance.host.endpoint, instance.container_name)
        except engine.EngineError as exc:
            Host.objects.filter(id=instance.host_id).update(
                last_error=f"old container {instance.container_name} not removed yet: {exc}"
            )
    cause = notices.redact(engine_error(logs), host=instance.host)
    if cause:
        reason = f"{reason}: the engine said: {cause}"
    logs = "\n".join(logs.splitlines()[-LOG_TAIL_LINES:])
    shown = f"{reason}\n{notices.redact(logs, host=instance.host)}".strip()
    detail = f"{reason}: {detail}\n{logs}".strip() if detail else f"{reason}\n{logs}".strip()
    now = timezone.now()
    stopped_at = min(max(ended_at or now, instance.started_at), now) if instance.started_at else None
    state = Instance.State.STOPPED if crashed else Instance.State.LOST
    changes = {"state": state, "stopped_at": stopped_at, "last_error": detail}
    if crashed:
        changes["crashed_at"] = now
    if not Instance.objects.filter(id=instance.id, state=instance.state).update(**changes):
        return
    for key, value in changes.items():
        setattr(instance, key, value)
    if instance.gpu_indexes:
        observation.gpus_freed()
    if not crashed:
        Instance.objects.create(deployment=deployment)
        event_record(
            deployment=deployment, kind="lost", message=f"instance {instance.id}: {reason}; replaced (not a crash)"
        )
        return
    restarts = crash_count(deployment, now=now)
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
