"""The web server runs one process per core by default, and what the gateway counts holds across its
processes: a scaled-to-zero deployment woken once with requests held on both processes, in-flight counts
summed for the autoscaler and the drain, and /metrics summing every process. (Held-request caps and rate
limits across processes: test_limits.py.)"""

import asyncio
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.db import connections

from llmhub.deployments.models import Deployment
from llmhub.fleet.models import Instance
from llmhub.fleet.scaling import instance_inflight
from llmhub.gateway.load import inflight_totals
from tests.factories import DeploymentFactory, HostFactory, UserFactory, token_for

pytestmark = pytest.mark.django_db(transaction=True)

CHUNKS = 3


class Engine(BaseHTTPRequestHandler):
    """An OpenAI-compatible engine: waits until `server.go` is set, then streams CHUNKS deltas (and the
    usage chunk when asked), or answers whole."""

    protocol_version = "HTTP/1.1"

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.go.wait(timeout=30)
        if not body.get("stream"):
            raw = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
                              "usage": {"prompt_tokens": 2, "completion_tokens": 1}}).encode()  # fmt: skip
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        for i in range(CHUNKS):
            delta = {"choices": [{"index": 0, "delta": {"content": str(i)}}]}
            self.wfile.write(f"data: {json.dumps(delta)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def engine():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Engine)
    server.go = threading.Event()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.go.set()
    server.shutdown()


def chat(model, **extra):
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def wait_for(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.2)
    return predicate()


async def open_streams(urls, headers, model):
    """One stream per URL, opened (status line read) in order; returns (client, responses)."""
    client = httpx.AsyncClient(timeout=60)
    responses = []
    for url in urls:
        request = client.build_request("POST", f"{url}/v1/openai/chat/completions",
                                       json=chat(model, stream=True), headers=headers)  # fmt: skip
        responses.append(await client.send(request, stream=True))
    return client, responses


def ready_instance(deployment, port):
    """What the reconciler does once an instance's engine answers: a ready instance at `port`."""
    return Instance.objects.create(deployment=deployment, host=HostFactory(), state="ready", port=port)


async def data_events(response) -> list[str]:
    return [line async for line in response.aiter_lines() if line.startswith("data: {")]


def test_the_web_server_runs_one_process_per_core_by_default(web_server):
    def children(pid: int) -> list[bytes]:  # command lines of the processes whose parent is `pid`
        found = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append((entry / "cmdline").read_bytes())
            except (OSError, IndexError, ValueError):
                pass  # gone meanwhile
        return found

    serving = [cmdline for cmdline in children(web_server.pid) if b"spawn_main" in cmdline]  # uvicorn's workers

    assert len(serving) == (os.cpu_count() if os.cpu_count() > 1 else 0)  # one core: the server itself serves


def test_metrics_count_the_requests_of_every_web_process(web_server, engine):
    assert os.cpu_count() >= 2, "needs a machine with 2 cores or more (one web process per core)"
    engine.go.set()
    deployment = DeploymentFactory(status="running")
    Instance.objects.create(deployment=deployment, host=HostFactory(), state="ready", port=engine.server_address[1])
    headers = {"Authorization": f"Bearer {token_for(deployment.user)}"}

    async def requests(n):  # concurrent, each on its own connection: the processes share them out
        async def one():
            async with httpx.AsyncClient(timeout=30) as client:
                response = await client.post(f"{web_server.url}/v1/openai/chat/completions",
                                             json=chat(deployment.full_name), headers=headers)  # fmt: skip
                return response.status_code

        return await asyncio.gather(*(one() for _ in range(n)))

    assert asyncio.run(requests(40)) == [200] * 40

    metrics = httpx.get(
        f"{web_server.url}/metrics", headers={"Authorization": f"Bearer {web_server.metrics_token}"}
    ).text
    line = f'llmhub_gateway_requests_total{{deployment="{deployment.full_name}",status="200"}}'
    counted = [float(row.split()[-1]) for row in metrics.splitlines() if row.startswith(line)]
    assert counted == [40.0], [row for row in metrics.splitlines() if "llmhub_gateway_requests_total" in row]
    assert "llmhub_instances{" in metrics  # the fleet series too


def test_a_deployment_at_zero_is_woken_once_and_requests_held_on_both_processes_are_served(web, engine):
    engine.go.set()
    user = UserFactory(username="sleeper")
    deployment = DeploymentFactory(user=user, model_name="cold", status="running", min_instances=0,
                                   target_instances=0, max_instances=1)  # fmt: skip
    headers = {"Authorization": f"Bearer {token_for(user)}"}

    async def scenario():
        client, held = await open_streams([*web.urls, *web.urls], headers, deployment.full_name)
        try:
            assert [r.status_code for r in held] == [200] * 4  # held: the stream is open, keepalives flow
            woken = await sync_to_async(wait_for)(
                lambda: Deployment.objects.filter(id=deployment.id, target_instances=1).exists()
            )
            assert woken, "no web process woke the deployment"
            # The reconciler's part: an instance starts and becomes ready.
            await sync_to_async(ready_instance)(deployment, engine.server_address[1])
            return await asyncio.wait_for(asyncio.gather(*(data_events(r) for r in held)), 30)
        finally:
            await client.aclose()
            await sync_to_async(connections.close_all)()

    events = asyncio.run(scenario())

    assert [len(e) for e in events] == [CHUNKS] * 4  # every held request answered, on both processes
    assert deployment.events.filter(kind="scaled").count() == 1  # woken once, not once per process or request


def test_in_flight_counts_are_summed_over_web_processes(web, engine):
    deployment = DeploymentFactory(status="running")
    instance = Instance.objects.create(deployment=deployment, host=HostFactory(), state="ready",
                                       port=engine.server_address[1])  # fmt: skip
    headers = {"Authorization": f"Bearer {token_for(deployment.user)}"}

    async def scenario():
        client, streams = await open_streams([*web.urls, web.urls[0]], headers, deployment.full_name)
        try:  # 2 requests on one process, 1 on the other, all waiting for their first token
            during = await sync_to_async(wait_for)(
                lambda: (inflight_totals().get(deployment.id) == 3 and instance_inflight()) or None
            )
            totals, per_instance = inflight_totals(), instance_inflight()
            engine.go.set()
            answered = await asyncio.wait_for(asyncio.gather(*(data_events(r) for r in streams)), 30)
            return during, totals, per_instance, answered
        finally:
            await client.aclose()
            await sync_to_async(connections.close_all)()

    during, totals, per_instance, answered = asyncio.run(scenario())

    assert during, "the in-flight counts never reached 3"
    assert totals[deployment.id] == 3 and per_instance[instance.id] == 3
    assert [len(a) for a in answered] == [CHUNKS] * 3
    assert wait_for(lambda: deployment.id not in inflight_totals() and instance.id not in instance_inflight())
