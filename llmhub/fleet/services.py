"""Writes for the fleet: GPU types, hosts (register, cordon, drain, uncordon) and engine image pulls."""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from decimal import Decimal

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from llmhub import crypto
from llmhub.deployments.models import Deployment
from llmhub.deployments.timeline import event_record
from llmhub.queue import reconcile_soon, task_send

from . import engine, notices
from .models import GpuType, Host, ImagePull, Instance, bind_address_validate

log = logging.getLogger(__name__)

PULL_STALE_SECONDS = 120.0  # a pull whose progress has not moved for this long lost its worker: take it over
PULL_RETRY_SECONDS = 60.0  # a failed pull is tried again after this pause
PULL_PROGRESS_WRITE_SECONDS = 5.0  # at most one progress write per pull this often (besides milestones)
PULL_MILESTONES = (25, 50, 75)  # percent: an event each, for the deployments waiting on the pull


def gpu_type_ensure(
    *, name: str, memory_gb: int = 0, hourly_price: Decimal = Decimal("0"), uses_devices: bool = True
) -> GpuType:
    """The GPU type `name`, created with these values when missing (an existing one is left as it is)."""
    gpu_type, _ = GpuType.objects.get_or_create(
        name=name, defaults={"memory_gb": memory_gb, "hourly_price": hourly_price, "uses_devices": uses_devices}
    )
    return gpu_type


def host_register(
    *,
    name: str,
    docker_url: str,
    address: str,
    gpu_type: GpuType,
    engine_image: str,
    gpu_count: int | None = None,
    tls: engine.TlsCredentials | None = None,
    bind_address: str = "",
    host: Host | None = None,
) -> Host:
    """Create host `name`, or update its engine URL, TLS credentials, addresses, GPUs and engine image.

    The one way to register or change a host: the admin's host form and `manage.py host_add` both call
    it. `host` is the host to update when the caller edits one it already holds (the admin: an edit may
    rename it); None means the host named `name`, created when missing.

    `bind_address` is the IP the engine publishes engine ports on (loopback or a private interface:
    see `models.bind_address_validate`); `address` is what the gateway dials to reach them. An empty
    `bind_address` means `address`, which must then be such an IP (a host name or a public address is
    refused: give both).

    `docker_url` is ``unix:///path.sock`` or ``tcp://host[:port]`` (port 2376 when absent), the latter
    only with `tls` (Docker's ``--tlsverify`` client certificates; the key is stored encrypted; a
    ``unix://`` engine keeps none). The engine must answer (`GET /info`: its ID, so that one engine is
    never two hosts, and the GPUs it advertises as generic resources); `gpu_count` None means: use the
    advertised count, which must then be some. A new host starts `ready`; an existing one keeps its
    state. Raises ValidationError keyed by field (`docker_url`, `address`, `bind_address`, `gpu_count`,
    `name`, `engine_image`) with a message an operator can act on.
    """
    errors: dict[str, str] = {}
    name, address, engine_image = name.strip(), address.strip(), engine_image.strip()
    try:
        docker_url = engine.url_validate(docker_url, tls=tls is not None)
    except ValueError as exc:
        errors["docker_url"] = str(exc)
    if tls is not None and not (tls.ca_cert.strip() and tls.client_cert.strip() and tls.client_key.strip()):
        errors["docker_url"] = "TLS needs all three: the CA certificate, the client certificate and the client key."
    if not name:
        errors["name"] = "Give the host a name."
    if not address or "/" in address or " " in address:
        errors["address"] = f"'{address}' is not a host address: give the IP or DNS name the gateway reaches it by."
    try:
        bind_address = bind_address_validate(bind_address.strip() or address)
    except ValueError as exc:
        errors["bind_address"] = (
            str(exc)
            if bind_address.strip()
            else (
                f"{exc}. Give the bind address (host_add --bind-address): the IP of the host's private interface "
                "that the gateway reaches."
            )
        )
    if not engine_image:
        errors["engine_image"] = "Name the engine image the host runs instances from (e.g. vllm/vllm-openai:v0.10.0)."
    if gpu_count is not None and gpu_count < 1:
        errors["gpu_count"] = f"A host needs at least 1 GPU (or engine slot on CPU hosts), not {gpu_count}."
    if errors:
        raise ValidationError(errors)
    if docker_url.startswith("unix://"):
        tls = None  # a local socket: no TLS, and no stale credentials kept
    try:
        facts = engine.engine_facts(engine.Endpoint(url=docker_url, tls=tls))
    except engine.EngineError as exc:
        raise ValidationError({"docker_url": f"Cannot reach the engine: {exc}"}) from exc
    if gpu_count is None:
        if facts.gpu_count is None:
            raise ValidationError(
                {
                    "gpu_count": f"The engine at {docker_url} advertises no GPUs (dockerd --node-generic-resource "
                    "NVIDIA-GPU=<uuid>): give their number with --gpus N (host_add) or in the GPU count field."
                }
            )
        gpu_count = facts.gpu_count
    engine_id = facts.engine_id
    current = host.name if host is not None and host.pk else name
    if conflict := host_engine_conflict(name=current, docker_url=docker_url, engine_id=engine_id):
        raise ValidationError({"docker_url": conflict})
    values = {
        "name": name,
        "docker_url": docker_url,
        "tls_ca_cert": tls.ca_cert if tls else "",
        "tls_client_cert": tls.client_cert if tls else "",
        "tls_client_key_encrypted": crypto.encrypt(tls.client_key) if tls else "",
        "address": address,
        "bind_address": bind_address,
        "gpu_type": gpu_type,
        "gpu_count": gpu_count,
        "engine_image": engine_image,
        **({"engine_id": engine_id} if engine_id else {}),
    }
    if host is None:
        host = Host.objects.filter(name=name).first() or Host()
    elif host.pk and name != host.name and Host.objects.filter(name=name).exclude(pk=host.pk).exists():
        raise ValidationError({"name": f"There is already a host named {name}."})
    for field, value in values.items():
        setattr(host, field, value)
    try:
        with transaction.atomic():
            host.save(update_fields=list(values) if host.pk else None)  # the state is the heartbeat's to write
    except IntegrityError as exc:  # a concurrent registration of the same engine won
        raise ValidationError({"docker_url": "This Docker Engine was just registered as another host."}) from exc
    return host


def host_engine_conflict(*, name: str, docker_url: str, engine_id: str) -> str | None:
    """Why registering host `name` at `docker_url` (engine ID `engine_id`, "" when unknown) would make
    one Docker Engine two hosts (GPUs booked twice, each host's orphan sweep removing the other's
    containers), or None. Another host with the same URL or the same engine ID is a conflict."""
    same = Q(docker_url=docker_url) | (Q(engine_id=engine_id) if engine_id else Q(pk__in=[]))
    other = Host.objects.filter(same).exclude(name=name).first()
    if other is None:
        return None
    return (
        f"This Docker Engine is already registered as host {other.name} ({'same engine ID' if engine_id else 'same URL'}): "
        "one engine is one host; update that host instead."
    )


def owner_cache_prune(*, host: Host, user) -> bool:
    """Remove `user`'s Hugging Face cache volume on `host` (downloaded weights; the next instance downloads
    them again). Returns False when there was none.

    Refused (ValidationError) while a live instance of the user is placed on the host, and by the
    engine when a container still uses the volume (EngineError turned into ValidationError). Stops nothing.
    """
    if Instance.objects.filter(host=host, deployment__user=user, state__in=Instance.LIVE_STATES).exists():
        raise ValidationError(
            f"{user.username} has a live instance on {host.name}: stop or move it first (the cache is in use)."
        )
    name = engine.cache_volume_name(settings.CONTAINER_PREFIX, user.id)
    try:
        return engine.volume_remove(host.endpoint, name)
    except engine.EngineError as exc:
        raise ValidationError(f"{host.name} kept {user.username}'s cache: {exc}") from exc


def _host_transition(host: Host, *, to: str, allowed_from: tuple[str, ...], verb: str) -> bool:
    """Move `host` to state `to` if it is in one of `allowed_from` (a conditional claim).

    Returns False when it already is in `to`. Raises ValidationError naming the state that forbids it.
    """
    if Host.objects.filter(id=host.id, state__in=allowed_from).update(state=to):
        host.state = to
        log.info("host %s: %s", host.name, to)
        return True
    current = Host.objects.values_list("state", flat=True).get(id=host.id)
    host.state = current
    if current == to:
        return False
    if current == Host.State.UNREACHABLE:
        raise ValidationError(
            f"Host {host.name} is unreachable: it cannot be {verb} until its engine answers again "
            "(it then returns to its earlier state)."
        )
    raise ValidationError(f"Host {host.name} is {current}: it cannot be {verb}.")


def host_cordon(*, host: Host) -> bool:
    """Cordon `host`: it keeps its instances and takes no new ones (also stops a drain where it is).

    Returns False when it was cordoned already. Raises ValidationError when it is unreachable.
    """
    return _host_transition(
        host, to=Host.State.CORDONED, allowed_from=(Host.State.READY, Host.State.DRAINING), verb="cordoned"
    )


def host_drain(*, host: Host) -> bool:
    """Drain `host`: each of its instances gets a replacement on another host, and is stopped once
    the replacement serves (make before break); the host is cordoned when none are left.

    Returns False when it was draining already. Raises ValidationError when it is unreachable.
    """
    return _host_transition(
        host, to=Host.State.DRAINING, allowed_from=(Host.State.READY, Host.State.CORDONED), verb="drained"
    )


def host_uncordon(*, host: Host) -> bool:
    """Make a cordoned or draining `host` ready for new instances again (a drain stops where it is).

    Returns False when it was ready already. Raises ValidationError when it is unreachable.
    """
    return _host_transition(
        host, to=Host.State.READY, allowed_from=(Host.State.CORDONED, Host.State.DRAINING), verb="uncordoned"
    )


def image_pull_request(*, host: Host, image: str) -> tuple[ImagePull, bool]:
    """Make sure a worker pulls `image` onto `host`; returns (the pull, whether this call started it).

    A new pull, a failed one older than PULL_RETRY_SECONDS, a done one (the image is missing again)
    and a stale one (no progress for PULL_STALE_SECONDS: its worker died) are claimed with a
    conditional update and a task is enqueued once the transaction commits; a fresh pull in progress
    or a recent failure is returned as it is (the caller waits, or fails the instance with `error`).
    """
    now = timezone.now()
    pull, created = ImagePull.objects.get_or_create(
        host=host, image=image, defaults={"started_at": now, "updated_at": now}
    )
    if not created:
        takeover = (
            Q(state=ImagePull.State.DONE)
            | Q(state=ImagePull.State.FAILED, updated_at__lt=now - timedelta(seconds=PULL_RETRY_SECONDS))
            | Q(state=ImagePull.State.PULLING, updated_at__lt=now - timedelta(seconds=PULL_STALE_SECONDS))
        )
        claimed = (
            ImagePull.objects.filter(takeover, id=pull.id, attempt=pull.attempt)
            .update(state=ImagePull.State.PULLING, attempt=pull.attempt + 1, progress="", error="",
                    started_at=now, updated_at=now)
        )  # fmt: skip
        pull.refresh_from_db()
        if not claimed:
            return pull, False
    task_send("workers.tasks.image_pull", pull.id, pull.attempt)  # a stale attempt's task: a no-op
    return pull, True


def _waiting_deployments(pull: ImagePull) -> list[Deployment]:
    """Deployments with an instance placed on the pull's host that waits for its container."""
    ids = Instance.objects.filter(host_id=pull.host_id, state=Instance.State.STARTING, container_id="").values(
        "deployment_id"
    )
    return list(Deployment.objects.filter(id__in=ids).select_related("user"))


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.0f} MB"


def image_pull_run(*, pull_id: int, attempt: int) -> str:
    """Run pull `pull_id` (attempt `attempt`) on its host's engine, as a worker task does.

    Streams the engine's progress into the pull row (at most every PULL_PROGRESS_WRITE_SECONDS) and
    into the events of the deployments waiting on it (at 25, 50 and 75 %, then "pulled" with the
    time it took), marks the pull done or failed (with the engine's error), and asks for a reconcile
    of the waiting deployments. Returns the pull's final state; a pull that is not this attempt's
    or not pulling any more is left alone (returns its state).
    """
    pull = ImagePull.objects.select_related("host").filter(id=pull_id).first()
    if pull is None or pull.attempt != attempt or pull.state != ImagePull.State.PULLING:
        return pull.state if pull else "gone"
    host = pull.host
    started = time.monotonic()
    reached: set[int] = set()
    last_write = 0.0

    def on_progress(p: engine.PullProgress) -> None:
        nonlocal last_write
        percent = p.percent
        text = f"{percent}% ({_megabytes(p.done_bytes)} of {_megabytes(p.total_bytes)})"
        milestones = [m for m in PULL_MILESTONES if percent >= m and m not in reached]
        if not milestones and time.monotonic() - last_write < PULL_PROGRESS_WRITE_SECONDS:
            return
        last_write = time.monotonic()
        ImagePull.objects.filter(id=pull.id, attempt=attempt).update(progress=text, updated_at=timezone.now())
        if milestones:
            reached.update(milestones)
            for deployment in _waiting_deployments(pull):
                event_record(deployment=deployment, kind="pulling", message=notices.image_pulling(text))

    try:
        engine.image_pull(host.endpoint, pull.image, progress=on_progress)
    except engine.EngineError as exc:
        ImagePull.objects.filter(id=pull.id, attempt=attempt).update(
            state=ImagePull.State.FAILED, error=str(exc), updated_at=timezone.now()
        )
        log.warning("host %s: %s", host.name, exc)
        for deployment in _waiting_deployments(pull):
            reconcile_soon(deployment.id)
        return ImagePull.State.FAILED
    seconds = time.monotonic() - started
    ImagePull.objects.filter(id=pull.id, attempt=attempt).update(
        state=ImagePull.State.DONE, progress="100%", updated_at=timezone.now()
    )
    for deployment in _waiting_deployments(pull):
        event_record(deployment=deployment, kind="pulled", message=notices.image_pulled(seconds))
        reconcile_soon(deployment.id)
    return ImagePull.State.DONE
