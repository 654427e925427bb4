"""Gateway benchmark: direct to a paced upstream vs through the LLMHub gateway vs through LiteLLM's proxy.

Measured in one run, interleaved round by round so that machine noise hits all paths alike. Paths: direct, a
bare TCP relay (`relay.py`, the floor of a Python proxy on this machine), the gateway, LiteLLM's proxy. For each
path: added latency p50/p99 (over direct) at concurrency 1 and 32, requests/s at concurrency 32, time
to first token added, and chunks received per stream; for the relay and the gateways, the CPU time their
processes spent (from /proc, at concurrency 8, `--cpu-requests` a round) per non-streamed request and per
relayed stream chunk, the latter two ways: a stream's CPU less a whole request's, over its chunks (which also
charges the chunks with what a stream costs more than a whole answer once), and the marginal cost (streams of
64 chunks against streams of 16, per extra chunk).

Needs: the project's .venv and services (bin/setup), and LiteLLM in bench/.venv-litellm:
    python3 -m venv bench/.venv-litellm && bench/.venv-litellm/bin/pip install 'litellm[proxy]'
Run:   .venv/bin/python bench/gateway/run.py [--rounds 5] [--baseline DIR] [--web-processes N]
           [--upstream-port PORT --model OWNER/NAME]
--baseline DIR also runs the gateway of another revision exported there (`git archive main | tar -x -C DIR`)
as the path "base", on the same database: before/after in one run. --upstream-port benchmarks a running engine
on 127.0.0.1:PORT (e.g. a vLLM container started without an API key, serving OWNER/NAME) instead of the stand-in
upstream.
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
LONG_CHUNKS = 64  # the longer streams of the marginal CPU per chunk


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


def start(argv, env=None, log=None, cwd=ROOT):
    return subprocess.Popen(argv, cwd=cwd, env=env, stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` and all its descendants (from /proc), live ones only."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry.name)] = int(fields[1])
        times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent and p not in tree]
        tree.update(children)
        frontier += children
    return sum(times.get(p, 0.0) for p in tree)


def gateway_argv(processes: int, port: int) -> list[str]:
    """The gateway as the platform runs it (`llmhub.web`), with `processes` web processes."""
    return [sys.executable, "-m", "llmhub.web", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]


def gateway_env(db_url: str) -> dict:
    return {**os.environ, "DATABASE_URL": db_url, "LLMHUB_RATE_LIMIT_PER_MINUTE": "0", "LOG_LEVEL": "WARNING",
            "LLMHUB_QUEUE": "llmhub-bench", "LLMHUB_CONTAINER_PREFIX": "llmhub-bench"}  # fmt: skip


def prepare_gateway(upstream_port: int, model: str = "bench/model") -> tuple[dict, str]:
    """A fresh bench database with a user, token, and a running deployment whose one ready instance is the
    upstream. Returns (env for the gateway process, API token)."""
    env = gateway_env(f"postgres://llmhub:llmhub@127.0.0.1:5432/{BENCH_DB}")
    return env, prepare_database(BENCH_DB, env, upstream_port, model)


def prepare_database(database: str, env: dict, upstream_port: int, model: str = "bench/model") -> str:
    """Create `database` afresh (dropped first), migrate it with `env` (its DATABASE_URL must name it) and add a
    user named like `model`'s owner, an API token, and a running deployment `model` whose one ready instance
    listens on 127.0.0.1:`upstream_port`. Returns the API token."""
    with psycopg.connect("postgresql://llmhub:llmhub@127.0.0.1:5432/postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {database}")
        conn.execute(f"CREATE DATABASE {database}")
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True)
    script = f"""
from llmhub.accounts.models import User  # the deployment's owner is named like the served model's first part
from llmhub.accounts.services import api_token_create
from llmhub.deployments.models import Deployment
from llmhub.fleet.models import Host, Instance
from llmhub.fleet.services import gpu_type_ensure
user = User.objects.create(username={model.split("/", 1)[0]!r})
gpu = gpu_type_ensure(name="CPU", uses_devices=False)
# a host row with no engine behind it (host_register refuses those): the gateway only dials address:port
host = Host.objects.create(name="bench", docker_url="unix:///nonexistent", address="127.0.0.1", gpu_type=gpu,
                           gpu_count=1, engine_image="none")
d = Deployment.objects.create(user=user, model_name={model.split("/", 1)[1]!r}, gpu_type=gpu, num_gpus=1,
                              max_batch_size=256, hf_repo="bench/model", status="running", target_instances=1)
Instance.objects.create(deployment=d, host=host, state="ready", port={upstream_port})
print(api_token_create(user=user, name="bench")[1])
"""
    out = subprocess.run([sys.executable, "manage.py", "shell", "-c", script], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True)  # fmt: skip
    return out.stdout.strip().splitlines()[-1]


def chat_body(model: str, max_tokens: int, **extra) -> dict:
    """The benchmark's chat completion request. `ignore_eos` (vLLM's): an engine makes `max_tokens` tokens, as
    upstream.py does, whatever its model would say."""
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
            "ignore_eos": True, **extra}  # fmt: skip


async def one(client: httpx.AsyncClient, url: str, headers: dict, model: str,
              max_tokens: int = CHUNKS) -> tuple[float, float, int]:  # fmt: skip
    """One streamed chat completion: (seconds to last byte, seconds to first data event, data events)."""
    body = chat_body(model, max_tokens, stream=True)
    start = time.perf_counter()
    first, events = None, 0
    async with client.stream("POST", url, json=body, headers=headers) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                events += 1
                first = first or time.perf_counter()
    return time.perf_counter() - start, (first or time.perf_counter()) - start, events


async def one_whole(client: httpx.AsyncClient, url: str, headers: dict, model: str,
                    max_tokens: int = CHUNKS) -> tuple[float, float, int]:  # fmt: skip
    """One non-streamed chat completion: (seconds, seconds, 0)."""
    body = chat_body(model, max_tokens)
    start = time.perf_counter()
    response = await client.post(url, json=body, headers=headers)
    response.raise_for_status()
    return time.perf_counter() - start, time.perf_counter() - start, 0


async def batch(target: dict, concurrency: int, requests: int, *, stream: bool = True,
                max_tokens: int = CHUNKS) -> dict:  # fmt: skip
    """`requests` streams of `max_tokens` chunks (or whole answers) with `concurrency` at once; latencies (s),
    TTFTs (s), chunks, requests/s."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    request = one if stream else one_whole
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        queue = list(range(requests))
        results = []

        async def worker():
            while queue:
                queue.pop()
                results.append(await request(client, target["url"], target["headers"], target["model"], max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {"latency": [r[0] for r in results], "ttft": [r[1] for r in results],
            "chunks": [r[2] for r in results], "rps": len(results) / elapsed}  # fmt: skip


def cpu_cost(target: dict, requests: int) -> dict:
    """CPU of the target's processes: ms per non-streamed request; ms per stream and chunks per stream, for
    streams of CHUNKS and of LONG_CHUNKS chunks (`requests` / 2 and / 8 of them)."""
    before = cpu_seconds(target["pid"])
    asyncio.run(batch(target, 8, requests, stream=False))
    whole = (cpu_seconds(target["pid"]) - before) / requests * 1000
    costs = {"whole_ms": whole}
    for key, n, max_tokens in (("", requests // 2, CHUNKS), ("long_", requests // 8, LONG_CHUNKS)):
        before = cpu_seconds(target["pid"])
        streams = asyncio.run(batch(target, 8, n, max_tokens=max_tokens))
        costs[f"{key}stream_ms"] = (cpu_seconds(target["pid"]) - before) / n * 1000
        costs[f"{key}chunks"] = statistics.median(streams["chunks"])
    return costs


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--web-processes", type=int, default=os.cpu_count() or 1,
                        help="gateway web processes (default: one per core, as the platform runs it)")  # fmt: skip
    parser.add_argument("--baseline", type=Path, help="another revision's tree, run as the gateway 'base'")
    parser.add_argument("--upstream-port", type=int, help="a running engine on 127.0.0.1 instead of upstream.py")
    parser.add_argument("--model", default="bench/model", help="the engine's served model name (OWNER/NAME)")
    parser.add_argument("--no-litellm", action="store_true")
    parser.add_argument("--cpu-requests", type=int, default=1000,
                        help="non-streamed requests (and half as many streams) per round for the CPU figures: "
                             "/proc counts CPU in 10 ms ticks per process, so fewer make them noisy")  # fmt: skip
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="llmhub-bench-"))
    ports = {"upstream": args.upstream_port or free_port(), "gateway": free_port(), "base": free_port(),
             "litellm": free_port(), "relay": free_port()}  # fmt: skip
    procs = []
    if not args.upstream_port:
        procs.append(start([sys.executable, "bench/gateway/upstream.py", str(ports["upstream"]), str(CHUNKS),
                            str(PACE_MS)]))  # fmt: skip
    relay = start([sys.executable, "bench/gateway/relay.py", str(ports["relay"]), str(ports["upstream"])])
    procs.append(relay)
    try:
        wait_http(f"http://127.0.0.1:{ports['upstream']}/health")
        wait_http(f"http://127.0.0.1:{ports['relay']}/health")
        env, token = prepare_gateway(ports["upstream"], args.model)
        env = {**env, "LLMHUB_WEB_PROCESSES": str(args.web_processes)}
        gateways = {"llmhub": start(gateway_argv(args.web_processes, ports["gateway"]), env=env,
                                    log=open(logs / "gateway.log", "wb"))}  # fmt: skip
        if args.baseline:  # the other revision's own command (uvicorn, one process, before llmhub.web existed)
            argv = [str(Path(sys.executable).parent / "uvicorn"), "llmhub.asgi:application", "--host", "127.0.0.1",
                    "--port", str(ports["base"]), "--log-level", "warning"]  # fmt: skip
            if (args.baseline / "llmhub/web.py").exists():
                argv = gateway_argv(args.web_processes, ports["base"])
            elif args.web_processes > 1:
                argv += ["--workers", str(args.web_processes)]
            gateways["base"] = start(argv, cwd=args.baseline,
                                     env={"LLMHUB_STATE_DIR": str(ROOT / ".llmhub"), **env, "PYTHONPATH": str(args.baseline)},
                                     log=open(logs / "base.log", "wb"))  # fmt: skip
        procs += gateways.values()
        if not args.no_litellm:
            config = logs / "litellm.yaml"
            config.write_text(json.dumps({
                "model_list": [{"model_name": args.model, "litellm_params": {
                    "model": f"openai/{args.model}", "api_base": f"http://127.0.0.1:{ports['upstream']}/v1",
                    "api_key": "none"}}],
                "general_settings": {"master_key": "sk-bench"},
                "litellm_settings": {"drop_params": True},
            }))  # fmt: skip
            litellm = ROOT / "bench/.venv-litellm/bin/litellm"
            # LiteLLM would take LLMHub's DATABASE_URL as its own (and want prisma); it runs without one, and
            # with its packaged model cost map (no network here).
            litellm_env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
            litellm_env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
            procs.append(start([str(litellm), "--config", str(config), "--port", str(ports["litellm"]),
                                "--num_workers", "1"], env=litellm_env, log=open(logs / "litellm.log", "wb")))  # fmt: skip
        wait_http(f"http://127.0.0.1:{ports['gateway']}/login/")
        if args.baseline:
            wait_http(f"http://127.0.0.1:{ports['base']}/login/")
        if not args.no_litellm:
            wait_http(f"http://127.0.0.1:{ports['litellm']}/health/liveliness", timeout=180)
        gateway_headers = {"Authorization": f"Bearer {token}"}
        targets = {"direct": {"url": f"http://127.0.0.1:{ports['upstream']}/v1/chat/completions", "headers": {},
                              "model": args.model},
                   "relay": {"url": f"http://127.0.0.1:{ports['relay']}/v1/chat/completions", "headers": {},
                             "model": args.model, "pid": relay.pid}}  # fmt: skip
        for name, proc in gateways.items():
            targets[name] = {"url": f"http://127.0.0.1:{ports['gateway' if name == 'llmhub' else name]}"
                             "/v1/openai/chat/completions", "headers": gateway_headers, "model": args.model,
                             "pid": proc.pid}  # fmt: skip
        if not args.no_litellm:
            targets["litellm"] = {"url": f"http://127.0.0.1:{ports['litellm']}/v1/chat/completions",
                                  "headers": {"Authorization": "Bearer sk-bench"}, "model": args.model}  # fmt: skip
        for target in targets.values():  # warm up connections and caches
            asyncio.run(batch(target, 4, 16))
        runs = {(name, c): [] for name in targets for c in (1, 32)}
        measured = ["relay", *gateways]  # the relay's CPU is the floor of a Python proxy's
        cpu = {name: [] for name in measured}
        for _ in range(args.rounds):
            for concurrency, requests in ((1, 50), (32, 128)):  # 50 at concurrency 1: its p50 moves by 0.2 ms with 20
                for name, target in targets.items():
                    runs[(name, concurrency)].append(asyncio.run(batch(target, concurrency, requests)))
            for name in measured:
                cpu[name].append(cpu_cost(targets[name], args.cpu_requests))
        report(runs, cpu, args)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=20)


def report(runs: dict, cpu: dict, args) -> None:
    def merged(name, c, key):
        return [v for run in runs[(name, c)] for v in run[key]]

    names = sorted({name for name, _ in runs}, key=["direct", "relay", "llmhub", "base", "litellm"].index)
    upstream = f"engine on port {args.upstream_port}" if args.upstream_port else \
        f"upstream.py, {CHUNKS} chunks {PACE_MS:g} ms apart"  # fmt: skip
    print(f"{upstream}; model {args.model}; gateway web processes: {args.web_processes}; {args.rounds} "
          f"interleaved rounds; load average {os.getloadavg()[0]:.1f}; times in ms.\n")  # fmt: skip
    print("| path | added p50 @1 | added p99 @1 | added p50 @32 | added p99 @32 | req/s @32 | × direct @32 "
          "| TTFT added @1 | chunks/stream |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    base = {c: (pct(merged("direct", c, "latency"), 0.5), pct(merged("direct", c, "latency"), 0.99)) for c in (1, 32)}
    base_ttft = statistics.median(merged("direct", 1, "ttft"))
    base_rps = statistics.median(run["rps"] for run in runs[("direct", 32)])
    for name in names:
        cells = []
        for c in (1, 32):
            lat = merged(name, c, "latency")
            cells += [f"{(pct(lat, 0.5) - base[c][0]) * 1000:+.2f}", f"{(pct(lat, 0.99) - base[c][1]) * 1000:+.2f}"]
        rps = statistics.median(run["rps"] for run in runs[(name, 32)])
        ttft = (statistics.median(merged(name, 1, "ttft")) - base_ttft) * 1000
        chunks = sorted(set(merged(name, 1, "chunks") + merged(name, 32, "chunks")))
        print(f"| {name} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} | {rps:.1f} | {rps / base_rps:.2f} "
              f"| {ttft:+.2f} | {chunks} |")  # fmt: skip
    if ("litellm", 32) in runs:
        ours = statistics.median(run["rps"] for run in runs[("llmhub", 32)])
        theirs = statistics.median(run["rps"] for run in runs[("litellm", 32)])
        print(f"\nllmhub / litellm req/s @32: {ours / theirs:.2f}")
    print("\nProxy CPU (all the proxy's processes, from /proc, concurrency 8; median of rounds; the bare relay "
          "is the floor):\n")
    print("| path | ms per non-streamed request | ms per stream | µs per relayed chunk (stream − whole) "
          "| µs per relayed chunk (marginal) |")  # fmt: skip
    print("|---|---|---|---|---|")
    for name, costs in cpu.items():
        whole = statistics.median(c["whole_ms"] for c in costs)
        stream = statistics.median(c["stream_ms"] for c in costs)
        chunks = statistics.median(c["chunks"] for c in costs) or 1
        # What one more chunk costs: streams of LONG_CHUNKS against streams of CHUNKS, per extra chunk (the
        # per-stream costs cancel out, which "stream − whole" charges to the chunks).
        marginal = statistics.median((c["long_stream_ms"] - c["stream_ms"]) / max(c["long_chunks"] - c["chunks"], 1)
                                     for c in costs)  # fmt: skip
        print(f"| {name} | {whole:.2f} | {stream:.2f} | {(stream - whole) / chunks * 1000:.0f} | {marginal * 1000:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
