"""Writes for deployments: create, delete, and the events timeline."""

from collections.abc import Sequence
from dataclasses import asdict, fields

from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Exists, F, OuterRef, Q, Sum
from django.utils import timezone

from llmhub import crypto
from llmhub.accounts.models import User
from llmhub.fleet.models import GpuType, Instance
from llmhub.queue import reconcile_soon, task_send

from .models import Deployment, EngineOptions, LoraAdapter
from .rules import bounds_error
from .selectors import model_name_taken
from .timeline import event_record

DEFAULT_COOLDOWN = 300  # seconds
DEFAULT_ENGINE = EngineOptions()
NAME_TAKEN = "You already have a deployment named '{name}'. Choose another name."
# Statuses whose deployments count against the GPU quota (they hold or may hold GPUs); a deployment in any
# other status counts too while one of its instances has not stopped (`gpus_reserved`).
QUOTA_STATUSES = (Deployment.Status.DEPLOYING, Deployment.Status.RUNNING, Deployment.Status.SUSPENDED)


def gpus_reserved(user: User, *, excluding: Deployment | None = None) -> int:
    """GPUs the user's deployments may hold at most: Σ max_instances × num_gpus (`excluding` one) over live
    deployments and over any other (deleting, failed) that still has an instance that has not stopped."""
    still_running = Instance.objects.filter(deployment=OuterRef("pk"), state__in=Instance.LIVE_STATES)
    deployments = Deployment.objects.filter(Q(status__in=QUOTA_STATUSES) | Q(Exists(still_running)), user=user)
    if excluding is not None:
        deployments = deployments.exclude(id=excluding.id)
    return deployments.aggregate(n=Sum(F("max_instances") * F("num_gpus"))).get("n") or 0


def _check_quota(user: User, *, num_gpus: int, max_instances: int, excluding: Deployment | None = None) -> None:
    """Raise ValidationError on `max_instances` when the user's GPU quota would be exceeded."""
    wanted = max_instances * num_gpus
    used = gpus_reserved(user, excluding=excluding)
    if used + wanted > user.gpu_quota:
        raise ValidationError(
            {
                "max_instances": f"This needs {wanted} GPUs (max instances × GPUs) but only "
                f"{max(user.gpu_quota - used, 0)} of your quota of {user.gpu_quota} are free. "
                "Lower max instances or the GPU count, or delete a deployment."
            }
        )


def engine_options_json(engine: EngineOptions) -> dict:
    """`Deployment.engine_options`: the fields of `engine` that differ from the defaults (speculative as
    given, without null keys)."""
    out = {
        f.name: getattr(engine, f.name)
        for f in fields(engine)
        if getattr(engine, f.name) != getattr(DEFAULT_ENGINE, f.name)
    }
    if out.get("speculative"):
        out["speculative"] = {k: v for k, v in out["speculative"].items() if v is not None}
    return out


def adapters_json(adapters: Sequence[LoraAdapter]) -> list[dict]:
    """`Deployment.lora_adapters`: [{"name", "repo", "revision"}] in the order given."""
    return [asdict(adapter) for adapter in adapters]


@transaction.atomic
def deployment_create(
    *,
    user: User,
    model_name: str,
    gpu_type: GpuType,
    num_gpus: int,
    max_batch_size: int,
    hf_repo: str,
    hf_revision: str = "",
    hf_token: str = "",
    min_instances: int = 1,
    max_instances: int = 1,
    cooldown_seconds: int | None = None,
    task: str = Deployment.Task.GENERATE,
    engine: EngineOptions = DEFAULT_ENGINE,
    lora_adapters: Sequence[LoraAdapter] = (),
    routing: str = Deployment.Routing.PREFIX,
    response_cache_seconds: int | None = None,
    request_logging: bool = False,
    idle_alert_hours: float | None = 2.0,
    idle_stop_hours: float | None = None,
) -> Deployment:
    """Store a new deployment in status `deploying` and ask a worker to start its instances.

    Serving options (`task`, `engine`, `lora_adapters`) and settings (`routing`, `response_cache_seconds`
    in seconds or None for off, `request_logging`, `idle_alert_hours` and `idle_stop_hours` in hours or
    None for off) were validated by the form (the deploy API's rules, `schemas`).

    Checks what needs the database (fields were validated by DeploymentForm): the name is free
    among the user's live deployments, and the user's GPU quota (Σ max_instances × num_gpus over
    live deployments, `User.gpu_quota`, 4 by default) holds. The user row is locked so concurrent
    creates cannot both pass the quota. Raises ValidationError keyed by field name.
    """
    User.objects.select_for_update().filter(id=user.id).first()
    if model_name_taken(user, model_name):
        raise ValidationError({"model_name": NAME_TAKEN.format(name=model_name)})
    _check_quota(user, num_gpus=num_gpus, max_instances=max_instances)
    deployment = Deployment.objects.create(
        user=user,
        model_name=model_name,
        gpu_type=gpu_type,
        num_gpus=num_gpus,
        max_batch_size=max_batch_size,
        hf_repo=hf_repo,
        hf_revision=hf_revision,
        hf_token_encrypted=crypto.encrypt(hf_token),
        min_instances=min_instances,
        max_instances=max_instances,
        cooldown_seconds=DEFAULT_COOLDOWN if cooldown_seconds is None else cooldown_seconds,
        task=task,
        engine_options=engine_options_json(engine),
        lora_adapters=adapters_json(lora_adapters),
        routing=routing,
        response_cache_seconds=response_cache_seconds,
        request_logging=request_logging,
        idle_alert_hours=idle_alert_hours,
        idle_stop_hours=idle_stop_hours,
        # Start warm even when min is 0: the autoscaler scales to zero after the cooldown if idle.
        target_instances=max(min_instances, 1),
        busy_at=timezone.now(),
    )
    event_record(
        deployment=deployment,
        kind="created",
        message=f"{hf_repo} on {num_gpus} × {gpu_type.name}, {min_instances}–{max_instances} instances",
    )
    reconcile_soon(deployment.id)
    return deployment


@transaction.atomic
def deployment_scale(
    *, deployment: Deployment, min_instances: int, max_instances: int, cooldown_seconds: int | None = None
) -> Deployment:
    """Change a deployment's min and max instances (and scale-down cooldown, seconds; None keeps it);
    running instances keep running.

    The target becomes the current count within the new bounds: lowering min stops nothing before
    the autoscaler's cooldown; lowering max below the count stops the least loaded instances, each
    after its in-flight requests drain (see `fleet.reconcile`). Checks the GPU quota with
    the new max (the user row is locked, as in `deployment_create`). Raises ValidationError keyed by
    field name (`min_instances`, `max_instances`).
    """
    if error := bounds_error(min_instances, max_instances):
        raise ValidationError({"min_instances": error})
    User.objects.select_for_update().filter(id=deployment.user_id).first()
    _check_quota(deployment.user, num_gpus=deployment.num_gpus, max_instances=max_instances, excluding=deployment)
    old = (deployment.min_instances, deployment.max_instances)
    cooldown = deployment.cooldown_seconds if cooldown_seconds is None else cooldown_seconds
    if old == (min_instances, max_instances) and cooldown == deployment.cooldown_seconds:
        return deployment
    # The count running now, within the new bounds: lowering min stops nothing (the autoscaler scales
    # down after its cooldown), raising max starts nothing the load does not ask for.
    target = max(min_instances, min(max_instances, deployment.desired_instances))
    deployment.min_instances, deployment.max_instances = min_instances, max_instances
    deployment.cooldown_seconds, deployment.target_instances = cooldown, target
    deployment.save(
        update_fields=["min_instances", "max_instances", "cooldown_seconds", "target_instances", "updated_at"]
    )
    event_record(
        deployment=deployment,
        kind="scaled",
        message=f"instances {old[0]}–{old[1]} → {min_instances}–{max_instances}, cooldown {cooldown} s (set by owner)",
    )
    reconcile_soon(deployment.id)
    return deployment


@transaction.atomic
def deployment_delete(*, deployment: Deployment) -> bool:
    """Mark the deployment `deleting`; a worker stops and removes its containers, then marks it `deleted`.

    History (instances, events) is kept for invoices. Returns False when it was already being deleted.
    """
    claimed = (
        Deployment.objects.filter(id=deployment.id)
        .exclude(status__in=[Deployment.Status.DELETING, Deployment.Status.DELETED])
        .update(status=Deployment.Status.DELETING)
    )
    if not claimed:
        return False
    deployment.status = Deployment.Status.DELETING
    event_record(deployment=deployment, kind="deleting", message="deletion requested")
    reconcile_soon(deployment.id)
    return True


@transaction.atomic
def deployment_scale_to_zero(*, deployment: Deployment, reason: str) -> bool:
    """Set min instances to 0 and stop every instance now (target 0, the autoscaler's window cleared), keeping
    max instances: the deployment wakes on its next request like any deployment at zero. For an idle
    deployment's owner (one click from the idle alert) and the idle guard's `idle_stop_hours`.

    `reason` ends the timeline event, e.g. "by the owner". Claimed with a conditional UPDATE; returns False
    when it was already at zero or is not live (deploying or running), and then records nothing.
    """
    old_min = deployment.min_instances
    claimed = (
        Deployment.objects.filter(id=deployment.id, status__in=[Deployment.Status.DEPLOYING, Deployment.Status.RUNNING])
        .exclude(min_instances=0, target_instances=0)
        .update(min_instances=0, target_instances=0, load_peaks=[], updated_at=timezone.now())
    )
    if not claimed:
        return False
    deployment.min_instances, deployment.target_instances, deployment.load_peaks = 0, 0, []
    event_record(
        deployment=deployment,
        kind="scaled",
        message=f"{old_min}–{deployment.max_instances} → 0–{deployment.max_instances} instances, scaled to zero: {reason}",
    )
    reconcile_soon(deployment.id)
    return True


SETTINGS = ("routing", "response_cache_seconds", "request_logging", "idle_alert_hours", "idle_stop_hours")


@transaction.atomic
def deployment_update(
    *,
    deployment: Deployment,
    min_instances: int,
    max_instances: int,
    cooldown_seconds: int | None = None,
    routing: str,
    response_cache_seconds: int | None,
    request_logging: bool,
    idle_alert_hours: float | None,
    idle_stop_hours: float | None,
    lora_adapters: Sequence[LoraAdapter] | None = None,
) -> Deployment:
    """Change what may change once deployed, in one transaction: the scale (`deployment_scale`), the
    settings (routing, response cache in seconds, request logging, idle alert/stop in hours; None: off) and,
    when given, the LoRA adapters (`deployment_adapters_changed` when they differ). Running instances keep
    running. Raises ValidationError keyed by field name (`min_instances`, `max_instances`).
    """
    deployment_scale(
        deployment=deployment, min_instances=min_instances, max_instances=max_instances,
        cooldown_seconds=cooldown_seconds,
    )  # fmt: skip
    wanted = {
        "routing": routing, "response_cache_seconds": response_cache_seconds, "request_logging": request_logging,
        "idle_alert_hours": idle_alert_hours, "idle_stop_hours": idle_stop_hours,
    }  # fmt: skip
    changed = {name: value for name, value in wanted.items() if getattr(deployment, name) != value}
    if changed:
        for name, value in changed.items():
            setattr(deployment, name, value)
        deployment.save(update_fields=[*changed, "updated_at"])
        described = ", ".join(f"{name.replace('_', ' ')} {_shown(value)}" for name, value in changed.items())
        event_record(deployment=deployment, kind="settings", message=f"{described} (set by owner)")
    if lora_adapters is not None:
        deployment_adapters_set(deployment=deployment, lora_adapters=lora_adapters)
    return deployment


@transaction.atomic
def deployment_adapters_set(*, deployment: Deployment, lora_adapters: Sequence[LoraAdapter]) -> bool:
    """Give the deployment these LoRA adapters (validated by the caller: `forms.AdaptersForm`, the deploy API).
    Returns whether they differ from before; when they do, `deployment_adapters_changed` applies them."""
    if adapters_json(lora_adapters) == deployment.lora_adapters:
        return False
    deployment.lora_adapters = adapters_json(lora_adapters)
    deployment.save(update_fields=["lora_adapters", "updated_at"])
    deployment_adapters_changed(deployment)
    return True


def _shown(value) -> str:
    """A setting's value in an event: None and False are "off", True is "on"."""
    return "off" if value is None or value is False else "on" if value is True else str(value)


def deployment_adapters_changed(deployment: Deployment) -> None:
    """Hook: the deployment's LoRA adapters (`Deployment.lora_adapters`) were changed by its owner. Records
    an event and queues applying them to running instances (`fleet.adapters.instances_adapters_apply`:
    loaded at run time where the engine allows it, else a make-before-break replacement), so the request
    never waits on an engine."""
    names = ", ".join(adapter.name for adapter in deployment.adapters) or "none"
    event_record(deployment=deployment, kind="adapters", message=f"LoRA adapters now: {names} (set by owner)")
    task_send("workers.tasks.deployment_adapters_apply", deployment.id)
    reconcile_soon(deployment.id)
