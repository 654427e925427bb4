"""The one seam to Docker Engine: every call LLMHub makes to a host's engine is in this module.

Follows the Docker SDK for Python (docker-py 7) documented API: `containers.run` with
`device_requests` (docker.types.DeviceRequest, driver "nvidia") for GPUs, `ports` to publish the
engine's port, labels `llmhub.instance` / `llmhub.deployment` to find our containers.
Tests may replace this module's functions; nothing else talks to Docker.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import docker
from docker.errors import APIError, DockerException, NotFound

ENGINE_PORT = 8000
LABEL_INSTANCE = "llmhub.instance"
LABEL_DEPLOYMENT = "llmhub.deployment"
LABEL_INSTALLATION = "llmhub.installation"
HF_CACHE_VOLUME = "llmhub-hf-cache"
HF_CACHE_PATH = "/root/.cache/huggingface"


class EngineError(Exception):
    """A host's Docker Engine refused or failed a request, or could not be reached."""


@dataclass(frozen=True)
class ContainerSpec:
    """Everything needed to start one instance's container.

    `args` are appended to the image's entrypoint (the vLLM OpenAI server); `device_ids` are GPU
    indexes as strings (None on CPU hosts: no device request); `publish_ip` is the host address the
    engine port is published on (a random free host port is chosen by Docker).
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
    """What an engine reports about one container. `status` is Docker's: created, running, exited…"""

    id: str
    name: str
    status: str
    exit_code: int | None
    host_port: int | None
    labels: dict[str, str]

    @property
    def running(self) -> bool:
        return self.status == "running"


_clients: dict[str, docker.DockerClient] = {}
_clients_lock = threading.Lock()


def client_for(docker_url: str) -> docker.DockerClient:
    """A cached Docker client for `docker_url` (``unix://…`` or ``tcp://…``). Raises EngineError."""
    with _clients_lock:
        client = _clients.get(docker_url)
        if client is None:
            try:
                client = docker.DockerClient(base_url=docker_url, timeout=60)
            except DockerException as exc:
                raise EngineError(f"cannot reach Docker Engine at {docker_url}: {exc}") from exc
            _clients[docker_url] = client
        return client


def run_kwargs(spec: ContainerSpec) -> dict:
    """The keyword arguments `containers.run` receives for `spec` (a pure function, tested directly)."""
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


def _info(container) -> ContainerInfo:
    attrs = container.attrs
    state = attrs.get("State", {})
    bindings = (attrs.get("NetworkSettings", {}).get("Ports") or {}).get(f"{ENGINE_PORT}/tcp") or []
    port = int(bindings[0]["HostPort"]) if bindings else None
    return ContainerInfo(
        id=container.id,
        name=container.name,
        status=state.get("Status", container.status),
        exit_code=state.get("ExitCode") if state.get("Status") == "exited" else None,
        host_port=port,
        labels=attrs.get("Config", {}).get("Labels") or {},
    )


def container_run(docker_url: str, spec: ContainerSpec) -> ContainerInfo:
    """Start the container `spec.name`, or return it if it already exists (idempotent by name).

    A created-but-stopped container of that name is started. Returns its info with the published
    host port. Raises EngineError when the engine fails (e.g. missing image).
    """
    client = client_for(docker_url)
    try:
        try:
            container = client.containers.get(spec.name)
        except NotFound:
            try:
                container = client.containers.run(**run_kwargs(spec))
            except APIError as exc:
                if exc.status_code != 409:  # 409: a concurrent run created it first
                    raise
                container = client.containers.get(spec.name)
        if container.status == "created":
            container.start()
        container.reload()
        return _info(container)
    except DockerException as exc:
        raise EngineError(f"starting {spec.name} failed: {exc}") from exc


def image_present(docker_url: str, image: str) -> bool:
    """True when the host's engine has `image` (name:tag) locally. Raises EngineError."""
    try:
        client_for(docker_url).images.get(image)
        return True
    except NotFound:
        return False
    except DockerException as exc:
        raise EngineError(f"inspecting image {image} failed: {exc}") from exc


def image_pull(docker_url: str, image: str) -> None:
    """Pull `image` (name:tag) onto the host from its registry; blocks until done. Raises EngineError."""
    try:
        client_for(docker_url).images.pull(image)  # docker-py parses name:tag (tag "latest" when absent)
    except DockerException as exc:
        raise EngineError(f"pulling {image} failed: {exc}") from exc


def container_get(docker_url: str, name: str) -> ContainerInfo | None:
    """Info on container `name`, or None when it does not exist. Raises EngineError."""
    try:
        return _info(client_for(docker_url).containers.get(name))
    except NotFound:
        return None
    except DockerException as exc:
        raise EngineError(f"inspecting {name} failed: {exc}") from exc


def container_restart(docker_url: str, name: str) -> ContainerInfo:
    """Start an exited container again (same name, port may change). Raises EngineError."""
    try:
        container = client_for(docker_url).containers.get(name)
        container.restart(timeout=10)
        container.reload()
        return _info(container)
    except DockerException as exc:
        raise EngineError(f"restarting {name} failed: {exc}") from exc


def container_remove(docker_url: str, name: str) -> bool:
    """Stop and remove container `name`. Returns False when it did not exist. Raises EngineError."""
    try:
        client_for(docker_url).containers.get(name).remove(force=True)
        return True
    except NotFound:
        return False
    except DockerException as exc:
        raise EngineError(f"removing {name} failed: {exc}") from exc


def container_logs(docker_url: str, name: str, *, tail: int = 40) -> str:
    """The last `tail` lines of the container's stdout+stderr ('' when it does not exist)."""
    try:
        raw = client_for(docker_url).containers.get(name).logs(tail=tail)
    except NotFound:
        return ""
    except DockerException as exc:
        raise EngineError(f"reading logs of {name} failed: {exc}") from exc
    return raw.decode("utf-8", errors="replace")


def containers_list(docker_url: str, *, installation: str) -> list[ContainerInfo]:
    """Every container (running or not) on the host labelled as an instance of `installation`."""
    labels = [LABEL_INSTANCE, f"{LABEL_INSTALLATION}={installation}"]
    try:
        containers = client_for(docker_url).containers.list(all=True, filters={"label": labels})
    except DockerException as exc:
        raise EngineError(f"listing containers on {docker_url} failed: {exc}") from exc
    return [_info(c) for c in containers]


def engine_ping(docker_url: str) -> bool:
    """True when the host's Docker Engine answers."""
    try:
        return bool(client_for(docker_url).ping())
    except (DockerException, EngineError, OSError):
        return False
