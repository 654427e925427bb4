"""The fleet against real Docker Engines: two extra dockerd processes on this machine act as GPU hosts
(see tests/engines.py), running the small fake engine image (workers/images/fake-engine) where
vLLM itself is not what is tested. Each fault is injected for real: engines stopped and restarted,
containers killed and removed behind LLMHub's back, a worker process killed mid-start."""

import json
import os
import subprocess
import sys
import threading
import time
from datetime import timedelta

import httpx
import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.db import connection
from django.utils import timezone

from llmhub.deployments.models import Deployment
from llmhub.deployments.services import deployment_delete
from llmhub.fleet import crashes, engine, reconcile
from llmhub.fleet.models import Host, Instance
from llmhub.fleet.selectors import instance_counts
from tests.engines import GPU, Dockerd, FakeRegistry, containers, register
from tests.factories import DeploymentFactory, GpuTypeFactory, UserFactory
from tests.stack import database_url

pytestmark = [pytest.mark.docker, pytest.mark.django_db]


def until(predicate, *, timeout=60.0, what="the fleet to converge", passes=True):
    """Run reconcile passes (when `passes`) until `predicate()` is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while True:
        if passes:
            reconcile.reconcile_all()
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.3)


def live(deployment):
    return list(Instance.objects.filter(deployment=deployment, state__in=Instance.LIVE_STATES).select_related("host"))


def ready(deployment, count=1):
    instances = live(deployment)
    return instances if len(instances) == count and all(i.state == Instance.State.READY for i in instances) else None


def replaced(deployment, old):
    """The deployment's one instance once it is ready and is not `old`, else None."""
    instances = ready(deployment)
    return instances if instances and instances[0].id != old.id else None


def engine_state(instance) -> dict:
    """What the fake engine in the instance's container reports about itself."""
    return httpx.get(f"{instance.base_url}/fake/state", timeout=5).json()


def test_gpu_hosts_get_exactly_the_reserved_devices_with_shared_memory_and_a_per_host_model_cache(fleet):
    big = DeploymentFactory(user=fleet.owner, gpu_type=fleet.gpu_type, num_gpus=3, model_name="big")
    reconcile.deployment_reconcile(deployment_id=big.id)
    [b1] = until(lambda: ready(big))
    small = DeploymentFactory(user=fleet.owner, gpu_type=fleet.gpu_type, num_gpus=1, model_name="small", min_instances=2, max_instances=2)  # fmt: skip
    reconcile.deployment_reconcile(deployment_id=small.id)
    s1, s2 = until(lambda: ready(small, 2))
    waiting = DeploymentFactory(user=fleet.owner, gpu_type=fleet.gpu_type, num_gpus=4, model_name="wide")
    reconcile.deployment_reconcile(deployment_id=waiting.id)

    # Best fit: the 1-GPU instance fills gpu-a's last GPU before touching gpu-b.
    assert (b1.host_id, b1.gpu_indexes) == (fleet.a.id, [0, 1, 2])
    assert {(s.host_id, tuple(s.gpu_indexes)) for s in (s1, s2)} == {(fleet.a.id, (3,)), (fleet.b.id, (0,))}
    for instance, deployment in ((b1, big), (s1, small), (s2, small)):
        state = engine_state(instance)
        assert state["visible_devices"] == ",".join(map(str, instance.gpu_indexes))  # what the NVIDIA hook got
        assert state["tensor_parallel_size"] == deployment.num_gpus
        assert state["served_model_names"] == [deployment.full_name]
        assert state["shm_bytes"] == 2 * 1024**3
        dockerd = fleet.engines.a if instance.host_id == fleet.a.id else fleet.engines.b
        attrs = dockerd.client().containers.get(instance.container_name).attrs
        [request] = attrs["HostConfig"]["DeviceRequests"]
        assert request["Driver"] == "nvidia" and request["DeviceIDs"] == [str(i) for i in instance.gpu_indexes]
        assert attrs["HostConfig"]["RestartPolicy"]["Name"] == "no"
        assert {(m["Name"], m["Destination"]) for m in attrs["Mounts"]} == {
            (engine.cache_volume_name(settings.CONTAINER_PREFIX, fleet.owner.id), "/root/.cache/huggingface")
        }  # the owner's cache on that host
    assert {c["id"][:12] for c in fleet.engines.a.hook_calls()} >= {
        fleet.engines.a.client().containers.get(i.container_name).id[:12]
        for i in (b1, s1, s2)
        if i.host_id == fleet.a.id
    }
    # The model is downloaded once per host: the second container on gpu-a found it in the host's cache.
    on_a = s1 if s1.host_id == fleet.a.id else s2
    on_b = s2 if on_a is s1 else s1
    assert (engine_state(b1)["cache_hit"], engine_state(on_a)["cache_hit"], engine_state(on_b)["cache_hit"]) == (
        False, True, False,
    )  # fmt: skip

    # No capacity (gpu-a full, gpu-b 3 free): pending, counted, explained, not billed; placed once GPUs free up.
    [pending] = live(waiting)
    assert pending.state == Instance.State.PENDING and pending.started_at is None
    assert instance_counts([waiting.id])[waiting.id] == {"running": 0, "pending": 1}
    assert waiting.events.get(kind="pending").message == f"instance {pending.id} waits: no host with 4 free {GPU}"
    deployment_delete(deployment=small)
    [wide] = until(lambda: ready(waiting))
    assert wide.id == pending.id and (wide.host_id, wide.gpu_indexes) == (fleet.b.id, [0, 1, 2, 3])
    assert (engine_state(wide)["tensor_parallel_size"], engine_state(wide)["visible_devices"]) == (4, "0,1,2,3")
    assert Deployment.objects.get(id=small.id).status == Deployment.Status.DELETED


def test_host_add_over_tls_reads_the_gpus_and_refuses_other_certificates(fleet_engines, db, tmp_path):
    GpuTypeFactory(name=GPU, memory_gb=80, uses_devices=True)
    b = fleet_engines.b
    untrusted = tmp_path / "untrusted"
    untrusted.mkdir()
    for src, name in ((b.tls.ca, "ca.pem"), (b.tls.untrusted_cert, "cert.pem"), (b.tls.untrusted_key, "key.pem")):
        (untrusted / name).write_bytes(src.read_bytes())
    base = ["--gpu-type", GPU, "--engine-image", fleet_engines.image, "--docker-url", b.url, "--bind-address", b.address]  # fmt: skip

    with pytest.raises(CommandError, match="give the TLS client certificates"):
        call_command("host_add", "gpu-t", *base)
    with pytest.raises(CommandError, match="the engine did not answer"):
        call_command("host_add", "gpu-t", *base, "--tls-ca", str(untrusted / "ca.pem"),
                     "--tls-cert", str(untrusted / "cert.pem"), "--tls-key", str(untrusted / "key.pem"))  # fmt: skip
    call_command("host_add", "gpu-t", *base, "--tls-ca", str(b.tls.ca), "--tls-cert", str(b.tls.client_cert),
                 "--tls-key", str(b.tls.client_key))  # fmt: skip

    host = Host.objects.get(name="gpu-t")
    assert (host.docker_url, host.bind_address, host.address, host.gpu_count, host.state) == (
        b.url, b.address, b.address, 4, Host.State.READY,
    )  # fmt: skip
    assert engine.containers_list(host.endpoint, installation="nobody") == []  # the stored credentials work


def test_an_engine_silent_past_the_grace_period_loses_its_instances_and_they_come_back_elsewhere(fleet, settings):
    settings.HOST_UNREACHABLE_GRACE = 8
    deployment = DeploymentFactory(user=fleet.owner, gpu_type=fleet.gpu_type, num_gpus=2)
    [old] = until(lambda: ready(deployment))
    assert old.host_id == fleet.a.id  # both empty: the lowest id

    fleet.engines.a.stop()  # its containers stop with it (no live-restore on gpu-a)
    reconcile.reconcile_all()
    old.refresh_from_db()
    assert old.state == Instance.State.READY  # within the grace period
    heartbeat = Host.objects.get(id=fleet.a.id).heartbeat_at
    time.sleep(max((heartbeat + timedelta(seconds=8.2) - timezone.now()).total_seconds(), 0))
    reconcile.reconcile_all()

    old.refresh_from_db()
    a = Host.objects.get(id=fleet.a.id)
    assert a.state == Host.State.UNREACHABLE and "did not answer" in a.last_error
    assert old.state == Instance.State.LOST and old.stopped_at == heartbeat  # billed to the last heartbeat
    [new] = until(lambda: ready(deployment))
    assert new.host_id == fleet.b.id and new.restarts == 0
    assert engine_state(new)["visible_devices"] == "0,1"

    fleet.engines.a.start()  # the old, stopped container is still in its data root
    assert [c.name for c in containers(fleet.engines.a)] == [old.container_name]
    reconcile.reconcile_all()

    assert Host.objects.get(id=fleet.a.id).state == Host.State.READY
    assert containers(fleet.engines.a) == []  # swept: no live instance of gpu-a accounts for it
    assert [i.id for i in live(deployment)] == [new.id]


def test_an_engine_restart_replaces_its_instances_or_with_live_restore_keeps_them(fleet):
    Host.objects.filter(id=fleet.b.id).update(state=Host.State.CORDONED)
    on_a = DeploymentFactory(user=fleet.owner, gpu_type=fleet.gpu_type, num_gpus=1, model_name="on-a")
    [a1] = until(lambda: ready(on_a))
    Host.objects.filter(id=fleet.b.id).update(state=Host.State.READY)
    Host.objects.filter(id=fleet.a.id).update(state=Host.State.CORDONED)
    on_b = DeploymentFactory(user=fleet.owner, gpu_type=fleet.gpu_type, num_gpus=1, model_name="on-b")
    [b1] = until(lambda: ready(on_b))
    Host.objects.filter(id=fleet.a.id).update(state=Host.State.READY)
    b1_container = fleet.engines.b.client().containers.get(b1.container_name).id

    fleet.engines.a.restart()
    fleet.engines.b.restart()  # --live-restore: its containers keep running
    [a2] = until(lambda: replaced(on_a, a1))

    a1.refresh_from_db()
    assert a1.state == Instance.State.LOST and "stopped from outside" in a1.last_error
    assert a2.restarts == 0 and not on_a.events.filter(kind="crashed").exists()
    assert a1.stopped_at is not None and a1.started_at < a1.stopped_at <= timezone.now()
    assert engine_state(a2)["loaded"] is True
    [b_again] = ready(on_b)
    assert b_again.id == b1.id and b_again.container_id == b1_container  # recovered as it was
    assert engine_state(b_again)["served_model_names"] == [on_b.full_name]


def test_containers_without_a_row_are_removed_and_rows_without_a_container_replaced(fleet):
    deployment = DeploymentFactory(user=fleet.owner, gpu_type=fleet.gpu_type, num_gpus=1)
    [first] = until(lambda: ready(deployment))
    client = fleet.engines.a.client()
    stray = client.containers.run(
        fleet.engines.image, ["--model", "x/stray"], detach=True, name=f"{settings.CONTAINER_PREFIX}-999999",
        labels={engine.LABEL_INSTANCE: "999999", engine.LABEL_INSTALLATION: settings.CONTAINER_PREFIX},
    )  # fmt: skip
    client.containers.get(first.container_name).remove(force=True)

    [second] = until(lambda: replaced(deployment, first))

    first.refresh_from_db()
    assert first.state == Instance.State.LOST and first.last_error == "container disappeared"
    with pytest.raises(Exception, match="404"):
        client.containers.get(stray.id)
    assert sorted(c.name for c in containers(fleet.engines.a) + containers(fleet.engines.b)) == [second.container_name]


def test_a_crashing_engine_restarts_with_backoff_then_fails_with_its_last_log_lines(fleet, settings, monkeypatch):
    settings.INSTANCE_MAX_RESTARTS = 2
    monkeypatch.setattr(crashes, "BACKOFF_BASE_SECONDS", 1.0)
    deployment = DeploymentFactory(user=fleet.owner, gpu_type=fleet.gpu_type, num_gpus=1)
    [first] = until(lambda: ready(deployment))
    httpx.post(
        f"{first.base_url}/fake/exit", json={"code": 3, "message": "RuntimeError: CUDA error: illegal memory access"}
    )

    [second] = until(lambda: [i for i in live(deployment) if i.id != first.id])
    first.refresh_from_db()
    assert first.state == Instance.State.STOPPED and first.stopped_at > first.started_at
    assert "exited with code 3" in first.last_error and "illegal memory access" in first.last_error
    assert second.restarts == 1 and second.state == Instance.State.PENDING
    assert timedelta(seconds=0.5) < second.next_attempt_at - second.created_at <= timedelta(seconds=1)  # backoff 1 s
    [second] = until(lambda: ready(deployment))
    assert second.started_at >= second.next_attempt_at  # waited out the backoff

    # An engine that dies at every start (an unknown repo): restarted twice, then failed.
    broken = DeploymentFactory(user=fleet.owner, gpu_type=fleet.gpu_type, num_gpus=1, hf_repo="nobody/missing-model")
    until(lambda: Deployment.objects.get(id=broken.id).status == Deployment.Status.FAILED, timeout=60)

    broken.refresh_from_db()
    assert "exited with code 1" in broken.fail_reason
    assert "RepositoryNotFoundError" in broken.fail_reason and "nobody/missing-model" in broken.fail_reason
    assert Instance.objects.filter(deployment=broken).count() == 3
    assert [i.restarts for i in Instance.objects.filter(deployment=broken).order_by("id")] == [0, 1, 2]
    assert not live(broken)
    assert {c.name for c in containers(fleet.engines.a) + containers(fleet.engines.b)} == {second.container_name}


def test_an_engine_that_keeps_exiting_with_code_0_backs_off_then_fails(fleet, settings, monkeypatch):
    settings.INSTANCE_MAX_RESTARTS = 2
    monkeypatch.setattr(crashes, "BACKOFF_BASE_SECONDS", 1.0)
    deployment = DeploymentFactory(user=fleet.owner, gpu_type=fleet.gpu_type, num_gpus=1)

    def exit_when_ready():  # the engine stops by itself, cleanly, each time it has come up
        if Deployment.objects.get(id=deployment.id).status == Deployment.Status.FAILED:
            return True
        for instance in ready(deployment) or []:
            try:
                httpx.post(f"{instance.base_url}/fake/exit", json={"code": 0, "message": "INFO shutting down"})
            except httpx.ConnectError:  # it already exited and the reconciler has not seen it yet
                pass
        return False

    until(exit_when_ready, timeout=120, what="the deployment to fail")

    deployment.refresh_from_db()
    assert "exited with code 0" in deployment.fail_reason and "shutting down" in deployment.fail_reason
    rows = list(Instance.objects.filter(deployment=deployment).order_by("id"))
    assert [i.restarts for i in rows] == [0, 1, 2] and all(i.crashed_at for i in rows)
    assert all(b.started_at >= b.next_attempt_at for b in rows[1:])  # each waited out its backoff
    assert not deployment.events.filter(kind="lost").exists() and not live(deployment)
    assert containers(fleet.engines.a) + containers(fleet.engines.b) == []


def test_a_returning_hosts_gpus_go_to_a_new_instance_only_once_its_old_container_is_gone(fleet, settings, monkeypatch):
    settings.HOST_UNREACHABLE_GRACE = 8
    Host.objects.filter(id=fleet.a.id).update(state=Host.State.CORDONED)
    first = DeploymentFactory(user=fleet.owner, gpu_type=fleet.gpu_type, num_gpus=4, model_name="first")
    [old] = until(lambda: ready(first))
    assert (old.host_id, old.gpu_indexes) == (fleet.b.id, [0, 1, 2, 3])
    Host.objects.filter(id=fleet.a.id).update(state=Host.State.READY)

    fleet.engines.b.stop()  # --live-restore: its container keeps running, on GPUs 0-3
    until(lambda: Instance.objects.get(id=old.id).state == Instance.State.LOST, timeout=60, what="the loss")
    [moved] = until(lambda: ready(first))
    assert moved.host_id == fleet.a.id
    second = DeploymentFactory(user=fleet.owner, gpu_type=fleet.gpu_type, num_gpus=4, model_name="second")
    reconcile.reconcile_all()
    assert [i.state for i in live(second)] == [Instance.State.PENDING]  # gpu-a full, gpu-b silent
    running_at_start = []
    real_run = engine.container_run

    def run(target, spec):  # what else runs on gpu-b when a container is started there
        if engine.endpoint_of(target).url == fleet.engines.b.url:
            running_at_start.append(sorted(c.name for c in containers(fleet.engines.b) if c.status == "running"))
        return real_run(target, spec)

    monkeypatch.setattr(engine, "container_run", run)
    fleet.engines.b.start()
    assert [c.name for c in containers(fleet.engines.b) if c.status == "running"] == [old.container_name]

    [placed] = until(lambda: ready(second))

    assert (placed.host_id, placed.gpu_indexes) == (fleet.b.id, [0, 1, 2, 3])
    assert running_at_start[0] == []  # the old container was gone before the new one got its GPUs
    assert [c.name for c in containers(fleet.engines.b)] == [placed.container_name]


KILL_AFTER_CREATE = """
import os, django
django.setup()
from llmhub.fleet import engine, reconcile
real = engine.container_run
def run_then_die(target, spec):
    real(target, spec)
    os._exit(9)  # as SIGKILL would: nothing after this runs, no transaction or lock is tidied up
engine.container_run = run_then_die
reconcile.deployment_reconcile(deployment_id=int(os.environ["DEPLOYMENT_ID"]))
"""


def kill_a_worker_after_create(deployment):
    env = {**os.environ, "DATABASE_URL": database_url(), "DEPLOYMENT_ID": str(deployment.id)}
    done = subprocess.run(
        [sys.executable, "-c", KILL_AFTER_CREATE], env=env, cwd=settings.BASE_DIR, capture_output=True
    )
    assert done.returncode == 9, done.stderr.decode()


@pytest.mark.django_db(transaction=True)
def test_a_worker_killed_between_creating_and_recording_a_container_leaves_no_double_and_no_orphan(fleet):
    kept = DeploymentFactory(user=fleet.owner, gpu_type=fleet.gpu_type, num_gpus=1, model_name="kept")
    kill_a_worker_after_create(kept)
    [instance] = live(kept)
    assert instance.state == Instance.State.STARTING and instance.container_id == ""
    [made] = containers(fleet.engines.a) + containers(fleet.engines.b)

    [adopted] = until(lambda: ready(kept))

    assert adopted.id == instance.id and adopted.container_id == made.id
    assert [c.id for c in containers(fleet.engines.a) + containers(fleet.engines.b)] == [made.id]

    dropped = DeploymentFactory(user=fleet.owner, gpu_type=fleet.gpu_type, num_gpus=1, model_name="dropped")
    kill_a_worker_after_create(dropped)
    assert len(containers(fleet.engines.a) + containers(fleet.engines.b)) == 2
    deployment_delete(deployment=dropped)

    until(lambda: Deployment.objects.get(id=dropped.id).status == Deployment.Status.DELETED)
    assert [c.id for c in containers(fleet.engines.a) + containers(fleet.engines.b)] == [made.id]


@pytest.mark.django_db(transaction=True)
def test_a_host_without_the_engine_image_pulls_it_with_progress_in_the_events(fleet_engines, tmp_path, monkeypatch):
    from llmhub import queue
    from llmhub.fleet import services

    registry = FakeRegistry(tmp_path / "registry")
    image = registry.add(fleet_engines.main, fleet_engines.image, name="llmhub/fake-engine", tag="pull-test")
    registry.start()
    fresh = Dockerd("gpu-c", base=tmp_path / "c", index=3, address="127.0.0.4", gpus=2)
    workers = []

    def worker(pull_id, attempt):  # the task, in a thread as in a worker process of its own
        try:
            services.image_pull_run(pull_id=pull_id, attempt=attempt)
        finally:
            connection.close()

    def send_task(name, args):  # image_pull: reconcile_soon is stubbed below
        pull_id, attempt = args
        workers.append(threading.Thread(target=worker, args=(pull_id, attempt)))
        workers[-1].start()

    monkeypatch.setattr(queue.app, "send_task", send_task)
    monkeypatch.setattr(services, "reconcile_soon", lambda deployment_id: None)
    try:
        fresh.start()
        host = register(fresh, GpuTypeFactory(name=GPU, memory_gb=80, uses_devices=True), image=image)
        deployment = DeploymentFactory(user=UserFactory(username="puller"), gpu_type=host.gpu_type, num_gpus=2)

        [instance] = until(lambda: ready(deployment), timeout=120)

        events = list(deployment.events.order_by("id").values_list("kind", "message"))
        kinds = [k for k, _ in events]
        assert kinds[:2] == ["scheduled", "pulling"] and "pulled" in kinds
        progress = [m for k, m in events if k == "pulling"][1:]
        assert len(progress) >= 1 and all("the host pulls the engine image: " in m and "MB of" in m for m in progress)
        assert kinds.index("pulled") < kinds.index("starting") < kinds.index("ready")
        assert registry.blob_downloads >= 2
        assert engine_state(instance)["visible_devices"] == "0,1"
        assert instance.started_at > host.image_pulls.get().started_at  # pull time is not billed
        assert len(workers) == 1  # one pull, however many passes waited for it
    finally:
        for thread in workers:
            thread.join(timeout=60)
        registry.stop()
        fresh.destroy()


def test_container_info_times_and_exit_codes_come_from_the_engine(fleet_engines):
    client = fleet_engines.a.client()
    container = client.containers.run(
        fleet_engines.image, ["--model", "nobody/missing-x"], detach=True,
        labels={engine.LABEL_INSTANCE: "1", engine.LABEL_INSTALLATION: "times-test"},
    )  # fmt: skip
    try:
        container.wait(timeout=30)
        info = engine.container_get(fleet_engines.a.endpoint, container.name)
        [listed] = engine.containers_list(fleet_engines.a.endpoint, installation="times-test")
        assert (info.status, info.exit_code, info.oom_killed) == ("exited", 1, False)
        assert info.started_at < info.finished_at <= timezone.now()
        assert (listed.status, listed.exit_code, listed.started_at) == ("exited", 1, None)
        assert "RepositoryNotFoundError" in engine.container_logs(fleet_engines.a.endpoint, container.name, tail=3)
    finally:
        container.remove(force=True)
    with pytest.raises(engine.EngineUnreachable):
        engine.containers_list("unix:///nonexistent/docker.sock", installation="x")
    assert json.loads(json.dumps(engine.engine_facts(fleet_engines.b.endpoint).gpu_ids)) == [
        f"GPU-gpu-b-{i}" for i in range(4)
    ]
