"""A Docker Compose project of the repository's compose.yaml, driven with Debian's `docker-compose` (1.29).

The project gets a unique name, its own ports, container prefix and image tag, and an env file of
its own (Compose's `--env-file`, 0600) that holds its secrets, so that it never touches a running
platform or another test. `down()` removes its containers, networks and volumes, the engine
containers its worker started and its application image tag, whatever state it is in.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

import docker
import docker.errors

from llmhub.fleet import engine

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the kernel's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 2.0) -> bool:
    """True when a TCP connection to host:port is accepted within `timeout` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class ComposeProject:
    """compose.yaml brought up under a unique project name.

    `settings` are Compose's interpolation variables (secrets, ports, image names); they are written
    to `workdir/compose.env` and the command runs with no other environment than PATH and HOME, so
    neither the caller's environment nor a `.env` in the repository changes what is tested.
    """

    def __init__(self, *, workdir: Path, settings: dict[str, str]):
        self.name = f"llmhub-compose-test-{uuid.uuid4().hex[:8]}"
        self.workdir = workdir
        self.settings = settings
        self.env_file = workdir / "compose.env"
        self.env_file.write_text("".join(f"{key}={value}\n" for key, value in settings.items()))
        self.env_file.chmod(0o600)
        self.timings: dict[str, float] = {}

    def run(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        """`docker-compose -p NAME -f compose.yaml --env-file FILE ARGS...`; AssertionError with its output
        when `check` and it exits non-zero or takes longer than `timeout` seconds."""
        argv = ["docker-compose", "-p", self.name, "-f", str(ROOT / "compose.yaml"), "--env-file", str(self.env_file)]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root")}
        if os.environ.get("DOCKER_HOST"):
            env["DOCKER_HOST"] = os.environ["DOCKER_HOST"]
        try:
            proc = subprocess.run(
                [*argv, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
            )  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"docker-compose {' '.join(args)} took more than {timeout:.0f} s") from exc
        if check and proc.returncode != 0:
            raise AssertionError(
                f"docker-compose {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            )
        return proc

    def timed(self, what: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """`run(*args)`, its duration recorded in `timings[what]` (seconds)."""
        started = time.monotonic()
        try:
            return self.run(*args, timeout=timeout)
        finally:
            self.timings[what] = round(time.monotonic() - started, 1)

    def manage(self, service: str, *args: str, env: dict[str, str] | None = None, timeout: float = 90) -> str:
        """`python manage.py ARGS...` in the running `service` container (`docker-compose exec -T`); its stdout."""
        extra = [item for key, value in (env or {}).items() for item in ("-e", f"{key}={value}")]
        return self.run("exec", "-T", *extra, service, "python", "manage.py", *args, timeout=timeout).stdout

    def logs(self) -> str:
        """The services' logs (last 200 lines each); '' when Compose cannot give them."""
        proc = self.run("logs", "--no-color", "--tail", "200", timeout=60, check=False)
        return proc.stdout + proc.stderr

    def down(self, *, client: docker.DockerClient, owner: str) -> None:
        """Remove the project's containers, networks and volumes; then the engine containers of its
        installation (`LLMHUB_CONTAINER_PREFIX`), the volumes and networks they used that are this
        installation's own (labelled with it, or named for it or for `owner`, a username unique to the
        test; never a cache or network shared with others), and its application image tag."""
        try:
            self.run("down", "--volumes", "--remove-orphans", "--timeout", "1", timeout=120, check=False)
        finally:
            self._remove_leftovers(client=client, owner=owner)

    def _remove_leftovers(self, *, client: docker.DockerClient, owner: str) -> None:
        prefix = self.settings["LLMHUB_CONTAINER_PREFIX"]
        mine = {"label": f"{engine.LABEL_INSTALLATION}={prefix}"}
        used = set()
        for container in client.containers.list(all=True, filters=mine):
            used.update(("volume", m["Name"]) for m in container.attrs.get("Mounts", []) if m.get("Type") == "volume")
            used.update(("network", name) for name in container.attrs["NetworkSettings"]["Networks"])
            container.remove(force=True)
        doomed = {(kind, name) for kind, name in used if prefix in name or owner in name}
        doomed.update(("network", n.name) for n in client.networks.list(filters=mine))
        doomed.update(("volume", v.name) for v in client.volumes.list(filters=mine))
        for kind, name in doomed:
            with contextlib.suppress(docker.errors.APIError):
                (client.volumes if kind == "volume" else client.networks).get(name).remove()
        with contextlib.suppress(docker.errors.APIError):  # untagged, its layers stay as build cache
            client.images.remove(self.settings["LLMHUB_IMAGE"], noprune=True)
