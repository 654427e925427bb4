"""Desired state: what a user asked to run, and the timeline of what happened to it."""

import secrets
from dataclasses import dataclass

from django.conf import settings
from django.db import models
from django.db.models import F, Q

DEPLOY_ID_ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"


def new_deploy_id() -> str:
    """A 12-character random public id (``deploy_id``), unguessable so ids reveal nothing."""
    return "".join(secrets.choice(DEPLOY_ID_ALPHABET) for _ in range(12))


@dataclass(frozen=True)
class EngineOptions:
    """How the engine serves the model (``Deployment.engine_options``; fixed after create).

    ``quantization``: None or a vLLM method (``awq``, ``gptq``, ``fp8``, ``bitsandbytes``); ``dtype``:
    ``auto``/``bfloat16``/``float16``/``float32``; ``max_model_len``: tokens per sequence (None: the model's
    own maximum); ``prefix_caching``: reuse the KV cache of shared prompt prefixes (vLLM's default, on);
    ``kv_cache_dtype``: ``auto`` or ``fp8``; ``speculative``: None, ``{"method": "ngram",
    "num_speculative_tokens": n}`` or ``{"model": "<draft repo>", "num_speculative_tokens": n}``.
    """

    quantization: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    prefix_caching: bool = True
    kv_cache_dtype: str = "auto"
    speculative: dict | None = None


@dataclass(frozen=True)
class LoraAdapter:
    """A LoRA adapter served as ``username/model-name:name`` (``Deployment.lora_adapters``)."""

    name: str
    repo: str
    revision: str = ""


class Deployment(models.Model):
    class Task(models.TextChoices):
        GENERATE = "generate"  # chat and completions
        EMBED = "embed"  # vLLM's pooling runner: /v1/openai/embeddings

    class Routing(models.TextChoices):
        PREFIX = "prefix"  # requests sharing a prompt prefix go to the instance that holds it
        LEAST_OUTSTANDING = "least_outstanding"

    class Status(models.TextChoices):
        DEPLOYING = "deploying"
        RUNNING = "running"
        FAILED = "failed"
        SUSPENDED = "suspended"
        DELETING = "deleting"
        DELETED = "deleted"

    # Statuses after which nothing changes by itself (status badges stop polling).
    SETTLED = (Status.RUNNING, Status.FAILED, Status.SUSPENDED, Status.DELETED)

    deploy_id = models.CharField(max_length=16, unique=True, default=new_deploy_id, editable=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="deployments")
    model_name = models.CharField(max_length=64)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.DEPLOYING, db_index=True)
    fail_reason = models.TextField(blank=True)
    gpu_type = models.ForeignKey("fleet.GpuType", on_delete=models.PROTECT, related_name="deployments")
    num_gpus = models.PositiveSmallIntegerField()
    max_batch_size = models.PositiveSmallIntegerField()
    hf_repo = models.CharField(max_length=200)
    hf_revision = models.CharField(max_length=100, blank=True)
    hf_token_encrypted = models.TextField(blank=True, help_text="Fernet ciphertext; never shown.")
    min_instances = models.PositiveSmallIntegerField(default=1)
    max_instances = models.PositiveSmallIntegerField(default=1)
    cooldown_seconds = models.PositiveIntegerField(
        default=300, help_text="Seconds the load must stay below the current scale before scaling down."
    )
    target_instances = models.PositiveSmallIntegerField(
        null=True, blank=True, help_text="The autoscaler's recommendation (clamped to min..max); null: min."
    )
    busy_at = models.DateTimeField(
        null=True, blank=True, help_text="Last time the load justified the current scale (starts the cooldown)."
    )
    load_peaks = models.JSONField(
        default=list,
        blank=True,
        help_text="The autoscaler's recommendations over the cooldown window, as [[unix time, instances], …] "
        "decreasing in instances (a sliding-window maximum).",
    )
    # Serving options (fixed after create, except the adapters).
    task = models.CharField(max_length=16, choices=Task.choices, default=Task.GENERATE)
    engine_options = models.JSONField(
        default=dict, blank=True, help_text="EngineOptions fields that differ from the defaults."
    )
    lora_adapters = models.JSONField(
        default=list, blank=True, help_text='LoRA adapters: [{"name": ..., "repo": ..., "revision": ...}].'
    )
    # Settings the owner may change at any time.
    routing = models.CharField(max_length=24, choices=Routing.choices, default=Routing.PREFIX)
    response_cache_seconds = models.PositiveIntegerField(
        null=True, blank=True, help_text="Deterministic answers cached this long (null: off)."
    )
    request_logging = models.BooleanField(default=False, help_text="Keep prompts and responses (opt-in).")
    idle_alert_hours = models.FloatField(
        null=True, blank=True, default=2.0, help_text="Alert after this long running without a request (null: off)."
    )
    idle_stop_hours = models.FloatField(
        null=True, blank=True, help_text="Scale to zero after this long without a request (null: never)."
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    deleted_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["user", "model_name"],
                condition=~Q(status="deleted"),
                name="deployment_unique_live_name_per_user",
            ),
            models.CheckConstraint(condition=Q(min_instances__lte=F("max_instances")), name="deployment_min_le_max"),
        ]

    def __str__(self):
        return self.full_name

    @property
    def full_name(self) -> str:
        """The served model name, ``username/model_name``."""
        return f"{self.user.username}/{self.model_name}"

    @property
    def engine(self) -> EngineOptions:
        """``engine_options`` with the defaults filled in."""
        return EngineOptions(**self.engine_options)

    @property
    def adapters(self) -> tuple[LoraAdapter, ...]:
        """The LoRA adapters, in the order given."""
        return tuple(LoraAdapter(**adapter) for adapter in self.lora_adapters)

    @property
    def is_settled(self) -> bool:
        return self.status in self.SETTLED

    @property
    def desired_instances(self) -> int:
        """Instances the reconciler converges to: the autoscaler's target clamped to min..max while live,
        0 once suspended, failed or deleted."""
        if self.status in (self.Status.DEPLOYING, self.Status.RUNNING):
            target = self.min_instances if self.target_instances is None else self.target_instances
            return max(self.min_instances, min(self.max_instances, target))
        return 0


class DeploymentEvent(models.Model):
    """One line of a deployment's timeline (created, scheduled, starting, ready, failed, deleted…)."""

    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="events")
    kind = models.CharField(max_length=32)
    message = models.TextField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self):
        return f"{self.kind}: {self.message}"
