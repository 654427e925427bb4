"""A tiny run of the reconcile benchmark (bench/reconcile_bench.py), so it keeps working; the real
run (100 hosts, 1,000 deployments) is not part of the suite: see bench/README.md."""

import importlib.util
from pathlib import Path

import pytest

from llmhub.fleet import engine, reconcile

SPEC = importlib.util.spec_from_file_location(
    "reconcile_bench", Path(__file__).resolve().parents[2] / "bench" / "reconcile_bench.py"
)


@pytest.mark.django_db
def test_the_benchmark_converges_a_small_fleet_with_constant_queries_per_deployment(monkeypatch):
    bench = importlib.util.module_from_spec(SPEC)
    SPEC.loader.exec_module(bench)
    for name in (
        "container_run",
        "container_get",
        "container_remove",
        "containers_list",
        "image_present",
        "container_logs",
    ):
        monkeypatch.setattr(engine, name, getattr(engine, name))  # restored after the test
    monkeypatch.setattr(reconcile.vllm, "engine_healthy", reconcile.vllm.engine_healthy)

    figures = bench.run(hosts=3, deployments=6, per_deployment=2, repeat=2)

    assert figures["instances_ready"] == figures["containers"] == 12
    assert figures["steady"]["reconciled"] == 0 and figures["steady"]["queries"] <= 10
    assert figures["full"]["reconciled"] == 6
    assert figures["full"]["queries"] - figures["steady"]["queries"] == 4 * 6  # lock, deployment, instances, unlock
    assert figures["steady"]["engine_calls"] == figures["full"]["engine_calls"] == 3  # one listing per host
