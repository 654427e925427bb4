"""The README's first command, `manage.py up`, run as a user runs it: it brings the platform up with
the demo deployment, answers a chat completion, writes demo.env, and stops its processes on Ctrl-C."""

import os
import queue
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from django.conf import settings

from llmhub.fleet import engine
from tests.stack import DOCKER, database_url, free_port

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.vllm, pytest.mark.docker]


def read_until(lines: "queue.Queue[str]", marker: str, timeout: float) -> list[str]:
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        if line is None:
            break
        seen.append(line)
        if marker in line:
            return seen
    raise AssertionError(f"'{marker}' never came; output so far:\n{''.join(seen)}")


def test_up_serves_the_demo_and_stops_on_ctrl_c(tmp_path, platform_stopped):
    port = free_port()
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "DATABASE_URL": database_url(),
        "LLMHUB_STATE_DIR": str(tmp_path),
        "LLMHUB_RECONCILE_INTERVAL": "1",
        "LLMHUB_QUEUE": settings.CELERY_TASK_DEFAULT_QUEUE,
        "LLMHUB_CONTAINER_PREFIX": settings.CONTAINER_PREFIX,
    }
    up = subprocess.Popen(
        [sys.executable, "manage.py", "up", "--port", str(port)],
        cwd=settings.BASE_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in up.stdout] + [lines.put(None)], daemon=True).start()
    try:
        output = "".join(read_until(lines, "Serving until Ctrl-C.", timeout=600))

        assert "ready     instance" in output  # progress while the instance starts
        assert "Reply from demo/tiny-llama" in output
        facts = dict(line.split("=", 1) for line in (tmp_path / "demo.env").read_text().splitlines())
        assert set(facts) == {"LLMHUB_URL", "LLMHUB_USER", "LLMHUB_PASSWORD", "LLMHUB_TOKEN", "LLMHUB_MODEL"}
        assert facts["LLMHUB_URL"] == f"http://127.0.0.1:{port}" and facts["LLMHUB_MODEL"] == "demo/tiny-llama"
        assert f"Bearer {facts['LLMHUB_TOKEN']}" in output  # the ready-to-paste curl command
        models = httpx.get(
            f"{facts['LLMHUB_URL']}/v1/openai/models", headers={"Authorization": f"Bearer {facts['LLMHUB_TOKEN']}"}
        )
        assert [m["id"] for m in models.json()["data"]] == ["demo/tiny-llama"]
        assert httpx.get(f"{facts['LLMHUB_URL']}/login/").status_code == 200  # the dashboard answers

        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{facts['LLMHUB_URL']}/login/", timeout=2)  # web stopped with it
    finally:
        if up.poll() is None:
            up.kill()
        for info in engine.containers_list(DOCKER, installation=settings.CONTAINER_PREFIX):
            engine.container_remove(DOCKER, info.name)  # `up` leaves the engine running for its next start
