"""Running the platform's processes (web, worker, beat) as children of one command.

Used by `manage.py up` and by the end-to-end tests, so both run the platform the same way.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from django.conf import settings

BIN = Path(sys.executable).parent


def platform_commands(*, port: int, schedule: Path, embedded_beat: bool = False) -> dict[str, list[str]]:
    """argv per process: web (`llmhub.web`: uvicorn on 127.0.0.1:`port`, LLMHUB_WEB_PROCESSES processes),
    worker (the default queue: reconcile, autoscale, billing), outbound (a worker for the `<LLMHUB_QUEUE>-outbound` queue: alert webhooks and e-mail, so a
    slow endpoint never delays reconcile), and beat (inside the worker when `embedded_beat`, as tests do;
    a process of its own otherwise). `schedule` is beat's state file."""
    celery = [str(BIN / "celery"), "-A", "workers", "worker", "-l", "info"]
    commands = {
        "web": [sys.executable, "-m", "llmhub.web", "--host", "127.0.0.1", "--port", str(port)],
        "worker": [*celery, "--concurrency", "2", "-Q", settings.CELERY_TASK_DEFAULT_QUEUE, "-n", "main@%h"],
        "outbound": [*celery, "--concurrency", "2", "-Q", settings.OUTBOUND_QUEUE, "-n", "outbound@%h"],
    }
    beat = ["--schedule", str(schedule)]
    if embedded_beat:
        commands["worker"] += ["-B", *beat]
    else:
        commands["beat"] = [str(BIN / "celery"), "-A", "workers", "beat", "-l", "info", *beat]
    return commands


def start(commands: dict[str, list[str]], *, log_dir: Path, env: dict | None = None) -> list[subprocess.Popen]:
    """Start each command with its output in `log_dir/<name>.log` (appended). Returns the children."""
    log_dir.mkdir(parents=True, exist_ok=True)
    children = []
    for name, argv in commands.items():
        with open(log_dir / f"{name}.log", "ab") as log:
            children.append(
                subprocess.Popen(
                    argv, cwd=settings.BASE_DIR, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )  # fmt: skip
            )
    return children


def wait_for_web(url: str, *, timeout: float = 30.0) -> bool:
    """True once `GET {url}/login/` answers at all, False after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{url}/login/", timeout=2)
            return True
        except httpx.HTTPError:
            time.sleep(0.2)
    return False


def stop(children: list[subprocess.Popen], *, grace: float = 15.0) -> None:
    """SIGTERM every child still running, wait up to `grace` seconds in all, then SIGKILL the rest."""
    for child in children:
        if child.poll() is None:
            child.terminate()
    deadline = time.monotonic() + grace
    for child in children:
        try:
            child.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:  # its whole process group: web's server processes too
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
