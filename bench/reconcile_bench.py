"""Reconcile benchmark: one full reconcile pass over 100 hosts with 100 and with 1,000 deployments
(5 instances each: 500 and 5,000 instances), on PostgreSQL, with the engine seam simulated.

Run from the repository root (it makes and drops its own database, ``<DATABASE_URL name>_bench``):

    .venv/bin/python bench/reconcile_bench.py            # 100 hosts; 100 and 1,000 deployments
    .venv/bin/python bench/reconcile_bench.py --scales 10 100 --hosts 20   # smaller

For each scale it builds the fleet from nothing and times these passes of `reconcile_all`:

- cold: every instance is placed (GPU reservation under the hosts' row lock) and its container started;
- warm-up: every instance's engine answers /health and the instance becomes ready;
- steady: nothing to do (the periodic pass as it runs almost always);
- full: ``reconcile_all(full=True)``: every deployment is reconciled under its advisory lock, each
  container checked against the pass's observation of its host: the most a pass does without changes.

Steady and full passes are repeated (``--repeat``, 5) and the fastest is kept; cold and warm-up
happen once by nature.

and counts the database queries and the engine calls of each. Only this benchmark simulates the
engine seam (`llmhub.fleet.engine`): containers live in memory per host, every call answers at once
(``--engine-latency-ms`` adds a delay to each), and every engine reports /health 200. It prints a
table, the 1,000 / 100 ratios of the full and steady passes (linear growth: a ratio of at most 10,
give or take LINEAR_TOLERANCE, the noise between runs) with the time per deployment at each scale,
and the queries per deployment of the full pass; it exits 1 when the full or steady pass grows
worse than linearly. ``--json FILE`` writes the figures.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmhub.settings")

INSTANCES_PER_DEPLOYMENT = 5
# "Linear" allows the time per deployment to vary by this much between scales: what repeated runs on
# one quiet machine vary by (caches, PostgreSQL's own work); anything growing faster shows past it.
LINEAR_TOLERANCE = 0.10
GPUS_PER_HOST = 64  # hosts are large so 5,000 one-GPU instances fit on 100 of them


class SimulatedEngines:
    """The engine seam in memory: containers per engine URL; counts calls; optional latency per call."""

    def __init__(self, latency_s: float = 0.0):
        self.latency_s = latency_s
        self.lock = threading.Lock()
        self.hosts: dict[str, dict] = defaultdict(dict)
        self.calls = 0
        self.ports = itertools.count(20000)

    def _call(self):
        with self.lock:
            self.calls += 1
        if self.latency_s:
            time.sleep(self.latency_s)

    def install(self):
        from llmhub.fleet import engine, reconcile

        def container_run(target, spec):
            self._call()
            url = engine.endpoint_of(target).url
            with self.lock:
                info = self.hosts[url].get(spec.name)
                if info is None:
                    info = engine.ContainerInfo(
                        id=f"sim-{spec.name}", name=spec.name, status="running", exit_code=None,
                        host_port=next(self.ports), labels=dict(spec.labels), started_at=datetime.now(UTC),
                    )  # fmt: skip
                    self.hosts[url][spec.name] = info
                return info

        def container_get(target, name):
            self._call()
            return self.hosts[engine.endpoint_of(target).url].get(name)

        def container_remove(target, name):
            self._call()
            with self.lock:
                return self.hosts[engine.endpoint_of(target).url].pop(name, None) is not None

        def containers_list(target, installation):
            self._call()
            with self.lock:
                return list(self.hosts[engine.endpoint_of(target).url].values())

        def image_present(target, image):
            self._call()
            return True

        def container_logs(target, name, tail=40):
            self._call()
            return ""

        for name, fn in {
            "container_run": container_run, "container_get": container_get, "container_remove": container_remove,
            "containers_list": containers_list, "image_present": image_present, "container_logs": container_logs,
        }.items():  # fmt: skip
            setattr(engine, name, fn)
        reconcile.vllm.engine_healthy = lambda base_url, **kw: True


def build_fleet(*, hosts: int, deployments: int, per_deployment: int = INSTANCES_PER_DEPLOYMENT) -> None:
    """`hosts` hosts of GPUS_PER_HOST GPUs and `deployments` deployments of `per_deployment` one-GPU instances."""
    from llmhub.accounts.models import User
    from llmhub.deployments.models import Deployment
    from llmhub.fleet.models import GpuType, Host

    gpu_type = GpuType.objects.create(name="BENCH-GPU", memory_gb=80, uses_devices=True)
    Host.objects.bulk_create(
        Host(name=f"gpu-{n:03d}", docker_url=f"unix:///run/bench/gpu-{n:03d}.sock", address=f"10.1.{n // 250}.{n % 250}",
             gpu_type=gpu_type, gpu_count=GPUS_PER_HOST, engine_image="vllm/vllm-openai:bench")
        for n in range(hosts)
    )  # fmt: skip
    users = User.objects.bulk_create(
        User(username=f"bench{n}", gpu_quota=10_000) for n in range(max(deployments // 50, 1))
    )
    Deployment.objects.bulk_create(
        Deployment(user=users[n % len(users)], model_name=f"model-{n}", gpu_type=gpu_type, num_gpus=1, max_batch_size=8,
                   hf_repo="org/model", min_instances=per_deployment, max_instances=per_deployment)
        for n in range(deployments)
    )  # fmt: skip


def timed_pass(engines: SimulatedEngines, **kwargs) -> dict:
    """One `reconcile_all` pass: seconds, database queries, engine calls, deployments reconciled."""
    from django.db import connection

    from llmhub.fleet.reconcile import reconcile_all

    queries = 0

    def count(execute, sql, params, many, context):
        nonlocal queries
        queries += 1
        return execute(sql, params, many, context)

    engine_calls_before = engines.calls
    with connection.execute_wrapper(count):
        started = time.perf_counter()
        reconciled = reconcile_all(**kwargs)
        seconds = time.perf_counter() - started
    calls = engines.calls - engine_calls_before
    return {"seconds": seconds, "queries": queries, "engine_calls": calls, "reconciled": reconciled}


def fastest(passes) -> dict:
    """The fastest of repeated passes (the least disturbed by other work on the machine)."""
    return min(passes, key=lambda p: p["seconds"])


def run(
    *,
    hosts: int,
    deployments: int,
    per_deployment: int = INSTANCES_PER_DEPLOYMENT,
    latency_ms: float = 0,
    repeat: int = 1,
) -> dict:
    """Build a fleet in the current (empty) database and time its passes. Returns the figures by pass."""
    from llmhub.fleet.models import Instance

    engines = SimulatedEngines(latency_s=latency_ms / 1000)
    engines.install()
    build_fleet(hosts=hosts, deployments=deployments, per_deployment=per_deployment)
    figures = {"hosts": hosts, "deployments": deployments}
    figures["cold"] = timed_pass(engines)
    figures["warm-up"] = timed_pass(engines)
    figures["steady"] = fastest(timed_pass(engines) for _ in range(repeat))
    figures["full"] = fastest(timed_pass(engines, full=True) for _ in range(repeat))
    figures["instances_ready"] = Instance.objects.filter(state=Instance.State.READY).count()
    figures["containers"] = sum(len(c) for c in engines.hosts.values())
    return figures


def _fresh_database(suffix: str):
    """Create (or recreate) the benchmark database next to DATABASE_URL's and point Django at it."""
    from django.db import connection

    connection.settings_dict["TEST"]["NAME"] = f"{connection.settings_dict['NAME']}_bench{suffix}"
    return connection.creation.create_test_db(verbosity=0, autoclobber=True, keepdb=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=100)
    parser.add_argument("--scales", type=int, nargs="+", default=[100, 1000], help="deployment counts to compare")
    parser.add_argument("--per-deployment", type=int, default=INSTANCES_PER_DEPLOYMENT)
    parser.add_argument("--engine-latency-ms", type=float, default=0.0)
    parser.add_argument(
        "--repeat", type=int, default=5, help="steady and full passes are timed this often (fastest kept)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)

    import logging

    import django

    django.setup()
    logging.disable(logging.WARNING)  # orphan sweeps and crash logs are not what is measured
    from django.db import connection

    results = []
    for scale in args.scales:
        original = connection.settings_dict["NAME"]
        _fresh_database("")
        try:
            results.append(
                run(
                    hosts=args.hosts,
                    deployments=scale,
                    per_deployment=args.per_deployment,
                    latency_ms=args.engine_latency_ms,
                )
            )
        finally:
            connection.creation.destroy_test_db(original, verbosity=0)
    print(f"Reconcile benchmark: {args.hosts} hosts × {GPUS_PER_HOST} GPUs, {args.per_deployment} one-GPU instances "
          f"per deployment, engine latency {args.engine_latency_ms:g} ms per call")  # fmt: skip
    print(
        f"{'deployments':>11} {'instances':>9} {'pass':>8} {'seconds':>8} {'queries':>8} {'q/depl':>7} {'engine calls':>12}"
    )
    for r in results:
        for name in ("cold", "warm-up", "steady", "full"):
            p = r[name]
            print(f"{r['deployments']:>11} {r['instances_ready']:>9} {name:>8} {p['seconds']:>8.3f} {p['queries']:>8} "
                  f"{p['queries'] / r['deployments']:>7.2f} {p['engine_calls']:>12}")  # fmt: skip
    verdict = 0
    if len(results) >= 2:
        small, large = results[0], results[-1]
        growth = large["deployments"] / small["deployments"]
        print()
        for name in ("full", "steady", "cold"):
            ratio = large[name]["seconds"] / small[name]["seconds"]
            per = [r[name]["seconds"] * 1000 / r["deployments"] for r in (small, large)]
            linear = ratio <= growth * (1 + LINEAR_TOLERANCE)
            print(f"{name} pass: {large[name]['seconds']:.3f} s / {small[name]['seconds']:.3f} s = {ratio:.2f} for "
                  f"{growth:g}× the deployments; {per[0]:.2f} → {per[1]:.2f} ms per deployment "
                  f"({'linear' if linear else 'WORSE THAN LINEAR'})")  # fmt: skip
            if name in ("full", "steady") and not linear:
                verdict = 1
        per = [r["full"]["queries"] / r["deployments"] for r in results]
        print(f"full pass queries per deployment: {', '.join(f'{q:.2f}' for q in per)} "
              f"(steady pass: {', '.join(str(r['steady']['queries']) for r in results)} queries in all)")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return verdict


if __name__ == "__main__":
    sys.exit(main())
