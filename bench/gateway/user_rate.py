"""How many requests per minute one user can push through the gateway: the figure the default per-user
rate limit (LLMHUB_RATE_LIMIT_PER_MINUTE) is set well above.

One user, one token, one running deployment whose ready instance is the stand-in upstream (`upstream.py`,
answering at once); the gateway runs as in production, one uvicorn process per core, rate limit off.
Non-streamed and streamed chat completions at concurrency 64 for `--seconds` each.

Run: .venv/bin/python bench/gateway/user_rate.py [--seconds 15]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402 - the gateway benchmark's set-up helpers

bench.BENCH_DB = "llmhub_bench_user_rate"


async def hammer(urls: list[str], token: str, *, stream: bool, seconds: float, concurrency: int = 64) -> tuple:
    """(requests answered 200, other answers, elapsed s) over `seconds` with `concurrency` clients."""
    ok = bad = 0
    body = {"model": "bench/model", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    headers = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        end = time.monotonic() + seconds

        async def worker(i):
            nonlocal ok, bad
            url = f"{urls[i % len(urls)]}/v1/openai/chat/completions"
            while time.monotonic() < end:
                response = await client.post(url, json=body, headers=headers)
                ok, bad = (ok + 1, bad) if response.status_code == 200 else (ok, bad + 1)

        started = time.monotonic()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        return ok, bad, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=15)
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="llmhub-user-rate-"))
    upstream_port = bench.free_port()
    procs = [bench.start([sys.executable, "bench/gateway/upstream.py", str(upstream_port), "4", "0"])]
    try:
        bench.wait_http(f"http://127.0.0.1:{upstream_port}/health")
        env, token = bench.prepare_gateway(upstream_port)
        cores = os.cpu_count() or 1
        ports = [bench.free_port() for _ in range(cores)]
        for port in ports:
            procs.append(bench.start([str(Path(sys.executable).parent / "uvicorn"), "llmhub.asgi:application",
                                      "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                                     env=env, log=open(logs / f"gateway-{port}.log", "wb")))  # fmt: skip
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        for url in urls:
            bench.wait_http(f"{url}/login/")
        asyncio.run(hammer(urls, token, stream=False, seconds=2))  # warm up
        print(f"{cores} gateway processes, one user, concurrency 64, {args.seconds:g} s each:")
        for stream in (False, True):
            ok, bad, elapsed = asyncio.run(hammer(urls, token, stream=stream, seconds=args.seconds))
            print(f"  {'streamed' if stream else 'whole'}: {ok / elapsed:.0f} req/s = {ok / elapsed * 60:,.0f} "
                  f"req/min ({bad} not 200)")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=20)


if __name__ == "__main__":
    main()
