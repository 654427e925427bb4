"""The real platform for end-to-end and browser tests: web (uvicorn) and worker + beat (Celery) as
subprocesses on the test database, Redis and the local Docker Engine.

`Platform` is started once per test session (the `running_platform` fixture in tests/conftest.py) and
stopped after the last test that uses it; between tests `platform_clear` leaves it with no deployment and
no container, so each test brings its own users and deployments.
"""

from __future__ import annotations

import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

import docker
from django.conf import settings
from django.db import connection

from llmhub import processes
from llmhub.fleet import engine, images

DOCKER = "unix:///var/run/docker.sock"
BILLING_CHECK_INTERVAL = 2  # seconds between the platform's spending checks (30 in production)
# How the platform's processes run in tests: fast reconcile and autoscale passes, a short spending check, and
# alert e-mails into the worker's log.
PLATFORM_ENV = {
    "LLMHUB_RECONCILE_INTERVAL": "1",
    "LLMHUB_AUTOSCALE_INTERVAL": "1",
    "LLMHUB_BILLING_CHECK_INTERVAL": str(BILLING_CHECK_INTERVAL),
    "EMAIL_URL": "consolemail://",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_image() -> str:
    """The CPU engine image tag (built by bin/test before pytest; cached by recipe hash)."""
    return images.engine_image_ensure(progress=lambda line: None)


def database_url() -> str:
    db = connection.settings_dict
    return f"postgres://{db['USER']}:{db['PASSWORD']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


@contextmanager
def running_stack(log_dir: Path):
    """Start web, worker and beat on the test database; yield the web base URL; stop them after.

    Every container and cache volume of this test installation (LLMHUB_CONTAINER_PREFIX) is removed at the end.
    """
    port = free_port()
    env = {
        **os.environ,
        **PLATFORM_ENV,
        "DATABASE_URL": database_url(),
        "LLMHUB_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "LLMHUB_QUEUE": settings.CELERY_TASK_DEFAULT_QUEUE,
        "LLMHUB_CONTAINER_PREFIX": settings.CONTAINER_PREFIX,
    }
    commands = processes.platform_commands(port=port, schedule=log_dir / "celerybeat-schedule", embedded_beat=True)
    children = processes.start(commands, log_dir=log_dir, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        assert processes.wait_for_web(url), f"the web server did not start; see {log_dir}/web.log"
        yield url
    finally:
        processes.stop(children, grace=20)
        containers_remove()
        client = docker.from_env(timeout=60)
        for volume in client.volumes.list(
            filters={"label": f"{engine.LABEL_INSTALLATION}={settings.CONTAINER_PREFIX}"}
        ):
            volume.remove(force=True)  # the owners' caches this run made


def containers_remove(timeout: float = 60) -> None:
    """Remove every container of this test installation (LLMHUB_CONTAINER_PREFIX) from the local engine, also
    while a running worker removes some of them itself (Docker then refuses a second removal for a moment)."""
    deadline = time.monotonic() + timeout
    while left := engine.containers_list(DOCKER, installation=settings.CONTAINER_PREFIX):
        for info in left:
            try:
                engine.container_remove(DOCKER, info.name)
            except engine.EngineError:
                if time.monotonic() > deadline:
                    raise
        if time.monotonic() > deadline:
            raise AssertionError(f"containers of this installation keep coming back: {[c.name for c in left]}")
        time.sleep(0.2)


class Platform:
    """The platform of a test session, started on first use (`url()`) and stopped by `stop()` (again startable)."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self._running = None  # the running_stack context while started
        self._url: str | None = None

    def url(self) -> str:
        """The web base URL, starting web, worker and beat first if they are not running."""
        if self._running is None:
            self._running = running_stack(self.log_dir)
            self._url = self._running.__enter__()
        return self._url

    def stop(self) -> None:
        if self._running is not None:
            running, self._running = self._running, None
            running.__exit__(None, None, None)


def platform_clear() -> None:
    """After a test on the shared platform: delete its deployments and remove their containers, so that the
    next test (its rows flushed by pytest-django) starts with nothing running."""
    from llmhub.deployments.models import Deployment
    from llmhub.deployments.services import deployment_delete

    for deployment in Deployment.objects.exclude(status__in=["deleting", "deleted"]):
        deployment_delete(deployment=deployment)  # desired 0: the worker starts nothing more for them
    containers_remove()


def wait_for(predicate, *, timeout: float, interval: float = 1.0, what: str = "condition"):
    """Poll `predicate()` until it returns a truthy value (returned) or `timeout` seconds pass (AssertionError)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


TINY_LLAMA = "llmhub/tiny-random-llama"  # the small real model the engine image's tests serve (random weights)


def deploy(api, *, model_name: str, max_batch_size: int = 4, **settings) -> str:
    """POST /deploy/llm through `api` (an httpx.Client with the user's token) for the tiny Llama on one CPU
    slot, with `settings` (min_instances, max_instances, cooldown_seconds; default 1 to 1); asserts it was
    accepted and returns its deploy_id."""
    created = api.post("/deploy/llm", json={
        "model_name": model_name, "gpu": "CPU", "num_gpus": 1, "max_batch_size": max_batch_size,
        "hf": {"repo": TINY_LLAMA}, "settings": {"min_instances": 1, "max_instances": 1, **settings},
    })  # fmt: skip
    assert created.status_code == 200, created.text
    return created.json()["deploy_id"]


def deploy_and_wait(api, *, model_name: str, timeout: float = 600, **fields) -> dict:
    """`deploy(...)`, then wait until the deployment is `running` (it never leaves `deploying` for anything
    else meanwhile: AssertionError naming its state); returns its GET /deploy/<id> JSON."""
    deploy_id = deploy(api, model_name=model_name, **fields)

    def running():
        data = api.get(f"/deploy/{deploy_id}").json()
        assert data["status"] in ("deploying", "running"), data
        return data if data["status"] == "running" else None

    return wait_for(running, timeout=timeout, interval=1, what=f"deployment {model_name} to run")
