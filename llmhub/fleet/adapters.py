"""Applying a deployment's changed LoRA adapters to its running instances (`instances_adapters_apply`).

A ready instance gets the new set at run time through vLLM's LoRA endpoints (`vllm.lora_load`,
`vllm.lora_unload`): what it serves now is read from ``GET /v1/models`` (the base model plus one
``username/model-name:adapter`` per adapter). An instance that refuses (no ``--enable-lora`` because the
deployment had no adapters when it started, an adapter that does not load, an engine that does not
answer in time) and one still starting (its command line is fixed) are marked for replacement
(`Instance.replace_requested_at`): `scaling.instances_scale` starts a replacement, whose command line has
the new set (`containers.container_spec`), and stops the old one once it serves (make before break).
Pending instances need nothing: their container is not made yet.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from django.utils import timezone

from llmhub.deployments.models import Deployment

from . import vllm
from .models import Instance
from .vllm_command import lora_served_name

log = logging.getLogger(__name__)

# One deadline for every engine call of one application (seconds): a first load reads the adapter's
# weights from the owner's cache or downloads them.
APPLY_DEADLINE_SECONDS = 60.0


@dataclass
class AdaptersApplied:
    """What `instances_adapters_apply` did: instance ids updated at run time, and marked for replacement."""

    updated: list[int] = field(default_factory=list)
    replaced: list[int] = field(default_factory=list)


def _apply_at_runtime(instance: Instance, wanted: dict[str, str], full_name: str, deadline: float) -> bool:
    """Load the adapters `instance` lacks and unload those it no longer should serve; False when it refuses."""
    key = instance.engine_key
    served = vllm.served_models(instance.base_url, key=key, timeout=max(deadline - time.monotonic(), 0.1))
    if full_name not in served:
        return False  # no answer (or a wrong key): the engine cannot be told anything
    prefix = f"{full_name}:"
    for name, repo in wanted.items():
        if name not in served and not vllm.lora_load(
            instance.base_url, key=key, name=name, path=repo, timeout=deadline - time.monotonic()
        ):
            return False
    for name in served:
        if name.startswith(prefix) and name not in wanted:
            if not vllm.lora_unload(instance.base_url, key=key, name=name, timeout=deadline - time.monotonic()):
                return False
    return True


def instances_adapters_apply(
    *, deployment_id: int, deadline_seconds: float = APPLY_DEADLINE_SECONDS
) -> AdaptersApplied:
    """Give the deployment's running instances its current LoRA adapters (see the module).

    Every engine call shares one deadline of `deadline_seconds` seconds. Returns the ids of the
    instances updated at run time and of those marked for replacement; a deployment that is gone or not
    live does nothing. Never raises for an engine's refusal: that instance is replaced instead.
    """
    deployment = Deployment.objects.select_related("user").filter(id=deployment_id).first()
    done = AdaptersApplied()
    if deployment is None or deployment.status not in (Deployment.Status.DEPLOYING, Deployment.Status.RUNNING):
        return done
    full_name = deployment.full_name
    wanted = {lora_served_name(full_name, a.name): a.repo for a in deployment.adapters}
    deadline = time.monotonic() + deadline_seconds
    instances = deployment.instances.select_related("host").filter(
        state__in=(Instance.State.STARTING, Instance.State.READY), replace_requested_at__isnull=True
    )
    for instance in instances:
        if (
            instance.state == Instance.State.READY
            and instance.port
            and _apply_at_runtime(instance, wanted, full_name, deadline)
        ):
            done.updated.append(instance.id)
            continue
        log.info("instance %s: adapters not applied at run time; replacing it", instance.id)
        Instance.objects.filter(id=instance.id).update(replace_requested_at=timezone.now())
        done.replaced.append(instance.id)
    return done
