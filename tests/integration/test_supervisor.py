"""`manage.py up` (bin/up) keeps the platform's processes running: a worker or web process killed with SIGKILL
is started again with backoff, says so, and the web process keeps answering while a worker is down."""

import os
import signal
import threading
import time

import httpx
import pytest

from llmhub import processes
from tests.stack import PLATFORM_ENV, database_url, free_port, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def test_restart_delays_double_up_to_30_s():
    assert [processes.restart_delay(n) for n in range(7)] == [1, 2, 4, 8, 16, 30, 30]


@pytest.fixture
def supervised(tmp_path, settings):
    """web and worker under a Supervisor, on a queue of their own (so no other test's worker is involved)."""
    settings.CELERY_TASK_DEFAULT_QUEUE = f"{settings.CELERY_TASK_DEFAULT_QUEUE}-supervised"
    port = free_port()
    env = {**os.environ, **PLATFORM_ENV, "DATABASE_URL": database_url(), "LLMHUB_WEB_PROCESSES": "1",
           "LLMHUB_QUEUE": settings.CELERY_TASK_DEFAULT_QUEUE}  # fmt: skip
    commands = processes.platform_commands(port=port, schedule=tmp_path / "beat")
    said = []
    supervisor = processes.Supervisor({name: commands[name] for name in ("web", "worker")}, log_dir=tmp_path,
                                      env=env, say=said.append)  # fmt: skip
    supervisor.start()
    supervisor.url, supervisor.said = f"http://127.0.0.1:{port}", said
    try:
        assert processes.wait_for_web(supervisor.url), (tmp_path / "web.log").read_text()
        yield supervisor
    finally:
        supervisor.stop(grace=10)


def restarted(supervisor, name: str, old_pid: int) -> bool:
    supervisor.check()
    child = supervisor.children[name]
    return child.pid != old_pid and child.poll() is None


def readies(supervisor) -> int:
    """How many times a worker said it was ready in the (appended) worker log."""
    return (supervisor.log_dir / "worker.log").read_text().count(" ready.")


def test_a_killed_worker_is_restarted_with_backoff_while_the_web_keeps_answering(supervised):
    failures, answered, done = [], [], threading.Event()

    def watch():
        while not done.is_set():
            try:
                answered.append(httpx.get(f"{supervised.url}/login/", timeout=5).status_code)
            except httpx.HTTPError as exc:
                failures.append(exc)
            time.sleep(0.1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for restart, delay in ((1, 1), (2, 2)):  # killed again soon after: the wait doubles
            wait_for(lambda n=restart: readies(supervised) == n, timeout=60, interval=0.5, what="the worker ready")
            old = supervised.children["worker"].pid
            os.kill(old, signal.SIGKILL)
            wait_for(lambda pid=old: restarted(supervised, "worker", pid), timeout=30, interval=0.2, what="a new worker")
            assert f"worker exited (signal 9); restarting it in {delay} s (restart {restart};" in supervised.said[-2]
            assert supervised.said[-1].startswith("worker restarted (pid ")
            wait_for(lambda n=restart + 1: readies(supervised) == n, timeout=60, interval=0.5, what="the new worker ready")
    finally:
        done.set()
        watcher.join()
    assert failures == [] and set(answered) == {200} and len(answered) > 10
    assert supervised.children["web"].poll() is None


def test_a_killed_web_process_is_restarted_and_answers_again(supervised):
    old = supervised.children["web"].pid
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: restarted(supervised, "web", old), timeout=30, interval=0.2, what="a new web process")
    assert "web exited (signal 9); restarting it in 1 s (restart 1;" in supervised.said[0]
    assert processes.wait_for_web(supervised.url)
    assert httpx.get(f"{supervised.url}/login/", timeout=5).status_code == 200
