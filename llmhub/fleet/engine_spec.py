"""What LLMHub asks a Docker Engine for when it starts an instance (`ContainerSpec`, and `run_kwargs`, the
pure function from one to the keyword arguments of docker-py's ``containers.create``: Docker SDK for
Python 7, Docker Engine API ``POST /containers/create`` HostConfig) and what engines report
(`ContainerInfo`, `EngineFacts`, `PullProgress`). The calls themselves are in `engine`, which
re-exports these names.

Tenant isolation, as every engine container gets it:

- ``VLLM_API_KEY`` in the environment (never on the command line, which any user of the host sees in
  ``ps``), and `engine_guard` loaded with ``--middleware`` so that no path but ``GET /health`` answers
  without that key (vLLM's own check covers only ``/v1`` and a few more prefixes);
- the engine port published on the host's bind address only (loopback or a private interface);
- one bridge network per host and installation with inter-container traffic off
  (``com.docker.network.bridge.enable_icc=false``): engines cannot reach one another;
- a Hugging Face cache volume per owner (``<installation>-hf-cache-u<user id>``), labelled with the owner;
- every capability dropped (``cap_drop=["ALL"]``), none added: the CPU vLLM 0.32 image was run with
  none and served chat completions (see the README); `settings.ENGINE_CAP_ADD` adds some back for an
  engine that needs them; ``no-new-privileges``; a pids limit; a memory limit when the GPU type says
  how much host memory an instance may use; never the host's network, IPC or PID namespace.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import docker.types

ENGINE_PORT = 8000
LABEL_INSTANCE = "llmhub.instance"
LABEL_DEPLOYMENT = "llmhub.deployment"
LABEL_INSTALLATION = "llmhub.installation"
LABEL_OWNER = "llmhub.owner"  # the owner's username
LABEL_OWNER_ID = "llmhub.owner_id"  # the owner's user id (names the cache volume)
HF_CACHE_PATH = "/root/.cache/huggingface"
DEFAULT_PIDS_LIMIT = 8192
ICC_OPTION = "com.docker.network.bridge.enable_icc"

# The key guard, copied into every engine container before its first start and loaded by vLLM with
# ``--middleware``; `PYTHONPATH` names its directory.
GUARD_DIR = "/opt/llmhub"
GUARD_MODULE = "llmhub_engine_guard"
GUARD_FILE = f"{GUARD_DIR}/{GUARD_MODULE}.py"
GUARD_MIDDLEWARE = f"{GUARD_MODULE}.EngineKeyGuard"


def guard_source() -> bytes:
    """The text of `engine_guard` (standard library only), as it is copied into engine containers."""
    return (Path(__file__).with_name("engine_guard.py")).read_bytes()


def cache_volume_name(installation: str, owner_id: int) -> str:
    """``<installation>-hf-cache-u<user id>``: one owner's Hugging Face cache on a host (by id, not username,
    so that a renamed or re-created username never inherits someone else's cache)."""
    return f"{installation}-hf-cache-u{owner_id}"


def network_name(installation: str) -> str:
    """``<installation>-engines``: the host's bridge network for engines, inter-container traffic off."""
    return f"{installation}-engines"


@dataclass(frozen=True)
class ContainerSpec:
    """Everything needed to start one instance's container.

    `args` are appended to the image's entrypoint (the vLLM OpenAI server); `device_ids` are GPU
    indexes as strings (None on CPU hosts: no device request); `publish_ip` is the host address the
    engine port is published on (a random free host port is chosen by Docker); `shm_size` is
    Docker's size string for /dev/shm (vLLM's workers exchange tensors through it). `cache_volume`
    is the named volume mounted at the Hugging Face cache path (None: none), created with the
    installation and owner labels of `labels` when missing; `network` the bridge network the container
    joins (None: Docker's default bridge), created with inter-container traffic off when missing.
    `pids_limit` caps processes + threads; `memory_limit` is bytes of host memory (None: no limit);
    `cap_add` are capabilities given back after dropping all. `files` ({absolute path: bytes}) are
    copied into the container before its first start. Secrets go in `environment`, never in `args`.
    """

    name: str
    image: str
    args: list[str]
    labels: dict[str, str]
    environment: dict[str, str] = field(default_factory=dict)
    device_ids: list[str] | None = None
    publish_ip: str = "127.0.0.1"
    shm_size: str = "2g"
    cache_volume: str | None = None
    network: str | None = None
    pids_limit: int = DEFAULT_PIDS_LIMIT
    memory_limit: int | None = None
    cap_add: tuple[str, ...] = ()
    files: dict[str, bytes] = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:  # the environment holds the engine key and the HF token
        return f"ContainerSpec(name={self.name!r}, image={self.image!r})"


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
        "volumes": {spec.cache_volume: {"bind": HF_CACHE_PATH, "mode": "rw"}} if spec.cache_volume else {},
        "shm_size": spec.shm_size,
        # The reconcile loop owns restarts (with backoff and a crash limit), not Docker.
        "restart_policy": {"Name": "no"},
        # No capability at all: vLLM (CPU image, 0.32) loads, serves and shuts down without any; an engine
        # that needs one gets it from settings.ENGINE_CAP_ADD, each with its reason in the README.
        "cap_drop": ["ALL"],
        "cap_add": list(spec.cap_add),
        "security_opt": ["no-new-privileges:true"],  # no setuid/file-capability gains inside
        "pids_limit": spec.pids_limit,  # a fork bomb stops at the container
        "privileged": False,
    }
    if spec.network:
        kwargs["network"] = spec.network  # a bridge; never "host"
    if spec.memory_limit:
        kwargs["mem_limit"] = spec.memory_limit
        kwargs["memswap_limit"] = spec.memory_limit  # no swap beyond it
    if spec.device_ids is not None:
        kwargs["device_requests"] = [
            docker.types.DeviceRequest(driver="nvidia", device_ids=spec.device_ids, capabilities=[["gpu"]])
        ]
    return kwargs
