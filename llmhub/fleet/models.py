"""Actual state of the fleet: GPU types, hosts (one Docker Engine each), instances (one container each)
and the engine image pulls hosts run."""

import ipaddress
import secrets

from django.conf import settings
from django.contrib.postgres.fields import ArrayField
from django.core.exceptions import ValidationError
from django.db import models

from llmhub import crypto

from . import engine


def docker_url_validator(value: str) -> None:
    """Model-field check of a Docker Engine URL's shape (``unix:///…`` or ``tcp://host:port``).

    Whether a ``tcp://`` host has its TLS certificates is checked with the other fields (Host.clean).
    """
    try:
        engine.url_validate(value, tls=True)
    except ValueError as exc:
        raise ValidationError(str(exc)) from exc


_SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")  # RFC 6598 (carrier-grade NAT, Tailscale)


def bind_address_validate(value: str) -> str:
    """Check the IP a host's engine publishes engine ports on; returns it normalised.

    Accepted: loopback (the local engine) and private addresses (RFC 1918, RFC 6598, IPv6 ULA): an
    interface the gateway reaches and the internet does not. Raises ValueError, with what to write
    instead, for a host name, the unspecified address (0.0.0.0 / ::, every interface), public,
    link-local, multicast and reserved addresses.
    """
    try:
        ip = ipaddress.ip_address((value or "").strip())
    except ValueError:
        raise ValueError(
            f"'{value}' is not an IP address: Docker publishes ports on an interface's IP address, e.g. "
            "127.0.0.1 for the local engine or the host's private address such as 10.0.0.5"
        ) from None
    if ip.is_unspecified:
        raise ValueError(
            f"{ip} publishes engine ports on every interface, the public ones included: give the IP of the "
            "private interface the gateway reaches (127.0.0.1 for the local engine)"
        )
    if ip.is_link_local or ip.is_multicast:
        kind = "link-local" if ip.is_link_local else "multicast"
        raise ValueError(f"{ip} is a {kind} address: give the IP of the host's private interface")
    if ip.is_loopback or ip.is_private or (ip.version == 4 and ip in _SHARED_ADDRESS_SPACE):
        return str(ip)
    raise ValueError(
        f"{ip} is a public address: anyone who reaches it could call engines; give the IP of the host's "
        "private interface (10/8, 172.16/12, 192.168/16, 100.64/10 or fc00::/7), or 127.0.0.1"
    )


def bind_address_validator(value: str) -> None:
    """Model-field form of `bind_address_validate`."""
    try:
        bind_address_validate(value)
    except ValueError as exc:
        raise ValidationError(str(exc)) from exc


def engine_key_new() -> str:
    """A fresh engine API key (256 random bits, URL-safe text), encrypted for `Instance.engine_key_encrypted`."""
    return crypto.encrypt(secrets.token_urlsafe(32))


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
    host_memory_gb_per_gpu = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="Host memory (RAM) an instance may use per GPU, in GB: its container's memory limit is this × "
        "its GPU count. Empty: no limit.",
    )

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name


class Host(models.Model):
    """A machine with one Docker Engine and `gpu_count` GPUs of one type.

    States: ready (takes new instances), cordoned (keeps its instances, takes no new ones), draining
    (its instances move to other hosts, then it is cordoned), unreachable (its engine has not answered
    for longer than the grace period: its instances were marked lost; it returns to `resume_state`
    when the engine answers again). `heartbeat_at` is the last time a worker reached the engine.
    """

    class State(models.TextChoices):
        READY = "ready"
        CORDONED = "cordoned"
        DRAINING = "draining"
        UNREACHABLE = "unreachable"

    # Hosts whose GPU type users may choose (cordoned/draining hosts come back).
    SCHEDULABLE_OR_SOON = (State.READY, State.CORDONED, State.DRAINING)

    name = models.CharField(max_length=64, unique=True)
    docker_url = models.CharField(
        max_length=255,
        validators=[docker_url_validator],
        help_text="unix:///var/run/docker.sock, or tcp://host:2376 with TLS client certificates.",
    )
    tls_ca_cert = models.TextField(blank=True, help_text="PEM of the CA that signed the engine's certificate.")
    tls_client_cert = models.TextField(blank=True, help_text="PEM of the client certificate the engine trusts.")
    tls_client_key_encrypted = models.TextField(
        blank=True, help_text="Fernet ciphertext of the client key; never shown."
    )
    address = models.CharField(
        max_length=255, help_text="Address the gateway uses to reach ports published on this host."
    )
    bind_address = models.GenericIPAddressField(
        default="127.0.0.1",
        validators=[bind_address_validator],
        help_text="IP the host's engine publishes engine ports on: 127.0.0.1 for the local engine, the IP of a "
        "private interface the gateway reaches for a remote one. Never 0.0.0.0.",
    )
    gpu_type = models.ForeignKey(GpuType, on_delete=models.PROTECT, related_name="hosts")
    gpu_count = models.PositiveSmallIntegerField(
        help_text="GPUs on the host (read from the engine when it advertises them, else set by hand)."
    )
    engine_image = models.CharField(max_length=255, help_text="Image the host runs instances from.")
    state = models.CharField(max_length=16, choices=State.choices, default=State.READY)
    resume_state = models.CharField(
        max_length=16,
        choices=State.choices,
        blank=True,
        help_text="State to return to once an unreachable host answers.",
    )
    heartbeat_at = models.DateTimeField(null=True, blank=True, help_text="Last time a worker reached the engine.")
    last_error = models.TextField(blank=True, help_text="The engine's last failure, cleared when it answers.")
    engine_id = models.CharField(
        max_length=255,
        blank=True,
        help_text="The engine's identity (ID, name and data root from GET /info): one engine is one host.",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(
                fields=["engine_id"], condition=~models.Q(engine_id=""), name="host_one_per_engine_id"
            )
        ]

    def __str__(self):
        return self.name

    def clean(self):
        if self.docker_url.startswith("tcp://") and not (
            self.tls_ca_cert and self.tls_client_cert and self.tls_client_key_encrypted
        ):
            raise ValidationError(
                {"docker_url": "An engine reached over tcp:// needs the TLS CA, client certificate and client key."}
            )

    @property
    def endpoint(self) -> engine.Endpoint:
        """The engine's URL with its TLS client credentials (the key decrypted), for `engine` calls."""
        tls = None
        if self.tls_client_key_encrypted:
            tls = engine.TlsCredentials(
                ca_cert=self.tls_ca_cert,
                client_cert=self.tls_client_cert,
                client_key=crypto.decrypt(self.tls_client_key_encrypted),
            )
        return engine.Endpoint(url=self.docker_url, tls=tls)


class Instance(models.Model):
    """One replica of a deployment: a container on a host, holding `gpu_indexes` of its GPUs.

    Life cycle: pending (no host yet: not billed) → starting (GPUs reserved; image pulled if
    missing; container up, engine loading) → ready (serving) → stopping → stopped. An instance whose
    container crashed is stopped; one taken away by its host (host unreachable, engine restarted,
    container removed behind LLMHub's back) is lost. Stopped and lost instances are replaced by new
    rows. `started_at`..`stopped_at` is the billed interval: from the container's start to its end as
    the engine reports them (for a lost host, its last heartbeat). `gpu_type` and `num_gpus` are the
    billable facts, fixed when the instance is placed: billing reads them, never the deployment's fields.
    """

    class State(models.TextChoices):
        PENDING = "pending"
        STARTING = "starting"
        READY = "ready"
        STOPPING = "stopping"
        STOPPED = "stopped"
        LOST = "lost"

    LIVE_STATES = (State.PENDING, State.STARTING, State.READY, State.STOPPING)

    deployment = models.ForeignKey("deployments.Deployment", on_delete=models.CASCADE, related_name="instances")
    host = models.ForeignKey(Host, on_delete=models.PROTECT, null=True, blank=True, related_name="instances")
    gpu_indexes = ArrayField(models.PositiveSmallIntegerField(), default=list, blank=True)
    gpu_type = models.ForeignKey(
        GpuType, on_delete=models.PROTECT, null=True, blank=True, related_name="instances",
        help_text="Billable fact: the GPU type it was placed on (set at placement).",
    )  # fmt: skip
    num_gpus = models.PositiveSmallIntegerField(
        null=True, blank=True, help_text="Billable fact: GPUs it holds (set at placement)."
    )
    state = models.CharField(max_length=16, choices=State.choices, default=State.PENDING, db_index=True)
    container_id = models.CharField(max_length=80, blank=True)
    port = models.PositiveIntegerField(null=True, blank=True, help_text="Engine port published on the host.")
    restarts = models.PositiveSmallIntegerField(default=0)
    next_attempt_at = models.DateTimeField(null=True, blank=True, help_text="Backoff: no restart before.")
    last_error = models.TextField(blank=True, help_text="Operators' detail of the last failure; not shown to users.")
    engine_key_encrypted = models.TextField(
        default=engine_key_new, editable=False, help_text="Fernet ciphertext of the engine's API key; never shown."
    )
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    ready_at = models.DateTimeField(null=True, blank=True)
    stopping_at = models.DateTimeField(
        null=True, blank=True, help_text="When it was asked to stop (its in-flight requests drain first)."
    )
    stopped_at = models.DateTimeField(null=True, blank=True)
    crashed_at = models.DateTimeField(
        null=True, blank=True, help_text="When its container failed by itself (counts toward crash backoff)."
    )
    replace_requested_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="Its container no longer matches the deployment (e.g. LoRA adapters it cannot load at run "
        "time): a replacement starts, and it stops once the replacement is ready (make before break).",
    )

    class Meta:
        ordering = ["id"]

    def __str__(self):
        return f"instance {self.id} ({self.state})"

    @property
    def container_name(self) -> str:
        return f"{settings.CONTAINER_PREFIX}-{self.id}"

    @property
    def engine_key(self) -> str:
        """The engine's API key (``VLLM_API_KEY``), decrypted: the gateway, health checks and metrics scrape
        send it as ``Authorization: Bearer``; nothing else knows it."""
        return crypto.decrypt(self.engine_key_encrypted)

    @property
    def base_url(self) -> str:
        """``http://<host address>:<port>`` of the engine's OpenAI-compatible server."""
        return f"http://{self.host.address}:{self.port}"


class ImagePull(models.Model):
    """One host pulling one engine image, run by a worker task outside the reconcile pass.

    States: pulling (a worker streams the pull; `updated_at` moves with its progress, so a pull whose
    worker died is taken over once it is stale), done, failed (`error` says why; retried after a pause).
    """

    class State(models.TextChoices):
        PULLING = "pulling"
        DONE = "done"
        FAILED = "failed"

    host = models.ForeignKey(Host, on_delete=models.CASCADE, related_name="image_pulls")
    image = models.CharField(max_length=255)
    state = models.CharField(max_length=16, choices=State.choices, default=State.PULLING)
    attempt = models.PositiveIntegerField(default=1)
    progress = models.CharField(max_length=200, blank=True, help_text="e.g. '45% (92 MB of 204 MB)'.")
    error = models.TextField(blank=True)
    started_at = models.DateTimeField()
    updated_at = models.DateTimeField()

    class Meta:
        ordering = ["-updated_at"]
        constraints = [models.UniqueConstraint(fields=["host", "image"], name="image_pull_one_per_host_image")]

    def __str__(self):
        return f"{self.image} on {self.host_id} ({self.state})"
