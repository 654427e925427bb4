"""compose.yaml works and keeps its topology: web, worker and beat in containers reach engines that
publish their port on the host's loopback only; nothing of the installation is reachable from a
container on a Docker bridge (where another tenant's engine runs) or from the host's other addresses.

Images are built locally (nothing can be pulled here): the platform base, PostgreSQL and Redis from
recipes in workers/images/ (cached by recipe hash: a second run builds nothing), the application
image by Compose from ./Dockerfile on that base (Docker's layer cache: seconds). Engines run the
small fake engine image (workers/images/fake-engine).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import time
import uuid

import docker
import httpx
import pytest

from llmhub.fleet import engine, images
from tests.compose import ROOT, ComposeProject, free_port, port_open

pytestmark = pytest.mark.docker

ARTIFACTS = ROOT / "test-artifacts" / "compose"
RECIPES = ("platform-base", "postgres", "redis", "fake-engine")
# Run inside a container on the default bridge: which of the given (address, port) pairs accept a connection.
PROBE = """
import json, socket, sys
open_ = []
for host, port in json.loads(sys.argv[1]):
    try:
        socket.create_connection((host, port), timeout=2).close()
        open_.append([host, port])
    except OSError:
        pass
print(json.dumps(open_))
"""


def host_addresses() -> list[str]:
    """The host's IPv4 addresses other than loopback (`hostname -I`): its interfaces, Docker's bridges included."""
    found = subprocess.run(["hostname", "-I"], capture_output=True, text=True, check=True).stdout.split()
    return sorted({a for a in found if ":" not in a and not a.startswith("127.")})


@pytest.fixture
def compose(tmp_path):
    """The Compose project up (web healthy, worker and beat started) with its own ports, prefix and secrets;
    torn down (containers, networks, volumes, engine containers, image tag) whatever happens."""
    client = docker.from_env(timeout=600)
    started = time.monotonic()
    tags = {recipe: images.engine_image_ensure(recipe=recipe, progress=print) for recipe in RECIPES}
    images_s = round(time.monotonic() - started, 1)
    suffix = uuid.uuid4().hex[:8]
    web_port = free_port()
    project = ComposeProject(
        workdir=tmp_path,
        settings={
            "SECRET_KEY": base64.urlsafe_b64encode(os.urandom(40)).decode(),
            "LLMHUB_ENCRYPTION_KEY": base64.urlsafe_b64encode(os.urandom(32)).decode(),
            "POSTGRES_PASSWORD": uuid.uuid4().hex,
            "LLMHUB_IMAGE": f"llmhub/platform:compose-test-{suffix}",
            "LLMHUB_PYTHON_IMAGE": tags["platform-base"],
            "LLMHUB_POSTGRES_IMAGE": tags["postgres"],
            "LLMHUB_REDIS_IMAGE": tags["redis"],
            "LLMHUB_WEB_PORT": str(web_port),
            "LLMHUB_POSTGRES_PORT": str(free_port()),
            "LLMHUB_REDIS_PORT": str(free_port()),
            "LLMHUB_PUBLIC_URL": f"http://127.0.0.1:{web_port}",
            "LLMHUB_CONTAINER_PREFIX": f"llmhub-compose-{suffix}",
            "LLMHUB_RECONCILE_INTERVAL": "1",
            "LLMHUB_AUTOSCALE_INTERVAL": "1",
            "HF_HUB_OFFLINE": "1",
        },
    )
    project.owner = f"compose{suffix}"
    project.engine_image = tags["fake-engine"]
    project.url = f"http://127.0.0.1:{web_port}"
    project.client = client
    project.timings["images"] = images_s
    failed = True
    try:
        project.timed("build", "build", "web", timeout=300)
        project.timed("up", "up", "-d", "--no-build", timeout=240)
        yield project
        failed = False
    finally:
        if failed or os.environ.get("LLMHUB_COMPOSE_KEEP_LOGS"):
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            (ARTIFACTS / f"{project.name}.log").write_text(project.logs())
        started = time.monotonic()
        project.down(client=client, owner=project.owner)
        project.timings["down"] = round(time.monotonic() - started, 1)
        print(f"compose timings (s): {json.dumps(project.timings)}")


def test_compose_serves_a_deployment_through_the_gateway_and_publishes_engines_on_loopback_only(compose):
    client, owner = compose.client, compose.owner
    settings = compose.settings

    services = {
        c.labels["com.docker.compose.service"]: c.status
        for c in client.containers.list(all=True, filters={"label": f"com.docker.compose.project={compose.name}"})
    }
    assert services == dict.fromkeys(["web", "worker", "outbound", "beat", "postgres", "redis"], "running")

    # The application image carries no secret: they come from the env file at run time.
    config_env = client.images.get(settings["LLMHUB_IMAGE"]).attrs["Config"]["Env"]
    assert not [e for e in config_env if e.split("=")[0] in ("SECRET_KEY", "LLMHUB_ENCRYPTION_KEY", "DATABASE_URL")]

    started = time.monotonic()
    compose.manage("web", "createsuperuser", "--no-input", "--username", owner, "--email", f"{owner}@example.com")
    token = compose.manage("web", "token_create", owner, "--name", "compose-test").strip()
    compose.manage(
        "web", "shell", "-c",
        "from llmhub.fleet.services import gpu_type_ensure; gpu_type_ensure(name='CPU', uses_devices=False)",
    )  # fmt: skip
    compose.manage(
        "worker", "host_add", "local", "--docker-url", "unix:///var/run/docker.sock",
        "--gpu-type", "CPU", "--gpus", "2", "--engine-image", compose.engine_image,
    )  # fmt: skip
    compose.timings["manage"] = round(time.monotonic() - started, 1)

    started = time.monotonic()
    auth = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=compose.url, headers=auth, timeout=30) as http:
        created = http.post(
            "/deploy/llm",
            json={
                "model_name": "echo", "gpu": "CPU", "num_gpus": 1, "max_batch_size": 4,
                "hf": {"repo": "llmhub/compose-check"}, "settings": {"min_instances": 1, "max_instances": 1},
            },
        )  # fmt: skip
        assert created.status_code == 200, created.text
        deploy_id = created.json()["deploy_id"]
        deadline = time.monotonic() + 120
        while (status := http.get(f"/deploy/{deploy_id}").json()["status"]) != "running":
            assert status in ("deploying", "running"), http.get(f"/deploy/{deploy_id}").text
            assert time.monotonic() < deadline, f"the deployment is still {status} after 120 s"
            time.sleep(1)
        compose.timings["deploy"] = round(time.monotonic() - started, 1)

        word = f"tenant{uuid.uuid4().hex[:6]}"
        reply = http.post(
            "/v1/openai/chat/completions",
            json={"model": f"{owner}/echo", "messages": [{"role": "user", "content": f"say {word}"}], "max_tokens": 8},
        )
    assert reply.status_code == 200, reply.text
    assert word in reply.json()["choices"][0]["message"]["content"]

    # The engine container publishes its port on the host's loopback only.
    prefix = settings["LLMHUB_CONTAINER_PREFIX"]
    [container] = client.containers.list(filters={"label": f"{engine.LABEL_INSTALLATION}={prefix}"})
    bindings = [b for published in container.attrs["NetworkSettings"]["Ports"].values() for b in published or []]
    assert bindings and {b["HostIp"] for b in bindings} == {"127.0.0.1"}, bindings
    engine_port = int(bindings[0]["HostPort"])
    assert port_open("127.0.0.1", engine_port)  # where the gateway reaches it

    # Nothing of the installation answers on the host's other addresses, from the host itself or from a
    # container on the default bridge (as another tenant's engine would be). A listener of the test's own
    # on all addresses shows that the probes do reach the host.
    ports = [engine_port, int(settings["LLMHUB_WEB_PORT"]), int(settings["LLMHUB_POSTGRES_PORT"]),
             int(settings["LLMHUB_REDIS_PORT"])]  # fmt: skip
    addresses = host_addresses()
    assert addresses
    with socket.create_server(("0.0.0.0", 0), backlog=64) as control:
        control_port = control.getsockname()[1]
        targets = [[address, port] for address in addresses for port in [*ports, control_port]]
        expected = [[address, control_port] for address in addresses]
        assert [t for t in targets if port_open(*t, timeout=1)] == expected
        probe = client.containers.run(
            compose.engine_image, ["-c", PROBE, json.dumps(targets)],
            entrypoint=["python3.11"], network="bridge", remove=True, stdout=True, stderr=True,
        )  # fmt: skip
    assert json.loads(probe) == expected
