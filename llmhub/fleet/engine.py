"""The one seam to Docker Engine: every call LLMHub makes to a host's engine is in this module.

Follows the Docker SDK for Python (docker-py 7) documented API and the Docker Engine API it wraps:
`containers.create` + `start` with `device_requests` (docker.types.DeviceRequest, driver "nvidia")
for GPUs, `ports` to publish the engine's port, labels `llmhub.instance` / `llmhub.deployment` /
`llmhub.installation` to find our containers; `GET /containers/json` (one call per host) to list
them; `POST /images/create` streamed for pulls with progress; `GET /info` for the GPUs an engine
advertises (``GenericResources``, dockerd ``--node-generic-resource NVIDIA-GPU=<id>``).

An engine is addressed by an `Endpoint`: its URL (``unix:///path`` or ``tcp://host:port``) and, for
``tcp://``, the TLS client certificates Docker's ``--tlsverify`` mode asks for. Functions also accept
a bare URL string for engines without TLS. Failures raise `EngineError`; an engine that does not
answer at all (refused, timed out, TLS handshake failed) raises its subclass `EngineUnreachable`.
Tests may replace this module's functions; nothing else talks to Docker.
"""

from __future__ import annotations

import contextlib
import io
import re
import tarfile
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import docker
import docker.constants
import requests
from docker.errors import APIError, DockerException, NotFound

from . import engine_spec  # noqa: F401 - the guard and its paths
from .engine_endpoint import (  # noqa: F401 - re-exported: the seam's names
    DEFAULT_TLS_PORT,
    TLS_DIR_NAME,
    Endpoint,
    EngineError,
    EngineUnreachable,
    TlsCredentials,
    endpoint_of,
    url_validate,
)
from .engine_endpoint import tls_config as _tls_config
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

CALL_TIMEOUT_S = 15  # one API call: inspect, list, create, start, remove, logs
PULL_TIMEOUT_S = 600  # the longest pause between two chunks of a pull's progress stream
GPU_RESOURCE_KINDS = {"nvidia-gpu", "gpu", "nvidia.com/gpu"}  # GenericResources kinds counted as GPUs (any case)

_NO_TIME = "0001-01-01T00:00:00Z"  # Docker's zero time: the container never started / never finished
_STATUS_EXIT_RE = re.compile(r"^Exited \((-?\d+)\)")


_clients: dict[tuple[str, str, int], docker.DockerClient] = {}
_clients_lock = threading.Lock()


def client_for(target: Endpoint | str, *, timeout: int = CALL_TIMEOUT_S) -> docker.DockerClient:
    """A cached Docker client for `target` whose calls give up after `timeout` seconds.

    Raises EngineUnreachable when the engine cannot be reached to agree on an API version, EngineError
    when the TLS material is unusable.
    """
    endpoint = endpoint_of(target)
    key = (endpoint.url, endpoint.tls.fingerprint() if endpoint.tls else "", timeout)
    with _clients_lock:
        client = _clients.get(key)
    if client is not None:
        return client
    with _engine_call(f"connecting to Docker Engine at {endpoint.url}"):
        try:
            tls = _tls_config(endpoint.tls) if endpoint.tls else False
        except EngineError:
            raise
        except (OSError, docker.errors.TLSParameterError) as exc:
            raise EngineError(f"the TLS certificates for {endpoint.url} are unusable: {exc}") from exc
        # The API version is the engine's own (as docker-py's "auto"), asked for by a session that does
        # not trust the environment: requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE replace the
        # engine's CA on every request otherwise, and TLS to the engine fails on machines that set them.
        probe = docker.APIClient(
            base_url=endpoint.url, tls=tls, timeout=timeout, version=docker.constants.DEFAULT_DOCKER_API_VERSION
        )
        probe.trust_env = False
        try:
            api_version = probe.version(api_version=False)["ApiVersion"]
        finally:
            probe.close()
        client = docker.DockerClient(base_url=endpoint.url, tls=tls, timeout=timeout, version=api_version)
        client.api.trust_env = False
    with _clients_lock:
        _clients.setdefault(key, client)
        return _clients[key]


@contextlib.contextmanager
def _engine_call(what: str) -> Iterator[None]:
    """Turn docker-py and requests failures into EngineError / EngineUnreachable naming `what`."""
    try:
        yield
    except EngineError:
        raise
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError, TimeoutError) as exc:
        raise EngineUnreachable(f"{what}: the engine did not answer ({exc})") from exc
    except APIError as exc:
        raise EngineError(f"{what} failed: {exc.explanation or exc}") from exc
    except (DockerException, requests.exceptions.RequestException, OSError) as exc:
        if "connection" in str(exc).lower() or "timed out" in str(exc).lower():
            raise EngineUnreachable(f"{what}: the engine did not answer ({exc})") from exc
        raise EngineError(f"{what} failed: {exc}") from exc


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


def image_present(target: Endpoint | str, image: str) -> bool:
    """True when the host's engine has `image` (name:tag) locally. Raises EngineError, EngineUnreachable."""
    client = client_for(target)
    with _engine_call(f"inspecting image {image}"):
        try:
            client.api.inspect_image(image)
            return True
        except NotFound:
            return False


def image_pull(target: Endpoint | str, image: str, *, progress: Callable[[PullProgress], None] | None = None) -> None:
    """Pull `image` (``[registry/]name[:tag]``, tag "latest" when absent) onto the host; blocks until done.

    `progress` is called after every progress message of the engine's stream (`POST /images/create`)
    with bytes downloaded so far over all layers. Raises EngineError when the registry or the engine
    refuses (unknown image, no registry), EngineUnreachable.
    """
    repository, tag = _split_image(image)
    client = client_for(target, timeout=PULL_TIMEOUT_S)
    layers: dict[str, tuple[int, int]] = {}  # layer id → (done bytes, total bytes)
    finished: set[str] = set()
    with _engine_call(f"pulling {image}"):
        for message in client.api.pull(repository, tag=tag, stream=True, decode=True):
            if "error" in message:
                detail = (message.get("errorDetail") or {}).get("message") or message["error"]
                raise EngineError(f"pulling {image} failed: {detail}")
            layer, status = message.get("id"), message.get("status", "")
            if not layer or layer == tag:
                continue
            detail = message.get("progressDetail") or {}
            done, total = layers.get(layer, (0, 0))
            if status == "Downloading" and detail.get("total"):
                done, total = detail.get("current", done), detail["total"]
            elif status in ("Download complete", "Verifying Checksum", "Extracting", "Pull complete", "Already exists"):
                done = total
            layers[layer] = (done, total)
            if status in ("Pull complete", "Already exists"):
                finished.add(layer)
            if progress is not None:
                progress(
                    PullProgress(
                        done_bytes=sum(d for d, _ in layers.values()),
                        total_bytes=sum(t for _, t in layers.values()),
                        layers_done=len(finished),
                        layers_total=len(layers),
                    )
                )


def _split_image(image: str) -> tuple[str, str]:
    """``registry:5000/name:tag`` → (``registry:5000/name``, ``tag``); the tag defaults to "latest"."""
    name, _, tag = image.rpartition(":")
    if not name or "/" in tag:
        return image, "latest"
    return name, tag


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
