"""Desired state: what a user asked to run, and the timeline of what happened to it."""

import secrets

from django.conf import settings
from django.db import models
from django.db.models import F, Q

DEPLOY_ID_ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"


def new_deploy_id() -> str:
    """A 12-character random public id (``deploy_id``), unguessable so ids reveal nothing."""
    return "".join(secrets.choice(DEPLOY_ID_ALPHABET) for _ in range(12))


class Deployment(models.Model):
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
