"""The one seam to Docker Engine: every call LLMHub makes to a host's engine is in this module or its
siblings, whose names it re-exports: `engine_endpoint` (addresses, TLS, the cached client, failures),
`engine_spec` (what a container is started with), `engine_images` (image presence, pulls, builds and
imports). No other module imports the docker SDK (import-linter contract "one-docker-seam").

Follows the Docker SDK for Python (docker-py 7) documented API and the Docker Engine API it wraps:
`containers.create` + `start` with `device_requests` (docker.types.DeviceRequest, driver "nvidia")
for GPUs, `ports` to publish the engine's port, labels `llmhub.instance` / `llmhub.deployment` /
`llmhub.installation` to find our containers; `GET /containers/json` (one call per host) to list
them; `POST /images/create` streamed for pulls with progress and `POST /build` for builds
(`engine_images`); `GET /info` for the GPUs an engine advertises (``GenericResources``, dockerd
``--node-generic-resource NVIDIA-GPU=<id>``).

An engine is addressed by an `Endpoint`: its URL (``unix:///path`` or ``tcp://host:port``) and, for
``tcp://``, the TLS client certificates Docker's ``--tlsverify`` mode asks for. Functions also accept
a bare URL string for engines without TLS. Failures raise `EngineError`; an engine that does not
answer at all (refused, timed out, TLS handshake failed) raises its subclass `EngineUnreachable`.
Tests may replace this module's functions; nothing else talks to Docker.
"""

from __future__ import annotations

import io
import re
import tarfile
from datetime import UTC, datetime

import docker
from docker.errors import APIError, NotFound

from . import engine_spec  # noqa: F401 - the guard and its paths
from .engine_endpoint import (  # noqa: F401 - re-exported: the seam's names
    CALL_TIMEOUT_S,
    DEFAULT_TLS_PORT,
    TLS_DIR_NAME,
    Endpoint,
    EngineError,
    EngineUnreachable,
    TlsCredentials,
    client_for,
    endpoint_of,
    local_engine,
    url_validate,
)
from .engine_endpoint import engine_call as _engine_call
from .engine_endpoint import tls_config as _tls_config  # noqa: F401 - tests read it here
from .engine_images import (  # noqa: F401 - re-exported: the seam's names
    BUILD_TIMEOUT_S,
    PULL_TIMEOUT_S,
    ImageBuildError,
    image_build,
    image_import,
    image_present,
    image_pull,
)
from .engine_spec import (  # noqa: F401 - re-exported: the seam's names
    ENGINE_PORT,
    HF_CACHE_PATH,
    ICC_OPTION,
    LABEL_DEPLOYMENT,
    LABEL_INSTALLATION,
    LABEL_INSTANCE,
    LABEL_OWNER,
    LABEL_OWNER_ID,
    ContainerInfo,
    ContainerSpec,
    EngineFacts,
    PullProgress,
    cache_volume_name,
    network_name,
    run_kwargs,
)

GPU_RESOURCE_KINDS = {"nvidia-gpu", "gpu", "nvidia.com/gpu"}  # GenericResources kinds counted as GPUs (any case)

_NO_TIME = "0001-01-01T00:00:00Z"  # Docker's zero time: the container never started / never finished
_STATUS_EXIT_RE = re.compile(r"^Exited \((-?\d+)\)")


def _time(text: str | None) -> datetime | None:
    """Docker's RFC 3339 time with nanoseconds (``2026-11-21T20:41:53.084491485Z``) in UTC, None for zero."""
    if not text or text.startswith("0001-01-01"):
        return None
    match = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$", text)
    if not match:
        return None
    base, fraction, zone = match.groups()
    micro = (fraction or "0")[:6].ljust(6, "0")
    zone = "+00:00" if zone == "Z" else zone
    return datetime.fromisoformat(f"{base}.{micro}{zone}").astimezone(UTC)


def _info(attrs: dict) -> ContainerInfo:
    """ContainerInfo from a full inspection (`GET /containers/<id>/json`)."""
    state = attrs.get("State", {})
    bindings = (attrs.get("NetworkSettings", {}).get("Ports") or {}).get(f"{ENGINE_PORT}/tcp") or []
    port = int(bindings[0]["HostPort"]) if bindings else None
    status = state.get("Status", "")
    return ContainerInfo(
        id=attrs["Id"],
        name=attrs.get("Name", "").lstrip("/"),
        status=status,
        exit_code=state.get("ExitCode") if status in ("exited", "dead") else None,
        host_port=port,
        labels=attrs.get("Config", {}).get("Labels") or {},
        started_at=_time(state.get("StartedAt")),
        finished_at=_time(state.get("FinishedAt")),
        oom_killed=bool(state.get("OOMKilled")),
    )


def _summary(item: dict) -> ContainerInfo:
    """ContainerInfo from one entry of a listing (`GET /containers/json`): no times."""
    port = next(
        (
            p.get("PublicPort")
            for p in item.get("Ports") or []
            if p.get("PrivatePort") == ENGINE_PORT and p.get("PublicPort")
        ),
        None,
    )
    status = item.get("State", "")
    match = _STATUS_EXIT_RE.match(item.get("Status", ""))
    return ContainerInfo(
        id=item["Id"],
        name=(item.get("Names") or ["/"])[0].lstrip("/"),
        status=status,
        exit_code=int(match.group(1)) if match and status in ("exited", "dead") else None,
        host_port=port,
        labels=item.get("Labels") or {},
    )


def _tar(files: dict[str, bytes]) -> bytes:
    """A tar archive of `files` ({absolute path: bytes}) to extract at ``/`` with `put_archive`, with an
    entry for each parent directory (0755) so that they are made when missing; files are read-only (0444)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        made: set[str] = set()
        for path, data in files.items():
            parts = path.strip("/").split("/")
            for depth in range(1, len(parts)):
                directory = "/".join(parts[:depth])
                if directory not in made:
                    made.add(directory)
                    entry = tarfile.TarInfo(directory)
                    entry.type, entry.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(entry)
            entry = tarfile.TarInfo("/".join(parts))
            entry.size, entry.mode = len(data), 0o444
            tar.addfile(entry, io.BytesIO(data))
    return buffer.getvalue()


def _network_ensure(client: docker.DockerClient, spec: ContainerSpec) -> None:
    """Create the spec's bridge network (inter-container traffic off, labelled) unless it exists."""
    if not spec.network or client.networks.list(names=[spec.network]):
        return
    labels = {LABEL_INSTALLATION: spec.labels.get(LABEL_INSTALLATION, "")}
    try:
        client.networks.create(spec.network, driver="bridge", options={ICC_OPTION: "false"}, labels=labels)
    except APIError as exc:
        if exc.status_code != 409:  # 409: a concurrent start made it first
            raise


def _volume_ensure(client: docker.DockerClient, spec: ContainerSpec) -> None:
    """Create the spec's cache volume with its installation and owner labels unless it exists (Docker
    copies the image's content at the mount point into an empty volume on its first mount)."""
    if not spec.cache_volume:
        return
    try:
        client.api.inspect_volume(spec.cache_volume)
    except NotFound:
        keys = (LABEL_INSTALLATION, LABEL_OWNER, LABEL_OWNER_ID)
        client.volumes.create(spec.cache_volume, labels={k: spec.labels[k] for k in keys if k in spec.labels})


def container_run(target: Endpoint | str, spec: ContainerSpec) -> ContainerInfo:
    """Start the container `spec.name`, or return it if it already exists (idempotent by name).

    Its network and cache volume are created first when missing, and `spec.files` are copied in
    before it starts. A created-but-never-started container of that name (a worker died between
    create and start) is given its files and started; a running or exited one is returned as it is.
    Never pulls: the image must be on the host (see `image_present` / `image_pull`). Returns the full
    inspection, with the published host port and the start time. Raises EngineError (e.g. missing
    image, name in use by a foreign container), EngineUnreachable.
    """
    client = client_for(target)
    with _engine_call(f"starting {spec.name}"):
        try:
            container = client.containers.get(spec.name)
        except NotFound:
            _network_ensure(client, spec)
            _volume_ensure(client, spec)
            kwargs = run_kwargs(spec)
            kwargs.pop("detach")
            try:
                container = client.containers.create(**kwargs)
            except APIError as exc:
                if exc.status_code != 409:  # 409: a concurrent create made it first
                    raise
                container = client.containers.get(spec.name)
        if container.status == "created":
            if spec.files:
                container.put_archive("/", _tar(spec.files))
            container.start()
        container.reload()
        return _info(container.attrs)


def container_get(target: Endpoint | str, name: str) -> ContainerInfo | None:
    """Full inspection of container `name`, or None when it does not exist. Raises EngineError, EngineUnreachable."""
    client = client_for(target)
    with _engine_call(f"inspecting {name}"):
        try:
            return _info(client.api.inspect_container(name))
        except NotFound:
            return None


def container_remove(target: Endpoint | str, name: str) -> bool:
    """Stop (SIGKILL) and remove container `name`. Returns False when it did not exist.

    Raises EngineError, EngineUnreachable.
    """
    client = client_for(target)
    with _engine_call(f"removing {name}"):
        try:
            client.api.remove_container(name, force=True)
            return True
        except NotFound:
            return False


def volume_remove(target: Endpoint | str, name: str) -> bool:
    """Remove the named volume `name`. Returns False when it did not exist.

    Raises EngineError when a container (running or not) still uses it, EngineUnreachable.
    """
    client = client_for(target)
    with _engine_call(f"removing volume {name}"):
        try:
            client.api.remove_volume(name)
            return True
        except NotFound:
            return False


def container_logs(target: Endpoint | str, name: str, *, tail: int = 40) -> str:
    """The last `tail` lines of the container's stdout+stderr ('' when it does not exist).

    Raises EngineError, EngineUnreachable.
    """
    client = client_for(target)
    with _engine_call(f"reading logs of {name}"):
        try:
            raw = client.api.logs(name, stdout=True, stderr=True, tail=tail)
        except NotFound:
            return ""
    return raw.decode("utf-8", errors="replace")


def containers_list(target: Endpoint | str, *, installation: str) -> list[ContainerInfo]:
    """Every container (running or not) on the host labelled as an instance of `installation`.

    One API call (a listing: no start/finish times; inspect a container for those).
    Raises EngineError, EngineUnreachable.
    """
    client = client_for(target)
    labels = [LABEL_INSTANCE, f"{LABEL_INSTALLATION}={installation}"]
    with _engine_call(f"listing containers on {endpoint_of(target).url}"):
        items = client.api.containers(all=True, filters={"label": labels})
    return [_summary(item) for item in items]


def engine_facts(target: Endpoint | str) -> EngineFacts:
    """The engine's version and the GPUs it advertises (`GET /info`). Raises EngineError, EngineUnreachable."""
    client = client_for(target)
    with _engine_call(f"reading facts of {endpoint_of(target).url}"):
        info = client.info()
    ids, count = [], 0
    for resource in info.get("GenericResources") or []:
        named, discrete = resource.get("NamedResourceSpec"), resource.get("DiscreteResourceSpec")
        if named and str(named.get("Kind", "")).lower() in GPU_RESOURCE_KINDS:
            ids.append(str(named.get("Value", "")))
            count += 1
        elif discrete and str(discrete.get("Kind", "")).lower() in GPU_RESOURCE_KINDS:
            count += int(discrete.get("Value", 0))
    return EngineFacts(
        server_version=str(info.get("ServerVersion", "")),
        gpu_count=count or None,
        gpu_ids=ids,
        runtimes=sorted((info.get("Runtimes") or {}).keys()),
        engine_id=f"{info['ID']} {info.get('Name', '')}:{info.get('DockerRootDir', '')}" if info.get("ID") else "",
    )


def container_death_seen(target: Endpoint | str, container_id: str, *, finished_at: datetime) -> bool:
    """True when the engine's own event log holds the ``die`` event of `container_id` around
    `finished_at` (the container ended while this engine process ran); False when it does not.

    Docker keeps its events (`GET /events`) in the daemon's memory only: an engine restarted after
    the container ended (its shutdown stopped the container) has no record of it. Asks for the
    window finished_at - 5 s .. finished_at + 2 s (the engine's clock; the answer waits until the
    window has passed). Raises EngineError, EngineUnreachable.
    """
    client = client_for(target)
    since, until = finished_at.timestamp() - 5, finished_at.timestamp() + 2
    with _engine_call(f"reading events of {container_id[:12]}"):
        events = client.api.events(
            since=int(since), until=int(until) + 1, filters={"container": [container_id], "event": ["die"]}, decode=True
        )
        return any(True for _ in events)


def engine_ping(target: Endpoint | str) -> bool:
    """True when the host's Docker Engine answers `GET /_ping`."""
    try:
        client = client_for(target)
        with _engine_call("ping"):
            return bool(client.ping())
    except EngineError:
        return False
