"""Placement: best-fit packing, which hosts take instances, why an instance waits, and several
reconcile workers at once never giving one GPU to two instances (engine seam faked)."""

import random
import threading
import time

import pytest
from django.db import connection

from llmhub.deployments.models import Deployment
from llmhub.fleet import reconcile, scaling, scheduler
from llmhub.fleet.models import Host, Instance
from llmhub.fleet.scheduler import instance_place, no_capacity_reason
from tests.factories import DeploymentFactory, GpuTypeFactory, HostFactory, UserFactory
from tests.fakes.engine import FakeEngine


@pytest.fixture
def h100(db):
    return GpuTypeFactory(name="H100-80GB", memory_gb=80, uses_devices=True)


@pytest.fixture
def place(db):
    """place(gpu_type, num_gpus): a new pending instance of a new deployment, placed; the Placement or None."""
    owner = UserFactory(username="packer")

    def place(gpu_type, num_gpus):
        deployment = DeploymentFactory(gpu_type=gpu_type, num_gpus=num_gpus, user=owner)
        instance = Instance.objects.create(deployment=deployment)
        return instance_place(instance_id=instance.id, gpu_type=gpu_type, num_gpus=num_gpus)

    return place


def test_best_fit_fills_partly_used_hosts_first_and_keeps_whole_hosts_free(h100, place):
    a, b, c = (HostFactory(name=n, gpu_type=h100, gpu_count=8) for n in "abc")

    first = place(h100, 2)  # all equal: the lowest id
    second = place(h100, 2)  # a has 6 free, b and c 8: a
    whole = place(h100, 8)  # only an untouched host fits
    half = place(h100, 4)  # a has exactly 4 free: a, not c
    last = place(h100, 8)

    assert (first.host, first.gpu_indexes) == (a, [0, 1])
    assert (second.host, second.gpu_indexes) == (a, [2, 3])
    assert (whole.host, whole.gpu_indexes) == (b, list(range(8)))
    assert (half.host, half.gpu_indexes) == (a, [4, 5, 6, 7])
    assert (last.host, last.gpu_indexes) == (c, list(range(8)))
    assert place(h100, 1) is None


def test_freed_indexes_are_reused_lowest_first(h100, place):
    host = HostFactory(gpu_type=h100, gpu_count=4)
    first, second = place(h100, 2), place(h100, 1)
    Instance.objects.filter(host=host, gpu_indexes=first.gpu_indexes).update(state=Instance.State.STOPPED)

    third = place(h100, 1)

    assert second.gpu_indexes == [2] and third.gpu_indexes == [0]


@pytest.mark.parametrize(
    "state, last_error",
    [(Host.State.CORDONED, ""), (Host.State.DRAINING, ""), (Host.State.UNREACHABLE, ""), (Host.State.READY, "refused")],
)
def test_only_ready_hosts_whose_engine_answers_take_new_instances(h100, place, state, last_error):
    HostFactory(gpu_type=h100, gpu_count=8, state=state, last_error=last_error)

    assert place(h100, 1) is None


def test_the_pending_reason_says_what_is_missing(h100):
    assert no_capacity_reason(gpu_type=h100, num_gpus=2) == "no ready host with H100-80GB GPUs"
    silent = HostFactory(gpu_type=h100, gpu_count=4, last_error="connection refused")
    assert no_capacity_reason(gpu_type=h100, num_gpus=2) == "no H100-80GB host answers"
    Host.objects.filter(id=silent.id).update(last_error="")
    assert no_capacity_reason(gpu_type=h100, num_gpus=8) == "no H100-80GB host has 8 GPUs (the largest has 4)"
    assert no_capacity_reason(gpu_type=h100, num_gpus=2) == "no host with 2 free H100-80GB"


def test_placement_costs_the_same_queries_however_many_instances_run(h100, place, django_assert_num_queries):
    for name in "abcd":
        HostFactory(name=name, gpu_type=h100, gpu_count=8)
    for _ in range(20):
        place(h100, 1)
    deployment = DeploymentFactory(gpu_type=h100, num_gpus=1, user=UserFactory(username="packer"))
    instance = Instance.objects.create(deployment=deployment)

    # savepoint, the GPU type's lock, its hosts, GPUs used per host, indexes on the chosen host, claim, release
    with django_assert_num_queries(7):
        assert instance_place(instance_id=instance.id, gpu_type=h100, num_gpus=1)


@pytest.mark.django_db(transaction=True)
def test_concurrent_reconcile_workers_never_give_one_gpu_to_two_instances(monkeypatch):
    """Six reconcile workers (threads, each with its own database connection) run full passes at once
    over 14 deployments that want more GPUs than 4 hosts have, while a seventh scales and deletes.
    Every placement is checked against all live reservations the moment it commits, and the
    containers' device requests against the reservations at the end."""
    fake = FakeEngine().install(monkeypatch)
    monkeypatch.setattr(reconcile.vllm, "engine_healthy", lambda base_url, **kw: True)
    monkeypatch.setattr(scaling, "DRAIN_MIN_SECONDS", 0.0)  # nothing in flight: stops take effect at once
    h100 = GpuTypeFactory(name="H100-80GB", memory_gb=80, uses_devices=True)
    hosts = [
        HostFactory(name=f"gpu-{n}", gpu_type=h100, gpu_count=4, docker_url=f"unix:///gpu-{n}.sock") for n in range(4)
    ]
    rng = random.Random(4)
    owner = UserFactory(username="many")
    deployments = [
        DeploymentFactory(user=owner, gpu_type=h100, num_gpus=rng.choice([1, 1, 2, 2, 3, 4]),
                          min_instances=rng.randint(1, 2), max_instances=3)
        for _ in range(14)
    ]  # fmt: skip
    violations: list[str] = []
    placed: list[int] = []
    real_used = scheduler.used_gpu_indexes
    real_place = scheduler.instance_place

    def slow_used(host_ids):
        used = real_used(host_ids)
        time.sleep(0.002)  # widen the window between reading the reservations and claiming
        return used

    def checked_place(**kwargs):
        placement = real_place(**kwargs)
        if placement is not None:
            placed.append(threading.get_ident())
            rows = Instance.objects.filter(host=placement.host, state__in=Instance.LIVE_STATES).values_list(
                "id", "gpu_indexes"
            )
            held = [i for _, indexes in rows for i in indexes]
            if len(held) != len(set(held)) or any(i >= placement.host.gpu_count for i in held):
                violations.append(f"host {placement.host.name}: {sorted(held)}")
        return placement

    monkeypatch.setattr(scheduler, "used_gpu_indexes", slow_used)
    monkeypatch.setattr(reconcile, "instance_place", checked_place)
    errors: list[BaseException] = []

    churning = threading.Event()
    churning.set()

    def worker():
        try:
            while churning.is_set():
                reconcile.reconcile_all(full=True)
            for _ in range(2):
                reconcile.reconcile_all(full=True)
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)
        finally:
            connection.close()

    def churn():
        try:
            for step in range(40):
                d = rng.choice(deployments)
                if step % 5 == 4:
                    Deployment.objects.filter(id=d.id).update(status=Deployment.Status.DELETING)
                else:
                    n = rng.randint(0, 3)
                    Deployment.objects.filter(id=d.id).update(min_instances=n, max_instances=3)
                time.sleep(0.05)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            churning.clear()
            connection.close()

    threads = [threading.Thread(target=worker) for _ in range(6)] + [threading.Thread(target=churn)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors, errors
    for _ in range(3):
        reconcile.reconcile_all()

    assert violations == []
    assert len(placed) >= 10 and len(set(placed)) >= 2, (
        "several workers placed instances (the test exercised the scheduler)"
    )
    last_spec = {spec.name: spec for spec in fake.runs}
    for host in hosts:
        live = list(Instance.objects.filter(host=host, state__in=Instance.LIVE_STATES))
        held = [i for instance in live for i in instance.gpu_indexes]
        assert len(held) == len(set(held)) and all(0 <= i < 4 for i in held), (host.name, held)
        containers = fake.hosts[host.docker_url]
        assert sorted(containers) == sorted(i.container_name for i in live if i.container_id)
        for instance in live:
            if instance.container_id:
                assert last_spec[instance.container_name].device_ids == [str(i) for i in instance.gpu_indexes]
    for deployment in Deployment.objects.all():
        live = Instance.objects.filter(deployment=deployment, state__in=Instance.LIVE_STATES)
        assert live.count() == deployment.desired_instances
