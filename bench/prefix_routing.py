"""Prefix-aware routing vs least outstanding requests on two real vLLM CPU engines, through the gateway.

Set-up: per routing, two containers of the CPU engine image (`llmhub/vllm-cpu`, the baked tiny Llama,
automatic prefix caching on, block size 32) whose KV cache is sized (``--num-gpu-blocks-override``) to hold
about half of the workload's shared prefixes each; the LLMHub gateway (uvicorn, one process, a bench
database) with one deployment per routing (``Deployment.routing``: ``bench/lo`` least outstanding,
``bench/px`` prefix) whose two ready instances are that routing's engines. Workload: `--prefixes` long
system prompts (`--system-chars` characters each) with short user turns, each request picking a system
prompt at random (seeded), `--requests` streamed chat completions per routing at `--concurrency`,
`--max-tokens` tokens each.

Each routing has its own engines and its own set of system prompts (so neither warms the other's caches),
and the two run in `--rounds` alternating rounds (A B B A ...), so that the machine's other work falls on
both alike. Printed per routing: the engines' prefix-cache hit rate (``vllm:prefix_cache_hits`` /
``vllm:prefix_cache_queries`` from each engine's /metrics, summed), time to first token p50/p90 through
the gateway, how the requests spread over the two engines (``vllm:request_success``); then the engines'
``vllm:num_requests_running`` / ``_waiting`` sampled every 0.25 s (mean in flight per engine, how often one
engine had 2 or more while the other had none, how often any request waited in an engine's queue) and
each engine's mean queue, prefill and TTFT times from its own histograms. Then, with the prefix
deployment's response cache on, the latency of a response cache hit against the same request sent to an
engine directly and through the gateway on a miss (`--no-response-cache` skips it).

The engines here run without the fleet's key guard (the bench starts them itself); under the fleet, /metrics
answers only with the instance's key (``Authorization: Bearer``), which this script sends all the same.

Needs: the project's .venv and services (bin/setup), Docker and the engine image
(``.venv/bin/python -m llmhub.fleet.images --recipe vllm-cpu``). Heavy: run under the shared lock:
    flock /tmp/llmhub-heavy.lock .venv/bin/python bench/prefix_routing.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psycopg

ROOT = Path(__file__).resolve().parents[1]
PREFIX = os.environ.get("LLMHUB_CONTAINER_PREFIX", "llmhub")
BENCH_DB = f"{PREFIX.replace('-', '_')}_prefix_bench"
ENGINE_KEY = "bench-engine-key"
BLOCK_SIZE = 32  # tokens per KV block (the CPU backend wants a multiple of 32)
MODEL = "llmhub/tiny-random-llama"
SHORT = {"least_outstanding": "lo", "prefix": "px"}  # routing → its deployment's model name (and engines')
WORDS = ("catalogue order invoice shipment refund warranty customer supplier region quarter policy "
         "discount product category account balance ledger contract renewal support ticket").split()  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not come up in {timeout:.0f} s")


def engine_image() -> str:
    out = subprocess.run(["docker", "images", "--format", "{{.Repository}}:{{.Tag}} {{.CreatedAt}}",
                          "llmhub/vllm-cpu"], capture_output=True, text=True, check=True).stdout  # fmt: skip
    images = sorted((line.split(" ", 1) for line in out.splitlines() if line), key=lambda x: x[1], reverse=True)
    if not images:
        raise SystemExit("no llmhub/vllm-cpu image: build it with python -m llmhub.fleet.images --recipe vllm-cpu")
    return images[0][0]


def system_prompts(count: int, chars: int, seed: int) -> list[str]:
    prompts = []
    for n in range(count):
        rng = random.Random(seed * 1000 + n)
        text = f"You are assistant {seed}-{n} of the operations desk. Rules: "
        while len(text) < chars:
            text += " ".join(rng.choice(WORDS) for _ in range(8)) + ". "
        prompts.append(text[:chars])
    return prompts


def token_counts(image: str, texts: list[str]) -> list[int]:
    """Tokens of each text under the engine's own tokenizer (run in the image, offline)."""
    script = ("import json, sys\nfrom transformers import AutoTokenizer\n"
              f"t = AutoTokenizer.from_pretrained({MODEL!r})\n"
              "print(json.dumps([len(t(x)['input_ids']) for x in json.load(sys.stdin)]))")  # fmt: skip
    out = subprocess.run(["docker", "run", "--rm", "-i", "-e", "HF_HUB_OFFLINE=1", "--entrypoint", "python", image,
                          "-c", script], input=json.dumps(texts), capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def start_engine(image: str, name: str, served: str, blocks: int, max_len: int) -> int:
    subprocess.run(["docker", "rm", "-f", name], capture_output=True)
    subprocess.run(["docker", "run", "-d", "--name", name, "--shm-size", "1g", "-p", "127.0.0.1::8000",
                    "-e", "VLLM_CPU_KVCACHE_SPACE=1", image, "--model", MODEL, "--served-model-name", served,
                    "--max-num-seqs", "8", "--host", "0.0.0.0", "--port", "8000", "--enable-prefix-caching",
                    "--block-size", str(BLOCK_SIZE), "--num-gpu-blocks-override", str(blocks),
                    "--max-model-len", str(max_len)], check=True, capture_output=True)  # fmt: skip
    port = subprocess.run(["docker", "port", name, "8000/tcp"], capture_output=True, text=True, check=True).stdout
    return int(port.strip().splitlines()[0].rsplit(":", 1)[1])


TIMINGS = ("queue_time", "prefill_time", "time_to_first_token")  # vLLM histograms: seconds, summed per engine


def engine_metrics(port: int) -> dict[str, float]:
    """Prefix cache hits and queries (tokens), successful requests, the KV cache's blocks, and the sums and
    counts of the engine's queue, prefill and TTFT histograms (seconds) from vLLM /metrics."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {ENGINE_KEY}"}).text
    out = {"hits": 0.0, "queries": 0.0, "requests": 0.0, "blocks": 0.0}
    for name in TIMINGS:
        out[f"{name}_sum"] = out[f"{name}_count"] = 0.0
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"vllm:(?:request_)?(queue_time|prefill_time|time_to_first_token)_seconds_(sum|count)"
                     r"(?:\{[^}]*\})? ([0-9.e+]+)$", line)  # fmt: skip
        if m:
            out[f"{m[1]}_{m[2]}"] += float(m[3])
        m = re.match(r"vllm:(?:gpu_)?prefix_cache_(hits|queries)(?:_total)?(?:\{[^}]*\})? ([0-9.e+]+)$", line)
        if m:
            out[m[1]] += float(m[2])
        m = re.match(r"vllm:request_success(?:_total)?(?:\{[^}]*\})? ([0-9.e+]+)$", line)
        if m:
            out["requests"] += float(m[1])
        m = re.search(r'vllm:cache_config_info\{.*num_gpu_blocks="(\d+)"', line)
        if m:
            out["blocks"] = float(m[1])
    return out


def engine_gauges(port: int) -> tuple[int, int]:
    """(requests running, requests waiting) in the engine now: vLLM's num_requests_running / _waiting gauges."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {ENGINE_KEY}"}).text
    found = dict.fromkeys(("running", "waiting"), 0.0)
    for m in re.finditer(r"^vllm:num_requests_(running|waiting)(?:\{[^}]*\})? ([0-9.e+]+)$", text, re.M):
        found[m[1]] += float(m[2])
    return int(found["running"]), int(found["waiting"])


class Sampler(threading.Thread):
    """Polls both engines' running/waiting gauges every `interval` seconds while a routing's workload runs:
    how often one engine queues (or runs 2 or more) while the other is idle, and the mean in flight per engine."""

    def __init__(self, ports: list[int], interval: float = 0.25):
        super().__init__(daemon=True)
        self.ports, self.interval, self.samples = ports, interval, []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.samples.append([engine_gauges(p) for p in self.ports])
            except httpx.HTTPError:
                pass
            self.stopping.wait(self.interval)

    def summary(self) -> dict:
        n = len(self.samples) or 1
        busy = [sum(s[i][0] + s[i][1] for s in self.samples) / n for i in range(2)]
        lopsided = sum(1 for s in self.samples if any(
            s[i][0] + s[i][1] >= 2 and s[1 - i][0] + s[1 - i][1] == 0 for i in range(2))) / n  # fmt: skip
        waiting = sum(1 for s in self.samples if s[0][1] + s[1][1] > 0) / n
        return {"mean_in_flight": busy, "lopsided": lopsided, "waiting": waiting, "samples": len(self.samples)}


def manage(env: dict, script: str) -> str:
    out = subprocess.run([sys.executable, "manage.py", "shell", "-c", script], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True)  # fmt: skip
    return out.stdout.strip()


def prepare_gateway(engines: dict[str, list[int]]) -> tuple[dict, str]:
    """A fresh bench database: a user, an API token, and per routing (`engines`: routing → engine ports) a
    running deployment ``bench/<SHORT[routing]>`` with that routing and one ready instance per engine."""
    with psycopg.connect("postgresql://llmhub:llmhub@127.0.0.1:5432/postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {BENCH_DB}")
        conn.execute(f"CREATE DATABASE {BENCH_DB}")
    env = {**os.environ, "DATABASE_URL": f"postgres://llmhub:llmhub@127.0.0.1:5432/{BENCH_DB}",
           "LLMHUB_RATE_LIMIT_PER_MINUTE": "0", "LOG_LEVEL": "WARNING", "LLMHUB_QUEUE": f"{PREFIX}-bench",
           "LLMHUB_CONTAINER_PREFIX": f"{PREFIX}-bench"}  # fmt: skip
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True)
    token = manage(
        env,
        f"""
from llmhub.accounts.models import User
from llmhub.accounts.services import api_token_create
from llmhub.deployments.models import Deployment
from llmhub import crypto
from llmhub.fleet.models import Host, Instance
from llmhub.fleet.services import gpu_type_ensure
user = User.objects.create(username="bench")
gpu = gpu_type_ensure(name="CPU", uses_devices=False)
host = Host.objects.create(name="bench", docker_url="unix:///nonexistent", address="127.0.0.1", gpu_type=gpu,
                           gpu_count=2, engine_image="none")
for routing, ports in {engines!r}.items():
    d = Deployment.objects.create(user=user, model_name={SHORT!r}[routing], gpu_type=gpu, num_gpus=1,
                                  max_batch_size=8, hf_repo="{MODEL}", status="running", min_instances=2,
                                  max_instances=2, routing=routing)
    for port in ports:
        Instance.objects.create(deployment=d, host=host, state="ready", port=port,
                                engine_key_encrypted=crypto.encrypt("{ENGINE_KEY}"))
print(api_token_create(user=user, name="bench")[1])
""",
    )
    return env, token.splitlines()[-1]


def set_deployment(env: dict, model_name: str, **fields) -> None:
    """Change a bench deployment's settings with save(): the gateway sees it at its next routing check."""
    assignments = "; ".join(f"d.{k} = {v!r}" for k, v in fields.items())
    manage(env, f"from llmhub.deployments.models import Deployment\n"
                f"d = Deployment.objects.get(model_name={model_name!r})\n{assignments}\n"
                f"d.save(update_fields={list(fields)!r})")  # fmt: skip
    time.sleep(1.0)


async def stream_one(client: httpx.AsyncClient, url: str, headers: dict, body: dict) -> float:
    """One streamed chat completion through the gateway; returns seconds to the first content event."""
    start = time.perf_counter()
    first = None
    async with client.stream("POST", url, json=body, headers=headers) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if first is None and line.startswith("data: {") and '"choices":[{' in line.replace(" ", ""):
                first = time.perf_counter()
    return (first or time.perf_counter()) - start


async def workload(url: str, token: str, model: str, prompts: list[str], requests: int, concurrency: int,
                   max_tokens: int, seed: int) -> list[float]:  # fmt: skip
    rng = random.Random(seed)
    bodies = [{"model": model, "stream": True, "max_tokens": max_tokens, "temperature": 0,
               "messages": [{"role": "system", "content": rng.choice(prompts)},
                            {"role": "user", "content": f"Question {i}: what is the status of order {rng.randint(1000, 9999)}?"}]}
              for i in range(requests)]  # fmt: skip
    headers = {"Authorization": f"Bearer {token}"}
    ttfts: list[float] = []
    async with httpx.AsyncClient(timeout=300) as client:

        async def worker():
            while bodies:
                ttfts.append(await stream_one(client, url, headers, bodies.pop(0)))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ttfts


async def whole_latencies(url: str, headers: dict, body: dict, n: int) -> tuple[list[float], list[str]]:
    times, marks = [], []
    async with httpx.AsyncClient(timeout=120) as client:
        for _ in range(n):
            start = time.perf_counter()
            response = await client.post(url, json=body, headers=headers)
            times.append(time.perf_counter() - start)
            response.raise_for_status()
            marks.append(response.headers.get("x-llmhub-cache", ""))
    return times, marks


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prefixes", type=int, default=16)
    parser.add_argument("--system-chars", type=int, default=2400)
    parser.add_argument("--requests", type=int, default=320)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--kv-share", type=float, default=0.5, help="share of all prefixes one engine's KV cache holds")
    parser.add_argument("--first", choices=["least_outstanding", "prefix"], default="least_outstanding")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds per routing (ABBA order)")
    parser.add_argument("--seed", type=int, default=1, help="picks both routings' system prompts and requests")
    parser.add_argument("--no-response-cache", action="store_true", help="skip the response cache's latencies")
    args = parser.parse_args()
    image = engine_image()
    # routing → seed of its own system prompts (seed 1: 1 and 2, as before --seed existed)
    modes = {"least_outstanding": 2 * args.seed - 1, "prefix": 2 * args.seed}
    if args.first == "prefix":
        modes = {"prefix": modes["prefix"], "least_outstanding": modes["least_outstanding"]}
    prompts = {mode: system_prompts(args.prefixes, args.system_chars, seed) for mode, seed in modes.items()}
    tokens = token_counts(image, [p for mode in modes for p in prompts[mode]])
    per_prefix_blocks = statistics.mean(t // BLOCK_SIZE for t in tokens)
    # about `kv_share` of the prefixes, plus the blocks of the requests running at once (their own turns)
    blocks = math.ceil(args.kv_share * args.prefixes * per_prefix_blocks) + 2 * args.concurrency
    max_len = BLOCK_SIZE * (max(tokens) // BLOCK_SIZE + 4)
    print(f"image {image}; {args.prefixes} system prompts per routing, {statistics.mean(tokens):.0f} tokens each "
          f"({per_prefix_blocks:.1f} blocks of {BLOCK_SIZE}); KV cache per engine {blocks} blocks = "
          f"{blocks * BLOCK_SIZE} tokens ≈ {blocks / (args.prefixes * per_prefix_blocks):.0%} of the prefixes")  # fmt: skip
    logs = Path(tempfile.mkdtemp(prefix="llmhub-prefix-bench-"))
    names = {mode: [f"{PREFIX}-prefix-bench-{SHORT[mode]}-{i}" for i in range(2)] for mode in modes}
    procs = []
    try:
        t0 = time.monotonic()
        engines = {mode: [start_engine(image, name, f"bench/{SHORT[mode]}", blocks, max_len) for name in names[mode]]
                   for mode in modes}  # fmt: skip
        for port in (p for ports in engines.values() for p in ports):
            wait_http(f"http://127.0.0.1:{port}/health", timeout=400)
        print(f"engines ready in {time.monotonic() - t0:.0f} s; KV blocks reported: "
              f"{[engine_metrics(p)['blocks'] for ports in engines.values() for p in ports]}")  # fmt: skip
        env, token = prepare_gateway(engines)
        gateway = free_port()
        procs.append(subprocess.Popen([str(Path(sys.executable).parent / "uvicorn"), "llmhub.asgi:application",
                                       "--host", "127.0.0.1", "--port", str(gateway), "--log-level", "warning"],
                                      cwd=ROOT, env=env, stdout=open(logs / "gateway.log", "wb"),
                                      stderr=subprocess.STDOUT))  # fmt: skip
        wait_http(f"http://127.0.0.1:{gateway}/login/", timeout=60)
        url = f"http://127.0.0.1:{gateway}/v1/openai/chat/completions"
        before = {mode: [engine_metrics(p) for p in ports] for mode, ports in engines.items()}
        ttfts: dict[str, list[float]] = {mode: [] for mode in modes}
        samples: dict[str, list] = {mode: [] for mode in modes}
        elapsed = dict.fromkeys(modes, 0.0)
        for n in range(args.rounds):  # the routings alternate (ABBA...), so both see the machine's other work alike
            for mode in list(modes)[:: 1 if n % 2 == 0 else -1]:
                sampler = Sampler(engines[mode])
                sampler.start()
                started = time.monotonic()
                ttfts[mode] += asyncio.run(workload(url, token, f"bench/{SHORT[mode]}", prompts[mode],
                                                    args.requests // args.rounds, args.concurrency,
                                                    args.max_tokens, modes[mode] * 1000 + n))  # fmt: skip
                elapsed[mode] += time.monotonic() - started
                sampler.stopping.set()
                sampler.join()
                samples[mode] += sampler.samples
        results = {}
        for mode, ports in engines.items():
            delta = [{k: a[k] - b[k] for k in a} for a, b in zip([engine_metrics(p) for p in ports], before[mode])]
            hits, queries = sum(d["hits"] for d in delta), sum(d["queries"] for d in delta)
            gauges = Sampler(ports)
            gauges.samples = samples[mode]
            results[mode] = {"hit_rate": hits / queries if queries else 0.0, "ttft_p50": pct(ttfts[mode], 0.5),
                             "ttft_p90": pct(ttfts[mode], 0.9), "spread": [int(d["requests"]) for d in delta],
                             "per_engine": [d["hits"] / d["queries"] if d["queries"] else 0 for d in delta],
                             "seconds": elapsed[mode], "gauges": gauges.summary(),
                             "engine_ms": {name: [1000 * d[f"{name}_sum"] / d[f"{name}_count"] if d[f"{name}_count"]
                                                  else 0.0 for d in delta] for name in TIMINGS}}  # fmt: skip
        print(
            f"\n{args.requests} requests per routing in {args.rounds} alternating rounds at concurrency "
            f"{args.concurrency}, {args.max_tokens} tokens each\n"
        )
        print("| routing | prefix-cache hit rate | per engine | TTFT p50 ms | TTFT p90 ms | requests per engine | s |")
        print("|---|---|---|---|---|---|---|")
        for mode, r in sorted(results.items()):
            print(f"| {mode} | {r['hit_rate']:.1%} | {' / '.join(f'{x:.0%}' for x in r['per_engine'])} | "
                  f"{r['ttft_p50'] * 1000:.0f} | {r['ttft_p90'] * 1000:.0f} | {r['spread']} | {r['seconds']:.1f} |")  # fmt: skip
        lo, px = results["least_outstanding"], results["prefix"]
        ratio = px["hit_rate"] / lo["hit_rate"] if lo["hit_rate"] else math.inf
        print(f"\nprefix / least_outstanding hit rate: {ratio:.2f}x; TTFT p50 {px['ttft_p50'] / lo['ttft_p50']:.2f}x")
        print(
            "\nengines, sampled every 0.25 s (in flight = running + waiting) and their own mean timings per request:\n"
        )
        print("| routing | mean in flight per engine | one engine ≥ 2 in flight, other idle | any waiting | "
              "queue ms | prefill ms | engine TTFT ms |")  # fmt: skip
        print("|---|---|---|---|---|---|---|")
        for mode, r in sorted(results.items()):
            g, e = r["gauges"], r["engine_ms"]
            print(
                f"| {mode} | {' / '.join(f'{x:.2f}' for x in g['mean_in_flight'])} | {g['lopsided']:.0%} | "
                f"{g['waiting']:.0%} | " + " | ".join(" / ".join(f"{x:.0f}" for x in e[n]) for n in TIMINGS) + " |"
            )
        if args.no_response_cache:
            return

        # The response cache: one deterministic whole request, direct to an engine, gateway miss, gateway hit.
        set_deployment(env, SHORT["prefix"], response_cache_seconds=600)
        body = {"model": f"bench/{SHORT['prefix']}", "max_tokens": args.max_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": "Name a colour."}]}  # fmt: skip
        direct, _ = asyncio.run(whole_latencies(f"http://127.0.0.1:{engines['prefix'][0]}/v1/chat/completions",
                                                {"Authorization": f"Bearer {ENGINE_KEY}"}, body, 30))  # fmt: skip
        gateway_headers = {"Authorization": f"Bearer {token}"}
        misses = []
        for i in range(30):  # a new body each time: every one a miss
            t, marks = asyncio.run(whole_latencies(url, gateway_headers, {**body, "seed": 10_000 + i}, 1))
            assert marks == ["miss"], marks
            misses += t
        hits, marks = asyncio.run(whole_latencies(url, gateway_headers, {**body, "seed": 10_000}, 200))
        assert set(marks) == {"hit"}, set(marks)
        print("\nresponse cache (whole answers, concurrency 1):")
        print("| path | p50 ms | p99 ms |\n|---|---|---|")
        for name, values in (("direct to the engine", direct), ("gateway, miss", misses), ("gateway, hit", hits)):
            print(f"| {name} | {pct(values, 0.5) * 1000:.2f} | {pct(values, 0.99) * 1000:.2f} |")
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=20)
        for name in (name for pair in names.values() for name in pair):
            subprocess.run(["docker", "rm", "-f", name], capture_output=True)


if __name__ == "__main__":
    main()
