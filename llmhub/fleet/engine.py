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
import hashlib
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import urlsplit

import docker
import docker.constants
import docker.tls
import requests
from docker.errors import APIError, DockerException, NotFound

ENGINE_PORT = 8000
LABEL_INSTANCE = "llmhub.instance"
LABEL_DEPLOYMENT = "llmhub.deployment"
LABEL_INSTALLATION = "llmhub.installation"
HF_CACHE_VOLUME = "llmhub-hf-cache"
HF_CACHE_PATH = "/root/.cache/huggingface"
DEFAULT_TLS_PORT = 2376  # Docker's registered port for its API over TLS
CALL_TIMEOUT_S = 15  # one API call: inspect, list, create, start, remove, logs
PULL_TIMEOUT_S = 600  # the longest pause between two chunks of a pull's progress stream
GPU_RESOURCE_KINDS = {"nvidia-gpu", "gpu", "nvidia.com/gpu"}  # GenericResources kinds counted as GPUs (any case)

_NO_TIME = "0001-01-01T00:00:00Z"  # Docker's zero time: the container never started / never finished
_STATUS_EXIT_RE = re.compile(r"^Exited \((-?\d+)\)")


class EngineError(Exception):
    """A host's Docker Engine refused or failed a request."""


class EngineUnreachable(EngineError):
    """A host's Docker Engine did not answer (connection refused or reset, timeout, TLS failure)."""


@dataclass(frozen=True)
class TlsCredentials:
    """PEM texts for Docker's TLS client authentication (``--tlsverify``): the CA that signed the
    engine's server certificate, and the client certificate and key the engine trusts."""

    ca_cert: str
    client_cert: str
    client_key: str

    def fingerprint(self) -> str:
        """sha256 over the three PEM texts: 16 hex chars, a cache key that never contains the key."""
        digest = hashlib.sha256("\0".join((self.ca_cert, self.client_cert, self.client_key)).encode())
        return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Endpoint:
    """Where a Docker Engine answers: ``unix:///var/run/docker.sock`` or ``tcp://host:port`` (+ TLS)."""

    url: str
    tls: TlsCredentials | None = None

    def __str__(self) -> str:
        return self.url


def endpoint_of(target: Endpoint | str) -> Endpoint:
    """`target` as an Endpoint (a URL string means no TLS)."""
    return target if isinstance(target, Endpoint) else Endpoint(url=target)


def url_validate(url: str, *, tls: bool = False) -> str:
    """Check a Docker Engine URL and return it normalised (``tcp://host`` gets port 2376).

    Accepted: ``unix:///absolute/path.sock`` and ``tcp://host[:port]`` (`tls` must then be True:
    Docker's API over TCP without TLS client certificates gives root on the host to anyone who can
    connect). Raises ValueError with a message an operator can act on.
    """
    url = (url or "").strip()
    parts = urlsplit(url)
    if parts.scheme == "unix":
        path = url[len("unix://") :]
        if not path.startswith("/") or parts.query or parts.fragment:
            raise ValueError(f"'{url}' is not a unix socket URL: write unix:///absolute/path/to/docker.sock")
        return url
    if parts.scheme == "tcp":
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"'{url}' has a bad port: write tcp://host:port, e.g. tcp://gpu-1.internal:2376") from None
        if not parts.hostname or parts.path not in ("", "/") or parts.query or parts.username:
            raise ValueError(f"'{url}' is not an engine address: write tcp://host:port, e.g. tcp://gpu-1.internal:2376")
        if not tls:
            raise ValueError(
                f"'{url}' is reached over TCP: give the TLS client certificates (CA, client certificate "
                "and key) of the engine's --tlsverify set-up; an engine without TLS is open to anyone"
            )
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        return f"tcp://{host}:{port or DEFAULT_TLS_PORT}"
    raise ValueError(f"'{url}' is not a Docker Engine URL: use unix:///path/to/docker.sock or tcp://host:port")


@dataclass(frozen=True)
class ContainerSpec:
    """Everything needed to start one instance's container.

    `args` are appended to the image's entrypoint (the vLLM OpenAI server); `device_ids` are GPU
    indexes as strings (None on CPU hosts: no device request); `publish_ip` is the host address the
    engine port is published on (a random free host port is chosen by Docker); `shm_size` is
    Docker's size string for /dev/shm (vLLM's workers exchange tensors through it).
    """

    name: str
    image: str
    args: list[str]
    labels: dict[str, str]
    environment: dict[str, str] = field(default_factory=dict)
    device_ids: list[str] | None = None
    publish_ip: str = "127.0.0.1"
    shm_size: str = "2g"


@dataclass(frozen=True)
class ContainerInfo:
    """What an engine reports about one container.

    `status` is Docker's: created, running, restarting, exited, dead… `exit_code` is set once it
    exited. `started_at` / `finished_at` (UTC, the engine's clock) come from a full inspection; a
    listing leaves them None. `oom_killed` is True when the kernel's OOM killer ended it.
    """

    id: str
    name: str
    status: str
    exit_code: int | None
    host_port: int | None
    labels: dict[str, str]
    started_at: datetime | None = None
    finished_at: datetime | None = None
    oom_killed: bool = False

    @property
    def running(self) -> bool:
        return self.status == "running"


@dataclass(frozen=True)
class EngineFacts:
    """What `GET /info` says about a host: the engine's version and the GPUs it advertises.

    `gpu_ids` are the named GPU resources (``NVIDIA-GPU=GPU-<uuid>``); `gpu_count` counts them plus
    discrete ones (``NVIDIA-GPU=8``); None when the engine advertises no GPUs (count them by hand).
    """

    server_version: str
    gpu_count: int | None
    gpu_ids: list[str]
    runtimes: list[str]
    # The engine's identity, the same at any URL it answers on: its `ID`, `Name` (host name) and
    # `DockerRootDir` from /info (engines of one machine image, or several dockerd on one machine, may
    # share an ID but not all three).
    engine_id: str = ""


@dataclass(frozen=True)
class PullProgress:
    """Progress of one image pull, summed over its layers (bytes as the registry reports them)."""

    done_bytes: int
    total_bytes: int
    layers_done: int
    layers_total: int

    @property
    def percent(self) -> int:
        """0–100 by bytes once sizes are known, by finished layers before."""
        if self.total_bytes:
            return min(100, self.done_bytes * 100 // self.total_bytes)
        return self.layers_done * 100 // self.layers_total if self.layers_total else 0


_clients: dict[tuple[str, str, int], docker.DockerClient] = {}
_clients_lock = threading.Lock()


def _tls_config(tls: TlsCredentials) -> docker.tls.TLSConfig:
    """A TLSConfig reading the PEMs from private files (mode 0600) named by their fingerprint."""
    directory = os.path.join(tempfile.gettempdir(), f"llmhub-engine-tls-{os.getuid()}", tls.fingerprint())
    os.makedirs(directory, mode=0o700, exist_ok=True)
    paths = {}
    for name, text in (("ca.pem", tls.ca_cert), ("cert.pem", tls.client_cert), ("key.pem", tls.client_key)):
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
            os.replace(path + ".tmp", path)
        paths[name] = path
    return docker.tls.TLSConfig(client_cert=(paths["cert.pem"], paths["key.pem"]), ca_cert=paths["ca.pem"], verify=True)


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


def run_kwargs(spec: ContainerSpec) -> dict:
    """The keyword arguments `containers.create` receives for `spec` (a pure function, tested directly)."""
    kwargs = {
        "image": spec.image,
        "command": spec.args,
        "name": spec.name,
        "labels": spec.labels,
        "environment": spec.environment,
        "detach": True,
        "ports": {f"{ENGINE_PORT}/tcp": (spec.publish_ip, None)},
        "volumes": {HF_CACHE_VOLUME: {"bind": HF_CACHE_PATH, "mode": "rw"}},
        "shm_size": spec.shm_size,
        # The reconcile loop owns restarts (with backoff and a crash limit), not Docker.
        "restart_policy": {"Name": "no"},
    }
    if spec.device_ids is not None:
        kwargs["device_requests"] = [
            docker.types.DeviceRequest(driver="nvidia", device_ids=spec.device_ids, capabilities=[["gpu"]])
        ]
    return kwargs


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


def container_run(target: Endpoint | str, spec: ContainerSpec) -> ContainerInfo:
    """Start the container `spec.name`, or return it if it already exists (idempotent by name).

    A created-but-never-started container of that name (a worker died between create and start) is
    started; a running or exited one is returned as it is. Never pulls: the image must be on the host
    (see `image_present` / `image_pull`). Returns the full inspection, with the published host port
    and the start time. Raises EngineError (e.g. missing image, name in use by a foreign container),
    EngineUnreachable.
    """
    client = client_for(target)
    with _engine_call(f"starting {spec.name}"):
        try:
            container = client.containers.get(spec.name)
        except NotFound:
            kwargs = run_kwargs(spec)
            kwargs.pop("detach")
            try:
                container = client.containers.create(**kwargs)
            except APIError as exc:
                if exc.status_code != 409:  # 409: a concurrent create made it first
                    raise
                container = client.containers.get(spec.name)
        if container.status == "created":
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
