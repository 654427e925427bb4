"""Gateway benchmark: direct to a paced upstream vs through the LLMHub gateway vs through LiteLLM's proxy.

Measured in one run, interleaved round by round so that machine noise hits all three alike. For each
path: added latency p50/p99 (over direct) at concurrency 1 and 32, requests/s at concurrency 32, time
to first token added, and chunks received per stream.

Needs: the project's .venv and services (bin/setup), and LiteLLM in bench/.venv-litellm:
    python3 -m venv bench/.venv-litellm && bench/.venv-litellm/bin/pip install 'litellm[proxy]'
Run:   .venv/bin/python bench/gateway/run.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psycopg

ROOT = Path(__file__).resolve().parents[2]
BENCH_DB = "llmhub_bench"
CHUNKS, PACE_MS = 16, 5.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.HTTPError:
            time.sleep(0.3)
    raise SystemExit(f"{url} did not come up")


def start(argv, env=None, log=None):
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT)


def gateway_env(db_url: str) -> dict:
    return {**os.environ, "DATABASE_URL": db_url, "LLMHUB_RATE_LIMIT_PER_MINUTE": "0", "LOG_LEVEL": "WARNING",
            "LLMHUB_QUEUE": "llmhub-bench", "LLMHUB_CONTAINER_PREFIX": "llmhub-bench"}  # fmt: skip


def prepare_gateway(upstream_port: int) -> tuple[dict, str]:
    """A fresh bench database with a user, token, and a running deployment whose one ready instance is the
    upstream. Returns (env for the gateway process, API token)."""
    with psycopg.connect("postgresql://llmhub:llmhub@127.0.0.1:5432/postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {BENCH_DB}")
        conn.execute(f"CREATE DATABASE {BENCH_DB}")
    env = gateway_env(f"postgres://llmhub:llmhub@127.0.0.1:5432/{BENCH_DB}")
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True)
    script = f"""
from llmhub.accounts.models import User
from llmhub.accounts.services import api_token_create
from llmhub.deployments.models import Deployment
from llmhub.fleet.models import Host, Instance
from llmhub.fleet.services import gpu_type_ensure
user = User.objects.create(username="bench")
gpu = gpu_type_ensure(name="CPU", uses_devices=False)
# a host row with no engine behind it (host_register refuses those): the gateway only dials address:port
host = Host.objects.create(name="bench", docker_url="unix:///nonexistent", address="127.0.0.1", gpu_type=gpu,
                           gpu_count=1, engine_image="none")
d = Deployment.objects.create(user=user, model_name="model", gpu_type=gpu, num_gpus=1, max_batch_size=256,
                              hf_repo="bench/model", status="running", target_instances=1)
Instance.objects.create(deployment=d, host=host, state="ready", port={upstream_port})
print(api_token_create(user=user, name="bench")[1])
"""
    out = subprocess.run([sys.executable, "manage.py", "shell", "-c", script], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True)  # fmt: skip
    return env, out.stdout.strip().splitlines()[-1]


async def one(client: httpx.AsyncClient, url: str, headers: dict, model: str) -> tuple[float, float, int]:
    """One streamed chat completion: (seconds to last byte, seconds to first data event, data events)."""
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}], "max_tokens": CHUNKS}
    start = time.perf_counter()
    first, events = None, 0
    async with client.stream("POST", url, json=body, headers=headers) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                events += 1
                first = first or time.perf_counter()
    return time.perf_counter() - start, (first or time.perf_counter()) - start, events


async def batch(target: dict, concurrency: int, requests: int) -> dict:
    """`requests` streams with `concurrency` at once; latencies (s), TTFTs (s), chunks, requests/s."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        queue = list(range(requests))
        results = []

        async def worker():
            while queue:
                queue.pop()
                results.append(await one(client, target["url"], target["headers"], target["model"]))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {"latency": [r[0] for r in results], "ttft": [r[1] for r in results],
            "chunks": [r[2] for r in results], "rps": len(results) / elapsed}  # fmt: skip


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="llmhub-bench-"))
    ports = {"upstream": free_port(), "gateway": free_port(), "litellm": free_port()}
    procs = [start([sys.executable, "bench/gateway/upstream.py", str(ports["upstream"]), str(CHUNKS), str(PACE_MS)])]
    try:
        wait_http(f"http://127.0.0.1:{ports['upstream']}/health")
        env, token = prepare_gateway(ports["upstream"])
        procs.append(start([str(Path(sys.executable).parent / "uvicorn"), "llmhub.asgi:application", "--host",
                            "127.0.0.1", "--port", str(ports["gateway"]), "--log-level", "warning"], env=env,
                           log=open(logs / "gateway.log", "wb")))  # fmt: skip
        config = logs / "litellm.yaml"
        config.write_text(json.dumps({
            "model_list": [{"model_name": "bench/model", "litellm_params": {
                "model": "openai/bench/model", "api_base": f"http://127.0.0.1:{ports['upstream']}/v1", "api_key": "none"}}],
            "general_settings": {"master_key": "sk-bench"},
            "litellm_settings": {"drop_params": True},
        }))  # fmt: skip
        litellm = ROOT / "bench/.venv-litellm/bin/litellm"
        procs.append(start([str(litellm), "--config", str(config), "--port", str(ports["litellm"]), "--num_workers", "1"],
                           log=open(logs / "litellm.log", "wb")))  # fmt: skip
        wait_http(f"http://127.0.0.1:{ports['gateway']}/login/")
        wait_http(f"http://127.0.0.1:{ports['litellm']}/health/liveliness", timeout=180)
        targets = {
            "direct": {"url": f"http://127.0.0.1:{ports['upstream']}/v1/chat/completions", "headers": {},
                       "model": "bench/model"},
            "llmhub": {"url": f"http://127.0.0.1:{ports['gateway']}/v1/openai/chat/completions",
                       "headers": {"Authorization": f"Bearer {token}"}, "model": "bench/model"},
            "litellm": {"url": f"http://127.0.0.1:{ports['litellm']}/v1/chat/completions",
                        "headers": {"Authorization": "Bearer sk-bench"}, "model": "bench/model"},
        }  # fmt: skip
        for target in targets.values():  # warm up connections and caches
            asyncio.run(batch(target, 4, 16))
        runs = {(name, c): [] for name in targets for c in (1, 32)}
        for _ in range(args.rounds):
            for concurrency, requests in ((1, 20), (32, 128)):
                for name, target in targets.items():
                    runs[(name, concurrency)].append(asyncio.run(batch(target, concurrency, requests)))
        report(runs, args.rounds)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=20)


def report(runs: dict, rounds: int) -> None:
    def merged(name, c, key):
        return [v for run in runs[(name, c)] for v in run[key]]

    print(f"Upstream: {CHUNKS} chunks, {PACE_MS:g} ms apart; {rounds} interleaved rounds; times in ms.\n")
    print(
        "| path | added p50 @1 | added p99 @1 | added p50 @32 | added p99 @32 | req/s @32 | TTFT added @1 | chunks/stream |"
    )
    print("|---|---|---|---|---|---|---|---|")
    base = {c: (pct(merged("direct", c, "latency"), 0.5), pct(merged("direct", c, "latency"), 0.99)) for c in (1, 32)}
    base_ttft = statistics.median(merged("direct", 1, "ttft"))
    for name in ("direct", "llmhub", "litellm"):
        cells = []
        for c in (1, 32):
            lat = merged(name, c, "latency")
            cells += [f"{(pct(lat, 0.5) - base[c][0]) * 1000:+.2f}", f"{(pct(lat, 0.99) - base[c][1]) * 1000:+.2f}"]
        rps = statistics.median(run["rps"] for run in runs[(name, 32)])
        ttft = (statistics.median(merged(name, 1, "ttft")) - base_ttft) * 1000
        chunks = sorted(set(merged(name, 1, "chunks") + merged(name, 32, "chunks")))
        print(f"| {name} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} | {rps:.1f} | {ttft:+.2f} | {chunks} |")


if __name__ == "__main__":
    main()
