"""The security tier: tests that act as an attacker (or a careless operator) against the real platform."""

import os
from types import SimpleNamespace

import pytest
from django.conf import settings

from llmhub import processes
from tests.stack import database_url, free_port

# How the web processes of this tier run: a short body deadline so that trickle tests end quickly,
# a hold long enough to pile up held requests.
WEB_ENV = {"LLMHUB_BODY_READ_TIMEOUT": "2", "LLMHUB_HOLD_TIMEOUT": "60", "LLMHUB_KEEPALIVE_INTERVAL": "1"}
METRICS_TOKEN = "metrics-test-token"


def web_env(**extra) -> dict:
    """The environment of this tier's web processes: the test database, Redis, queue and prefix."""
    return {
        **os.environ, **WEB_ENV, "DATABASE_URL": database_url(),
        "LLMHUB_QUEUE": settings.CELERY_TASK_DEFAULT_QUEUE, "LLMHUB_CONTAINER_PREFIX": settings.CONTAINER_PREFIX,
        **extra,
    }  # fmt: skip


@pytest.fixture
def web(transactional_db, tmp_path):
    """Two web processes (uvicorn, the platform's own command) on the test database, Redis and key prefix,
    as a deployment with one process per core runs them; no worker. Tests using it must be
    `django_db(transaction=True)`: the processes see only committed rows.

    Yields SimpleNamespace(urls=[base URL of each], pids=[their process ids], logs=Path).
    """
    env = web_env(LLMHUB_WEB_PROCESSES="1")
    ports = [free_port(), free_port()]
    commands = {
        f"web{i}": processes.platform_commands(port=port, schedule=tmp_path / "unused")["web"]
        for i, port in enumerate(ports)
    }
    children = processes.start(commands, log_dir=tmp_path, env=env)
    try:
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        for url in urls:
            assert processes.wait_for_web(url), f"a web process did not start; see {tmp_path}"
        yield SimpleNamespace(urls=urls, pids=[c.pid for c in children], logs=tmp_path)
    finally:
        processes.stop(children, grace=10)


@pytest.fixture
def web_server(transactional_db, tmp_path):
    """One web server as bin/up and Compose run it (`llmhub.web`, the platform's own command) with the
    number of processes it runs by default (one per core); /metrics on with METRICS_TOKEN. Tests using it must be `django_db(transaction=True)`.

    Yields SimpleNamespace(url=base URL, pid=the server's process id, logs=Path, metrics_token=its token).
    """
    port = free_port()
    env = web_env(LLMHUB_METRICS_TOKEN=METRICS_TOKEN)
    env.pop("LLMHUB_WEB_PROCESSES", None)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    children = processes.start(
        {"web": processes.platform_commands(port=port, schedule=tmp_path / "unused")["web"]}, log_dir=tmp_path, env=env
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        assert processes.wait_for_web(url), f"the web server did not start; see {tmp_path}"
        yield SimpleNamespace(url=url, pid=children[0].pid, logs=tmp_path, metrics_token=METRICS_TOKEN)
    finally:
        processes.stop(children, grace=10)
