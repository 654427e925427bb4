"""Hosts and faults with the engine seam faked: registration, cordon/drain, lost hosts, engine
restarts, vanished containers, orphans, a worker killed mid-start, and what a pass costs."""

from datetime import timedelta
from io import StringIO

import pytest
from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from llmhub.deployments.models import Deployment
from llmhub.deployments.services import deployment_delete
from llmhub.fleet import crashes, engine, reconcile, services
from llmhub.fleet.models import Host, Instance
from llmhub.fleet.selectors import instance_counts
from tests.factories import DeploymentFactory, GpuTypeFactory, HostFactory, UserFactory

pytestmark = pytest.mark.django_db

A, B = "unix:///run/gpu-a.sock", "unix:///run/gpu-b.sock"


@pytest.fixture
def h100(db):
    return GpuTypeFactory(name="H100-80GB", memory_gb=80, uses_devices=True)


@pytest.fixture
def hosts(h100):
    return (
        HostFactory(
            name="gpu-a", gpu_type=h100, gpu_count=2, docker_url=A, address="10.0.0.1", bind_address="10.0.0.1"
        ),
        HostFactory(
            name="gpu-b", gpu_type=h100, gpu_count=2, docker_url=B, address="10.0.0.2", bind_address="10.0.0.2"
        ),
    )


@pytest.fixture
def owner(db):
    return UserFactory(username="owner")


def converge(passes=2):
    for _ in range(passes):
        reconcile.reconcile_all()


def live(deployment):
    return list(Instance.objects.filter(deployment=deployment, state__in=Instance.LIVE_STATES).select_related("host"))


def kinds(deployment):
    return list(deployment.events.order_by("id").values_list("kind", flat=True))


# --- registration ---------------------------------------------------------------------------------


def test_a_host_registers_with_the_gpus_its_engine_advertises_or_a_count_by_hand(fake, h100):
    fake.gpus[A] = 8

    host = services.host_register(name="gpu-a", docker_url=A, address="10.0.0.1", gpu_type=h100, engine_image="vllm")
    by_hand = services.host_register(
        name="gpu-b", docker_url=B, address="10.0.0.2", gpu_type=h100, engine_image="vllm", gpu_count=4
    )

    assert (host.gpu_count, host.state) == (8, Host.State.READY)
    assert by_hand.gpu_count == 4
    with pytest.raises(ValidationError, match="advertises no GPUs"):
        services.host_register(name="gpu-c", docker_url=B, address="10.0.0.3", gpu_type=h100, engine_image="vllm")


@pytest.mark.parametrize(
    "url, message",
    [
        ("http://gpu-1:2376", "is not a Docker Engine URL"),
        ("unix://var/run/docker.sock", "is not a unix socket URL"),
        ("tcp://:2376", "is not an engine address"),
        ("tcp://gpu-1:99999", "has a bad port"),
        ("tcp://gpu-1:2376", "give the TLS client certificates"),
        ("", "is not a Docker Engine URL"),
    ],
)
def test_a_bad_docker_url_is_refused_with_what_to_write(fake, h100, url, message):
    with pytest.raises(ValidationError) as caught:
        services.host_register(
            name="gpu-x", docker_url=url, address="10.0.0.9", gpu_type=h100, engine_image="v", gpu_count=1
        )

    assert message in " ".join(caught.value.message_dict["docker_url"])
    assert not Host.objects.exists()


def test_other_bad_fields_are_named(fake, h100):
    with pytest.raises(ValidationError) as caught:
        services.host_register(
            name=" ", docker_url=A, address="10.0.0.1/24", gpu_type=h100, engine_image="", gpu_count=0
        )

    assert set(caught.value.message_dict) == {"name", "address", "bind_address", "engine_image", "gpu_count"}


def test_a_tcp_host_keeps_its_client_key_encrypted(fake, h100):
    tls = engine.TlsCredentials(ca_cert="CA PEM", client_cert="CERT PEM", client_key="SECRET KEY PEM")

    host = services.host_register(
        name="gpu-t", docker_url="tcp://gpu-t.internal", address="gpu-t.internal", gpu_type=h100, engine_image="v",
        gpu_count=8, tls=tls, bind_address="10.0.0.9",
    )  # fmt: skip

    host.refresh_from_db()
    assert host.docker_url == "tcp://gpu-t.internal:2376"
    assert "SECRET" not in host.tls_client_key_encrypted
    assert host.endpoint == engine.Endpoint(url="tcp://gpu-t.internal:2376", tls=tls)
    with pytest.raises(ValidationError, match="needs all three"):
        services.host_register(
            name="gpu-u", docker_url="tcp://gpu-u:2376", address="gpu-u", gpu_type=h100, engine_image="v", gpu_count=8,
            tls=engine.TlsCredentials(ca_cert="CA", client_cert="", client_key="KEY"),
        )  # fmt: skip


def test_host_add_registers_a_host_and_says_what_it_found(fake, h100):
    fake.gpus[A] = 4
    out = StringIO()

    call_command(
        "host_add", "gpu-a", "--docker-url", A, "--gpu-type", "H100-80GB", "--engine-image", "vllm:1", stdout=out
    )

    host = Host.objects.get(name="gpu-a")
    assert (host.docker_url, host.address, host.gpu_count, host.engine_image) == (A, "127.0.0.1", 4, "vllm:1")
    assert "4 × H100-80GB (advertised by the engine)" in out.getvalue()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--docker-url", "http://x"], "--docker-url: 'http://x' is not a Docker Engine URL"),
        (["--docker-url", A, "--gpu-type", "A100"], "Unknown GPU type 'A100' (known: H100-80GB)"),
        (["--docker-url", B], "advertises no GPUs (dockerd --node-generic-resource NVIDIA-GPU=<uuid>): give their number with --gpus N"),
        (["--docker-url", "unix:///run/down.sock", "--gpus", "2"], "the engine did not answer"),
        (["--docker-url", "tcp://gpu-9:2376", "--tls-ca", "/nonexistent/ca.pem"], "TLS needs all three"),
        (["--docker-url", "tcp://gpu-9:2376", "--tls-ca", "/no/ca.pem", "--tls-cert", "/no/c.pem", "--tls-key", "/no/k.pem"],
         "--tls-ca: cannot read /no/ca.pem"),
        (["--docker-url", A, "--address", "10.0.0.1 extra"], "address: '10.0.0.1 extra' is not a host address"),
    ],
)  # fmt: skip
def test_host_add_refuses_bad_input_with_a_clear_error(fake, h100, args, message):
    fake.gpus[A] = 4
    fake.down.add("unix:///run/down.sock")
    argv = ["gpu-a", "--gpu-type", "H100-80GB", "--engine-image", "vllm:1", *args]

    with pytest.raises(CommandError) as caught:
        call_command("host_add", *argv)

    assert message in str(caught.value)
    assert not Host.objects.exists()


# --- cordon, drain, uncordon --------------------------------------------------------------------


def test_cordon_drain_uncordon_move_between_states_and_say_when_they_cannot(hosts):
    a, _ = hosts

    assert services.host_cordon(host=a) is True and a.state == Host.State.CORDONED
    assert services.host_cordon(host=a) is False
    assert services.host_drain(host=a) is True and a.state == Host.State.DRAINING
    assert services.host_uncordon(host=a) is True and a.state == Host.State.READY
    Host.objects.filter(id=a.id).update(state=Host.State.UNREACHABLE)
    with pytest.raises(ValidationError, match="gpu-a is unreachable: it cannot be drained until its engine answers"):
        services.host_drain(host=a)


def test_admin_lists_gpus_used_and_runs_the_actions(fake, hosts, owner, admin_client):
    a, b = hosts
    DeploymentFactory(user=owner, gpu_type=a.gpu_type, num_gpus=2)
    converge()

    page = admin_client.get("/admin/fleet/host/")
    response = admin_client.post(
        "/admin/fleet/host/", {"action": "drain", "_selected_action": [a.id, b.id]}, follow=True
    )  # fmt: skip
    Host.objects.filter(id=b.id).update(state=Host.State.UNREACHABLE)
    refused = admin_client.post("/admin/fleet/host/", {"action": "uncordon", "_selected_action": [b.id]}, follow=True)

    assert page.status_code == 200
    assert "2 / 2" in page.content.decode() and "0 / 2" in page.content.decode()
    assert "2 host(s) draining." in response.content.decode()
    assert set(Host.objects.values_list("state", flat=True)) == {Host.State.DRAINING, Host.State.UNREACHABLE}
    assert "gpu-b is unreachable" in refused.content.decode()


def test_admin_add_form_checks_the_url_and_reads_the_gpus(fake, h100, admin_client):
    fake.gpus[A] = 8
    form = {"name": "gpu-a", "address": "10.0.0.1", "bind_address": "10.0.0.1", "gpu_type": h100.id, "engine_image": "vllm:1", "tls_ca_cert": "",
            "tls_client_cert": "", "tls_client_key": "", "gpu_count": ""}  # fmt: skip

    bad = admin_client.post("/admin/fleet/host/add/", {**form, "docker_url": "tcp://gpu-a:2376"})
    good = admin_client.post("/admin/fleet/host/add/", {**form, "docker_url": A})

    assert bad.status_code == 200 and "needs the TLS CA, client certificate and client key" in bad.content.decode()
    assert good.status_code == 302
    assert Host.objects.get(name="gpu-a").gpu_count == 8


# --- scheduling, capacity ---------------------------------------------------------------------------


def test_gpu_hosts_get_their_reserved_devices_and_tensor_parallel_size(fake, hosts, owner):
    one = DeploymentFactory(user=owner, gpu_type=hosts[0].gpu_type, num_gpus=1)
    two = DeploymentFactory(user=owner, gpu_type=hosts[0].gpu_type, num_gpus=2)
    converge()

    specs = {s.labels[engine.LABEL_DEPLOYMENT]: (url, s) for url, s in zip(fake.run_urls, fake.runs)}
    url, spec = specs[two.deploy_id]  # the newest deployment is reconciled first: both hosts empty, a wins
    assert url == A and spec.device_ids == ["0", "1"] and spec.publish_ip == "10.0.0.1"
    assert spec.args[spec.args.index("--tensor-parallel-size") + 1] == "2"
    assert specs[one.deploy_id][0] == B and specs[one.deploy_id][1].device_ids == ["0"]
    assert engine.run_kwargs(spec)["shm_size"] == "2g"
    volume = engine.cache_volume_name(settings.CONTAINER_PREFIX, owner.id)  # the owner's own cache
    assert engine.run_kwargs(spec)["volumes"] == {volume: {"bind": "/root/.cache/huggingface", "mode": "rw"}}


def test_a_pending_instance_is_placed_in_the_pass_that_frees_its_gpus_and_is_never_billed_while_waiting(
    fake, hosts, owner
):
    Host.objects.filter(id=hosts[1].id).update(state=Host.State.CORDONED)
    older = DeploymentFactory(user=owner, gpu_type=hosts[0].gpu_type, num_gpus=2)
    converge()
    newer = DeploymentFactory(user=owner, gpu_type=hosts[0].gpu_type, num_gpus=2)  # reconciled first: newest first
    converge()
    [waiting] = live(newer)
    assert waiting.state == Instance.State.PENDING and waiting.started_at is None
    assert instance_counts([older.id, newer.id]) == {
        older.id: {"running": 1, "pending": 0},
        newer.id: {"running": 0, "pending": 1},
    }
    assert newer.events.filter(kind="pending").get().message.endswith("waits: no host with 2 free H100-80GB")

    deployment_delete(deployment=older)
    reconcile.reconcile_all()  # newer fails to place, older stops, newer placed in the same pass

    waiting.refresh_from_db()
    assert waiting.state == Instance.State.STARTING and waiting.host_id == hosts[0].id
    assert waiting.started_at is not None and waiting.created_at < waiting.started_at


# --- hosts that stop answering ---------------------------------------------------------------------


def test_a_host_silent_past_the_grace_period_loses_its_instances_billed_to_its_last_heartbeat(
    fake, hosts, owner, settings
):
    settings.HOST_UNREACHABLE_GRACE = 60
    a, b = hosts
    deployment = DeploymentFactory(user=owner, gpu_type=a.gpu_type, num_gpus=2)
    converge()
    [instance] = live(deployment)
    assert (instance.host_id, instance.state) == (a.id, Instance.State.READY)
    old_container = instance.container_name

    fake.down.add(A)
    reconcile.reconcile_all()  # within the grace period: nothing lost, nothing new placed there
    a.refresh_from_db()
    instance.refresh_from_db()
    assert a.state == Host.State.READY and "did not answer" in a.last_error
    assert instance.state == Instance.State.READY and instance.stopped_at is None

    heartbeat = timezone.now() - timedelta(seconds=61)
    Host.objects.filter(id=a.id).update(heartbeat_at=heartbeat)  # as if a minute had passed
    Instance.objects.filter(id=instance.id).update(started_at=heartbeat - timedelta(seconds=600))
    reconcile.reconcile_all()

    a.refresh_from_db()
    instance.refresh_from_db()
    assert a.state == Host.State.UNREACHABLE and a.resume_state == Host.State.READY
    assert instance.state == Instance.State.LOST and instance.stopped_at == heartbeat
    [replacement] = live(deployment)
    assert replacement.host_id == b.id and replacement.restarts == 0
    reconcile.reconcile_all()
    replacement.refresh_from_db()
    assert replacement.state == Instance.State.READY
    assert "lost" in kinds(deployment) and "crashed" not in kinds(deployment)

    fake.down.discard(A)  # the engine answers again, its old container still running
    reconcile.reconcile_all()

    a.refresh_from_db()
    assert a.state == Host.State.READY and a.last_error == ""
    assert old_container not in fake.hosts[A]  # swept: no live instance accounts for it
    assert [i.id for i in live(deployment)] == [replacement.id]


def test_a_cordoned_host_that_was_lost_comes_back_cordoned(fake, hosts, settings):
    settings.HOST_UNREACHABLE_GRACE = 0
    a, _ = hosts
    services.host_cordon(host=a)
    fake.down.add(A)
    reconcile.reconcile_all()
    assert Host.objects.get(id=a.id).state == Host.State.UNREACHABLE

    fake.down.discard(A)
    reconcile.reconcile_all()

    assert Host.objects.get(id=a.id).state == Host.State.CORDONED


def test_an_engine_that_fails_at_start_gives_the_gpus_back_and_the_instance_goes_elsewhere(fake, hosts, owner):
    a, b = hosts
    deployment = DeploymentFactory(user=owner, gpu_type=a.gpu_type, num_gpus=2)
    fake.down.add(A)  # not yet observed: the placement still picks a

    reconcile.deployment_reconcile(deployment_id=deployment.id)
    [instance] = live(deployment)
    assert (instance.state, instance.host_id, instance.gpu_indexes) == (Instance.State.PENDING, None, [])
    reconcile.deployment_reconcile(deployment_id=deployment.id)

    instance.refresh_from_db()
    assert instance.host_id == b.id and instance.state == Instance.State.STARTING
    assert kinds(deployment)[:3] == ["scheduled", "unplaced", "scheduled"]
    assert instance.restarts == 0 and "crashed" not in kinds(deployment)


# --- drains -------------------------------------------------------------------------------------------


def test_a_drain_starts_the_replacement_first_stops_the_old_instance_once_it_serves_then_cordons(fake, hosts, owner):
    a, b = hosts
    deployment = DeploymentFactory(user=owner, gpu_type=a.gpu_type, num_gpus=2)
    converge()
    [old] = live(deployment)
    assert old.host_id == a.id

    services.host_drain(host=a)
    fake.healthy = False
    reconcile.reconcile_all()
    old.refresh_from_db()
    [new] = [i for i in live(deployment) if i.id != old.id]
    assert old.state == Instance.State.READY  # still serving while the replacement starts
    assert new.host_id == b.id and new.state == Instance.State.STARTING

    fake.healthy = True
    converge()

    old.refresh_from_db()
    assert old.state == Instance.State.STOPPED and old.container_name not in fake.hosts[A]
    assert [(i.id, i.state) for i in live(deployment)] == [(new.id, Instance.State.READY)]
    assert Host.objects.get(id=a.id).state == Host.State.CORDONED
    assert "moved" in kinds(deployment)


def test_a_drain_with_no_room_elsewhere_keeps_serving_and_waits(fake, hosts, owner):
    a, b = hosts
    services.host_cordon(host=b)
    deployment = DeploymentFactory(user=owner, gpu_type=a.gpu_type, num_gpus=2)
    converge()
    services.host_drain(host=a)

    converge()

    states = sorted(i.state for i in live(deployment))
    assert states == [Instance.State.PENDING, Instance.State.READY]
    assert Host.objects.get(id=a.id).state == Host.State.DRAINING
    assert deployment.events.filter(kind="pending").last().message.endswith("no ready host with H100-80GB GPUs")

    services.host_uncordon(host=a)  # the drain is called off: the waiting replacement goes
    converge()
    [kept] = live(deployment)
    assert kept.state == Instance.State.READY and kept.host_id == a.id


# --- containers that end ----------------------------------------------------------------------------


@pytest.mark.parametrize("code", [0, 143, 137])
def test_a_container_stopped_by_its_engines_restart_is_replaced_at_once_without_counting_a_crash(
    fake, hosts, owner, code
):
    deployment = DeploymentFactory(user=owner, gpu_type=hosts[0].gpu_type, num_gpus=1)
    converge()
    [first] = live(deployment)
    fake.restart_engine(first.host.docker_url, code)  # the engine forgets the container's death
    finished = fake.containers[first.container_name].finished_at

    converge()

    first.refresh_from_db()
    assert first.state == Instance.State.LOST and first.stopped_at == finished
    [second] = live(deployment)
    assert second.state == Instance.State.READY and second.restarts == 0 and second.next_attempt_at is None
    assert "crashed" not in kinds(deployment) and Deployment.objects.get(id=deployment.id).status == "running"


def test_an_out_of_memory_kill_is_a_crash_with_backoff(fake, hosts, owner):
    deployment = DeploymentFactory(user=owner, gpu_type=hosts[0].gpu_type, num_gpus=1)
    converge()
    [first] = live(deployment)
    fake.exit(first.container_name, 137, oom=True)

    reconcile.reconcile_all()

    first.refresh_from_db()
    assert first.state == Instance.State.STOPPED
    assert first.last_error.startswith("container exited with code 137 (killed: out of memory)")
    [second] = live(deployment)
    assert second.restarts == 1 and second.next_attempt_at > timezone.now() + timedelta(seconds=4)
    assert deployment.events.filter(kind="crashed").get().message.endswith("restart 1 of 3 in 5 s")


def test_backoff_doubles_with_each_crash():
    assert [crashes.restart_backoff(n) for n in (1, 2, 3, 4, 8, 20)] == [5, 10, 20, 40, 300, 300]


def test_a_container_removed_behind_llmhubs_back_is_replaced(fake, hosts, owner):
    deployment = DeploymentFactory(user=owner, gpu_type=hosts[0].gpu_type, num_gpus=1)
    converge()
    [first] = live(deployment)
    fake.vanish(first.container_name)

    converge()

    first.refresh_from_db()
    assert first.state == Instance.State.LOST and first.last_error == "container disappeared"
    [second] = live(deployment)
    assert second.state == Instance.State.READY and second.container_name in fake.containers


def test_billing_follows_the_engines_start_and_finish_times(fake, hosts, owner):
    deployment = DeploymentFactory(user=owner, gpu_type=hosts[0].gpu_type, num_gpus=1)
    converge()
    [first] = live(deployment)
    container = fake.containers[first.container_name]
    fake.exit(first.container_name, 1)
    finished = fake.containers[first.container_name].finished_at

    reconcile.reconcile_all()

    first.refresh_from_db()
    assert (first.started_at, first.stopped_at) == (container.started_at, finished)


def test_orphans_are_removed_with_no_row_on_the_wrong_host_or_without_an_instance_label(fake, hosts, owner, settings):
    deployment = DeploymentFactory(user=owner, gpu_type=hosts[0].gpu_type, num_gpus=1)
    converge()
    [instance] = live(deployment)
    labels = {engine.LABEL_INSTANCE: str(instance.id), engine.LABEL_INSTALLATION: settings.CONTAINER_PREFIX}
    image = "llmhub/vllm-cpu:test"
    fake.container_run(B, engine.ContainerSpec(name="copy-on-b", image=image, args=[], labels=labels))
    fake.container_run(B, engine.ContainerSpec(name="no-row", image=image, args=[], labels={**labels, engine.LABEL_INSTANCE: "99999"}))  # fmt: skip
    fake.container_run(B, engine.ContainerSpec(name="bad-label", image=image, args=[], labels={**labels, engine.LABEL_INSTANCE: "x"}))  # fmt: skip
    fake.container_run(B, engine.ContainerSpec(name="other-install", image=image, args=[], labels={**labels, engine.LABEL_INSTALLATION: "elsewhere"}))  # fmt: skip

    reconcile.reconcile_all()

    assert sorted(fake.hosts[B]) == ["other-install"]
    assert list(fake.hosts[A]) == [instance.container_name]


# --- a worker killed mid-start --------------------------------------------------------------------


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (not even `except Exception`)."""


def kill_after_create(fake, monkeypatch):
    def run_then_die(target, spec):
        fake.container_run(target, spec)
        raise Killed

    monkeypatch.setattr(engine, "container_run", run_then_die)


def test_a_container_made_by_a_worker_killed_before_recording_it_is_adopted(fake, hosts, owner, monkeypatch):
    deployment = DeploymentFactory(user=owner, gpu_type=hosts[0].gpu_type, num_gpus=1)
    kill_after_create(fake, monkeypatch)
    with pytest.raises(Killed):
        reconcile.deployment_reconcile(deployment_id=deployment.id)
    [instance] = live(deployment)
    assert instance.state == Instance.State.STARTING and instance.container_id == ""
    made = fake.containers[instance.container_name]
    monkeypatch.setattr(engine, "container_run", fake.container_run)

    converge()

    instance.refresh_from_db()
    assert instance.state == Instance.State.READY and instance.container_id == made.id
    assert list(fake.containers) == [instance.container_name]
    assert Instance.objects.filter(deployment=deployment).count() == 1


def test_a_container_made_by_a_killed_worker_for_a_deleted_deployment_is_removed(fake, hosts, owner, monkeypatch):
    deployment = DeploymentFactory(user=owner, gpu_type=hosts[0].gpu_type, num_gpus=1)
    kill_after_create(fake, monkeypatch)
    with pytest.raises(Killed):
        reconcile.deployment_reconcile(deployment_id=deployment.id)
    monkeypatch.setattr(engine, "container_run", fake.container_run)
    deployment_delete(deployment=deployment)

    converge()

    assert fake.containers == {}
    assert Deployment.objects.get(id=deployment.id).status == Deployment.Status.DELETED


# --- what a pass costs -------------------------------------------------------------------------------


def test_a_steady_pass_costs_the_same_queries_for_3_or_12_deployments(fake, h100, owner):
    for n in range(6):
        HostFactory(name=f"gpu-{n}", gpu_type=h100, gpu_count=8, docker_url=f"unix:///run/gpu-{n}.sock")

    def queries_per_pass(count):
        for _ in range(count):
            DeploymentFactory(user=owner, gpu_type=h100, num_gpus=1, min_instances=2, max_instances=2)
        converge(3)
        with CaptureQueriesContext(connection) as ctx:
            assert reconcile.reconcile_all() == 0  # nothing to do: no deployment needs its lock
        return len(ctx.captured_queries)

    three = queries_per_pass(3)
    twelve = queries_per_pass(9)

    assert three == twelve <= 10
    assert Instance.objects.filter(state=Instance.State.READY).count() == 24


def test_the_admin_registers_through_host_register_with_its_rules(fake, h100, admin_client):
    """The admin form refuses what `host_register` refuses (an engine that does not answer, even with the
    GPU count given) and an edit that renames a host updates that host, keeping its stored TLS key."""
    fake.gpus[A] = 2
    fake.down.add("unix:///run/down.sock")
    form = {"name": "gpu-a", "address": "10.0.0.1", "bind_address": "10.0.0.1", "gpu_type": h100.id, "engine_image": "vllm:1", "tls_ca_cert": "",
            "tls_client_cert": "", "tls_client_key": "", "gpu_count": "2"}  # fmt: skip

    down = admin_client.post("/admin/fleet/host/add/", {**form, "docker_url": "unix:///run/down.sock"})
    assert down.status_code == 200 and "Cannot reach the engine" in down.content.decode()
    assert not Host.objects.exists()
    assert admin_client.post("/admin/fleet/host/add/", {**form, "docker_url": A}).status_code == 302
    host = Host.objects.get()
    renamed = admin_client.post(f"/admin/fleet/host/{host.id}/change/", {**form, "docker_url": A, "name": "gpu-z"})
    assert renamed.status_code == 302
    assert list(Host.objects.values_list("id", "name")) == [(host.id, "gpu-z")]
