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


BACKOFF_FIRST = 1.0  # seconds before the first restart of a process that exited
BACKOFF_MAX = 30.0  # seconds: the longest wait between restarts
STABLE_AFTER = 60.0  # seconds: a process up at least this long starts its backoff again from BACKOFF_FIRST


def restart_delay(restarts: int) -> float:
    """Seconds to wait before restart number `restarts` + 1 of a process that keeps exiting: 1, 2, 4, 8, 16,
    30, 30… (exponential backoff, capped at BACKOFF_MAX)."""
    return min(BACKOFF_FIRST * 2**restarts, BACKOFF_MAX)


class Supervisor:
    """Keeps the platform's processes running, as `manage.py up` (bin/up) does: a process that exits (a
    worker killed with SIGKILL, a web process that crashed) is started again after `restart_delay`, and the
    others keep serving meanwhile. Each exit and restart is said through `say` (one line each). Compose
    (`restart: unless-stopped`) and the systemd units in deploy/systemd do the same in production.

    A process that exited has its whole process group killed first (the web server's own server processes
    would otherwise keep its port). `check()` does one round; `run(stop_when)` loops until `stop_when()`.
    """

    def __init__(self, commands: dict[str, list[str]], *, log_dir: Path, env: dict | None = None, say=print,
                 clock=time.monotonic):  # fmt: skip
        self.commands, self.log_dir, self.env, self.say, self.clock = commands, log_dir, env, say, clock
        self.children: dict[str, subprocess.Popen] = {}
        self.started_at: dict[str, float] = {}
        self.restarts: dict[str, int] = dict.fromkeys(commands, 0)
        self.due: dict[str, float] = {}  # name → when it is started again

    def start(self) -> None:
        """Start every process (output appended to `log_dir/<name>.log`)."""
        for name in self.commands:
            self._spawn(name)

    def _spawn(self, name: str) -> None:
        [self.children[name]] = start({name: self.commands[name]}, log_dir=self.log_dir, env=self.env)
        self.started_at[name] = self.clock()

    def check(self) -> None:
        """One round: schedule the restart of each process that exited, start those that are due."""
        now = self.clock()
        for name, child in self.children.items():
            code = child.poll()
            if code is None or name in self.due:
                continue
            try:
                os.killpg(child.pid, signal.SIGKILL)  # what it left behind (the web's server processes)
            except (ProcessLookupError, PermissionError):
                pass
            if now - self.started_at[name] >= STABLE_AFTER:
                self.restarts[name] = 0
            delay = restart_delay(self.restarts[name])
            self.restarts[name] += 1
            how = f"signal {-code}" if code < 0 else f"code {code}"
            self.say(f"{name} exited ({how}); restarting it in {delay:g} s (restart {self.restarts[name]}; "
                     f"log: {self.log_dir / (name + '.log')})")  # fmt: skip
            self.due[name] = now + delay
        for name, at in list(self.due.items()):
            if now >= at:
                del self.due[name]
                self._spawn(name)
                self.say(f"{name} restarted (pid {self.children[name].pid})")

    def run(self, stop_when=lambda: False, *, interval: float = 0.5) -> None:
        """Check every `interval` seconds until `stop_when()` is true (or KeyboardInterrupt)."""
        while not stop_when():
            self.check()
            time.sleep(interval)

    def stop(self, *, grace: float = 15.0) -> None:
        """Stop every process (`stop`); none is restarted after this."""
        self.due.clear()
        stop(list(self.children.values()), grace=grace)
