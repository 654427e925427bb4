"""What users may see of the fleet, in one place: the texts of deployment events and fail reasons the
fleet writes, and the redaction of host facts from container log tails shown to users.

Users see their instances (numbers, states, GPU counts), their containers' own output, and why
something failed in words they can act on. They never see which host an instance runs on, an
address (the host's, its bind address, the Docker endpoint), an engine image's registry or an
engine's error text (it may name any of those): operators find those on the instance
(`Instance.last_error`), the host (`Host.last_error`), the image pull and the worker log, in the admin.
"""

from __future__ import annotations

import re
from datetime import datetime
from urllib.parse import urlsplit

REDACTED = "[host]"


def placed(instance_id: int, num_gpus: int) -> str:
    return f"instance {instance_id} placed: {num_gpus} GPU{'s' if num_gpus != 1 else ''} assigned"


def started(instance_id: int, hf_repo: str) -> str:
    return f"instance {instance_id}: container started, engine loading {hf_repo}"


def unplaced(instance_id: int) -> str:
    return f"instance {instance_id}: its host did not answer; placing it elsewhere"


def moved(instance_id: int) -> str:
    return f"instance {instance_id} leaves a host being drained: its replacement serves"


def replaced(instance_id: int) -> str:
    return f"instance {instance_id} replaced to serve the new LoRA adapters: its replacement serves"


def host_lost(instance_id: int, last_seen: datetime) -> str:
    return (
        f"instance {instance_id} lost: its host has not answered since {last_seen:%H:%M:%S} UTC; "
        "a replacement is scheduled on another host"
    )


def image_pulling(progress: str = "") -> str:
    return f"the host pulls the engine image: {progress}" if progress else "the host pulls the engine image first"


def image_pulled(seconds: float) -> str:
    return f"the host pulled the engine image in {seconds:.0f} s"


IMAGE_PULL_FAILED = "the host cannot pull the engine image (the operators have the detail)"
ENGINE_REFUSED = "the host's engine refused to start the container (the operators have the detail)"
ENGINE_SILENT = "The host's engine did not answer; try again shortly."
NO_LOG = "The container is gone and left no log."


def redact(text: str, *, host) -> str:
    """`text` (e.g. a container log tail) with the host's name, addresses and Docker endpoint replaced by
    ``[host]``. `host` is a fleet Host (or None: `text` unchanged)."""
    if host is None or not text:
        return text
    endpoint = urlsplit(host.docker_url)
    facts = {host.docker_url, endpoint.netloc, endpoint.hostname or "", endpoint.path, host.name, host.address,
             getattr(host, "bind_address", "")}  # fmt: skip
    for fact in sorted((f for f in facts if f and len(f) > 2 and f not in ("127.0.0.1", "localhost")),
                       key=len, reverse=True):  # fmt: skip
        text = re.sub(rf"(?<![\w.-]){re.escape(fact)}(?![\w-])", REDACTED, text)
    return text
