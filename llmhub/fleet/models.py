"""Actual state of the fleet: GPU types, hosts (one Docker Engine each) and instances (one container each)."""

from django.conf import settings
from django.contrib.postgres.fields import ArrayField
from django.db import models


class GpuType(models.Model):
    """A kind of accelerator a host offers, e.g. ``H100-80GB``; ``CPU`` for hosts without GPUs."""

    name = models.CharField(max_length=32, unique=True)
    memory_gb = models.PositiveIntegerField(default=0, help_text="Memory of one GPU in GB (0: unknown / CPU).")
    hourly_price = models.DecimalField(max_digits=10, decimal_places=4, default=0, help_text="USD per GPU-hour.")
    uses_devices = models.BooleanField(
        default=True,
        help_text="Pass the reserved GPUs to containers as device requests (off for CPU hosts, "
        "whose 'GPUs' are engine slots).",
    )

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name


class Host(models.Model):
    """A machine with one Docker Engine and `gpu_count` GPUs of one type."""

    class State(models.TextChoices):
        READY = "ready"
        CORDONED = "cordoned"
        DRAINING = "draining"
        UNREACHABLE = "unreachable"

    # Hosts whose GPU type users may choose (cordoned/draining hosts come back).
    SCHEDULABLE_OR_SOON = (State.READY, State.CORDONED, State.DRAINING)

    name = models.CharField(max_length=64, unique=True)
    docker_url = models.CharField(max_length=255, help_text="unix:///var/run/docker.sock or tcp://host:2376")
    address = models.CharField(
        max_length=255, help_text="Address the gateway uses to reach ports published on this host."
    )
    gpu_type = models.ForeignKey(GpuType, on_delete=models.PROTECT, related_name="hosts")
    gpu_count = models.PositiveSmallIntegerField()
    engine_image = models.CharField(max_length=255, help_text="Image the host runs instances from.")
    state = models.CharField(max_length=16, choices=State.choices, default=State.READY)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name


class Instance(models.Model):
    """One replica of a deployment: a container on a host, holding `gpu_indexes` of its GPUs.

    Life cycle: pending (no host yet) → starting (container up, engine loading) → ready (serving)
    → stopping → stopped. `started_at`..`stopped_at` is the billed interval.
    """

    class State(models.TextChoices):
        PENDING = "pending"
        STARTING = "starting"
        READY = "ready"
        STOPPING = "stopping"
        STOPPED = "stopped"

    LIVE_STATES = (State.PENDING, State.STARTING, State.READY, State.STOPPING)

    deployment = models.ForeignKey("deployments.Deployment", on_delete=models.CASCADE, related_name="instances")
    host = models.ForeignKey(Host, on_delete=models.PROTECT, null=True, blank=True, related_name="instances")
    gpu_indexes = ArrayField(models.PositiveSmallIntegerField(), default=list, blank=True)
    state = models.CharField(max_length=16, choices=State.choices, default=State.PENDING, db_index=True)
    container_id = models.CharField(max_length=80, blank=True)
    port = models.PositiveIntegerField(null=True, blank=True, help_text="Engine port published on the host.")
    restarts = models.PositiveSmallIntegerField(default=0)
    next_attempt_at = models.DateTimeField(null=True, blank=True, help_text="Backoff: no restart before.")
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    ready_at = models.DateTimeField(null=True, blank=True)
    stopped_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["id"]

    def __str__(self):
        return f"instance {self.id} ({self.state})"

    @property
    def container_name(self) -> str:
        return f"{settings.CONTAINER_PREFIX}-{self.id}"

    @property
    def base_url(self) -> str:
        """``http://<host address>:<port>`` of the engine's OpenAI-compatible server."""
        return f"http://{self.host.address}:{self.port}"
