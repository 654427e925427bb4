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


def web_start(log_dir):
    """Start two web processes (uvicorn, the platform's own command, one process each) on the test database,
    Redis and key prefix, as a deployment with one process per core runs them; no worker. Returns
    (namespace, children): SimpleNamespace(urls=[base URL of each], pids=[their process ids], logs=Path)."""
    env = web_env(LLMHUB_WEB_PROCESSES="1")
    ports = [free_port(), free_port()]
    commands = {
        f"web{i}": processes.platform_commands(port=port, schedule=log_dir / "unused")["web"]
        for i, port in enumerate(ports)
    }
    children = processes.start(commands, log_dir=log_dir, env=env)
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    for url in urls:
        if not processes.wait_for_web(url):
            processes.stop(children, grace=10)
            raise AssertionError(f"a web process did not start; see {log_dir}")
    return SimpleNamespace(urls=urls, pids=[c.pid for c in children], logs=log_dir), children


@pytest.fixture(scope="session")
def web_processes(django_db_setup, tmp_path_factory):
    """The tier's two web processes, started once per test session (when a test first needs them)."""
    started, children = web_start(tmp_path_factory.mktemp("security-web"))
    try:
        yield started
    finally:
        processes.stop(children, grace=10)


@pytest.fixture
def web(web_processes, transactional_db):
    """Two web processes (see `web_start`), shared by the tier's tests: each test brings its own users and
    tokens. Tests using it must be `django_db(transaction=True)`: the processes see only committed rows.

    Yields SimpleNamespace(urls=[base URL of each], pids=[their process ids], logs=Path).
    """
    return web_processes


@pytest.fixture
def fresh_web(transactional_db, tmp_path):
    """Like `web`, but processes of the test's own (for measurements of a process's whole life, e.g. its
    peak memory)."""
    started, children = web_start(tmp_path)
    try:
        yield started
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
