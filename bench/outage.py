"""A long outage of PostgreSQL under steady gateway traffic: is any usage record lost or written twice?

Starts the platform's web process (`python -m llmhub.web`, LLMHUB_WEB_PROCESSES processes) on a fresh bench
database, reaching PostgreSQL through a TCP proxy (`tests.outage.TcpProxy`) and Redis directly, with one running
deployment whose one ready instance is the stand-in engine `bench/gateway/upstream.py`. Sends chat completions
at a steady rate (open loop: one every 1/RATE s, whatever the answers take; every 4th streamed, each on a new
connection so that every web process gets its share), cuts PostgreSQL for `--outage-seconds` (every connection
closed, new ones refused, as a stopped server does), restores it, keeps the traffic going `--after` seconds,
stops it and waits for the usage records to be written. Prints: requests sent and answered (by status, before /
during / after the outage), usage records written, records with the same idempotency key more than once (must be
0; the column is unique, so this also counts rows against answers), the longest the Redis pending list
(`<prefix>:usage:pending`) grew, the time from restore until the records of the outage were all in PostgreSQL,
and how often the web processes logged the outage's start and end.

Needs the project's .venv and services (bin/setup) and REDIS_URL (its keys are prefixed `llmhub-bench-outage:`).
Run:   .venv/bin/python bench/outage.py [--outage-seconds 300] [--rate 20] [--before 15] [--after 30]
           [--web-processes N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import psycopg
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gateway.run import free_port, prepare_database, wait_http  # noqa: E402
from tests.outage import TcpProxy  # noqa: E402  (the tests' proxy: the same cut as tests/integration/test_outages)

BENCH_DB = "llmhub_bench_outage"
PREFIX = "llmhub-bench-outage"
PENDING_KEY = f"{PREFIX}:usage:pending"  # llmhub.gateway.usage_buffer.PENDING_KEY for this prefix
DB_URL = f"postgresql://llmhub:llmhub@127.0.0.1:5432/{BENCH_DB}"
MODEL = "bench/model"


class Traffic:
    """Open-loop requests at `rate` per second; each result is (phase, status or exception name, seconds)."""

    def __init__(self, url: str, token: str, rate: float):
        self.url, self.rate = url, rate
        self.headers = {"Authorization": f"Bearer {token}"}
        self.phase = "before"
        self.results: list[tuple[str, str, float]] = []
        self.sent = 0
        self.stopped = False

    async def one(self, client: httpx.AsyncClient, stream: bool) -> None:
        phase, start = self.phase, time.monotonic()
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
        try:
            if stream:
                body["stream"] = True
                async with client.stream("POST", self.url, json=body, headers=self.headers) as response:
                    async for _ in response.aiter_bytes():
                        pass
            else:
                response = await client.post(self.url, json=body, headers=self.headers)
            outcome = str(response.status_code)
        except httpx.HTTPError as exc:
            outcome = type(exc).__name__
        self.results.append((phase, outcome, time.monotonic() - start))

    async def run(self) -> None:
        # No keep-alive: every request is a new connection, which the kernel hands to any of the web processes.
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=0)
        tasks = set()
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            start = time.monotonic()
            while not self.stopped:
                task = asyncio.create_task(self.one(client, stream=self.sent % 4 == 3))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                self.sent += 1
                await asyncio.sleep(max(0.0, start + self.sent / self.rate - time.monotonic()))
            await asyncio.gather(*tasks)


def usage_counts(conn: psycopg.Connection) -> tuple[int, int]:
    """(usage rows, distinct idempotency keys) in the bench database."""
    return conn.execute("SELECT count(*), count(DISTINCT idempotency_key) FROM gateway_usagerecord").fetchone()


async def main_async(args, web_url: str, token: str, pg: TcpProxy, pending: redis.Redis) -> dict:
    traffic = Traffic(f"{web_url}/v1/openai/chat/completions", token, args.rate)
    runner = asyncio.create_task(traffic.run())
    max_pending, marks = 0, {}

    async def watch(seconds: float) -> None:
        nonlocal max_pending
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            max_pending = max(max_pending, pending.llen(PENDING_KEY))
            await asyncio.sleep(min(0.5, max(0.0, end - time.monotonic())))

    await watch(args.before)
    print(f"cutting PostgreSQL for {args.outage_seconds:g} s ({traffic.sent} requests sent so far)", flush=True)
    pg.cut()
    traffic.phase, marks["cut"] = "during", time.monotonic()
    for left in range(int(args.outage_seconds), 0, -60):
        await watch(min(60, left))
        print(f"  {time.monotonic() - marks['cut']:.0f} s into the outage: {traffic.sent} sent, "
              f"{pending.llen(PENDING_KEY)} records pending in Redis", flush=True)  # fmt: skip
    await watch(args.outage_seconds - int(args.outage_seconds))
    pg.restore()
    traffic.phase, marks["restore"] = "after", time.monotonic()
    answered_before_restore = sum(1 for phase, outcome, _ in traffic.results if outcome == "200")
    print(f"PostgreSQL restored; {answered_before_restore} requests answered 200 so far", flush=True)

    # Drained: the Redis list empty and PostgreSQL holding at least every record of a request answered before
    # the restore (later requests are written as usual, within a second).
    drained = None
    with psycopg.connect(DB_URL, autocommit=True) as conn:
        while time.monotonic() - marks["restore"] < args.after or drained is None:
            length = pending.llen(PENDING_KEY)
            max_pending = max(max_pending, length)
            if drained is None and length == 0 and usage_counts(conn)[0] >= answered_before_restore:
                drained = time.monotonic() - marks["restore"]
            if time.monotonic() - marks["restore"] > args.after + 300:
                break
            await asyncio.sleep(0.2)
        traffic.stopped = True
        await runner
        answered = sum(1 for _, outcome, _ in traffic.results if outcome == "200")
        deadline = time.monotonic() + 120
        while usage_counts(conn)[0] < answered and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        await asyncio.sleep(5)  # a few more rounds of every writer: nothing written twice
        rows, keys = usage_counts(conn)
        kinds = conn.execute(
            "SELECT count(*) FILTER (WHERE stream), count(*) FILTER (WHERE status = 200) FROM gateway_usagerecord"
        ).fetchone()
    return {"traffic": traffic, "rows": rows, "keys": keys, "max_pending": max_pending, "drained": drained,
            "pending_left": pending.llen(PENDING_KEY), "streamed_rows": kinds[0], "rows_200": kinds[1]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outage-seconds", type=float, default=300)
    parser.add_argument("--rate", type=float, default=20, help="requests per second, the whole run")
    parser.add_argument("--before", type=float, default=15, help="seconds of traffic before the cut")
    parser.add_argument("--after", type=float, default=30, help="seconds of traffic after the restore")
    parser.add_argument("--web-processes", type=int, default=os.cpu_count() or 1,
                        help="web processes (default: one per core, as the platform runs it)")  # fmt: skip
    args = parser.parse_args()
    if not os.environ.get("REDIS_URL"):
        raise SystemExit("Set REDIS_URL (e.g. source your env file).")
    logs = Path(tempfile.mkdtemp(prefix="llmhub-bench-outage-"))
    upstream_port, web_port = free_port(), free_port()
    procs = [subprocess.Popen([sys.executable, "bench/gateway/upstream.py", str(upstream_port), "8", "5"], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)]  # fmt: skip
    pending = redis.Redis.from_url(os.environ["REDIS_URL"])
    pending.delete(PENDING_KEY)
    env = {**os.environ, "DATABASE_URL": DB_URL.replace("postgresql://", "postgres://"),
           "LLMHUB_QUEUE": "llmhub-bench-outage", "LLMHUB_CONTAINER_PREFIX": PREFIX,
           "LLMHUB_RATE_LIMIT_PER_MINUTE": "0", "LLMHUB_WEB_PROCESSES": str(args.web_processes)}  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{upstream_port}/health")
        token = prepare_database(BENCH_DB, env, upstream_port, MODEL)
        with TcpProxy(("127.0.0.1", 5432)) as pg:
            web_env = {**env, "DATABASE_URL": f"postgres://llmhub:llmhub@127.0.0.1:{pg.port}/{BENCH_DB}"}
            with open(logs / "web.log", "wb") as log:
                procs.append(subprocess.Popen([sys.executable, "-m", "llmhub.web", "--host", "127.0.0.1", "--port",
                                               str(web_port)], cwd=ROOT, env=web_env, stdout=log,
                                              stderr=subprocess.STDOUT))  # fmt: skip
            web_url = f"http://127.0.0.1:{web_port}"
            wait_http(f"{web_url}/login/")
            started = time.monotonic()
            result = asyncio.run(main_async(args, web_url, token, pg, pending))
            elapsed = time.monotonic() - started
        report(args, result, (logs / "web.log").read_text(errors="replace"), elapsed, logs)
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)


def report(args, result: dict, log: str, elapsed: float, logs: Path) -> None:
    traffic: Traffic = result["traffic"]
    by_phase = {
        phase: Counter(o for p, o, _ in traffic.results if p == phase) for phase in ("before", "during", "after")
    }
    answered = sum(c["200"] for c in by_phase.values())
    print(f"\n{args.web_processes} web process(es); {args.rate:g} requests/s (every 4th streamed); "
          f"{args.before:g} s before, PostgreSQL cut for {args.outage_seconds:g} s, {args.after:g} s after; "
          f"{elapsed:.0f} s in all; load average {os.getloadavg()[0]:.1f}; web log {logs}/web.log\n")  # fmt: skip
    print(f"requests sent: {traffic.sent}")
    for phase, counts in by_phase.items():
        latencies = [s for p, o, s in traffic.results if p == phase and o == "200"]
        timing = f"; p50 {statistics.median(latencies) * 1000:.0f} ms, p99 " \
                 f"{sorted(latencies)[int(0.99 * (len(latencies) - 1))] * 1000:.0f} ms" if latencies else ""  # fmt: skip
        print(f"  {phase + ' the outage:':19} {dict(sorted(counts.items()))}{timing}")
    print(f"answered 200: {answered}")
    print(f"usage records written: {result['rows']} (status 200: {result['rows_200']}, streamed: "
          f"{result['streamed_rows']})")  # fmt: skip
    print(f"duplicates by idempotency key: {result['rows'] - result['keys']}")
    print(f"lost (answered 200, no record): {max(0, answered - result['rows_200'])}; "
          f"records without a 200 answer: {max(0, result['rows_200'] - answered)}")  # fmt: skip
    print(f"max Redis pending-list length: {result['max_pending']} (left at the end: {result['pending_left']})")
    drained = f"{result['drained']:.1f} s" if result["drained"] is not None else "not within the wait"
    print(f"drain time after restore (pending list empty, every record of the outage in PostgreSQL): {drained}")
    down, back = log.count("PostgreSQL is unreachable"), log.count("PostgreSQL is back")
    print(f"web log: 'PostgreSQL is unreachable' {down}×, 'PostgreSQL is back' {back}× "
          f"({args.web_processes} process(es): once each is once per outage); tracebacks: {log.count('Traceback')}")  # fmt: skip


if __name__ == "__main__":
    main()
