"""Adversarial timing, with the engine seam stubbed and time under the test's control (time-machine):
containers that keep exiting, stale crash counts, returning hosts, one engine registered twice,
fair placement, impossible requests (issue 14)."""

import json
from datetime import UTC, datetime, timedelta

import pytest
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command

from llmhub.deployments import autoscaler
from llmhub.deployments.forms import DeploymentForm
from llmhub.deployments.models import Deployment
from llmhub.deployments.services import deployment_delete, deployment_scale
from llmhub.fleet import reconcile, services
from llmhub.fleet.models import Host, Instance
from tests.factories import DeploymentFactory, GpuTypeFactory, HostFactory, UserFactory
from tests.fakes.engine import FakeEngine

pytestmark = pytest.mark.django_db

A, B = "unix:///run/gpu-a.sock", "unix:///run/gpu-b.sock"
T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)


@pytest.fixture
def clock_start():
    """`clock` (tests/conftest.py) stops time at T0."""
    return T0


@pytest.fixture
def fake(monkeypatch, clock):
    fake = FakeEngine().install(monkeypatch)
    monkeypatch.setattr(reconcile.vllm, "engine_healthy", lambda base_url, **kw: fake.healthy)
    return fake


@pytest.fixture
def h100(db):
    return GpuTypeFactory(name="H100-80GB", memory_gb=80, uses_devices=True)


@pytest.fixture
def hosts(h100):
    return (
        HostFactory(name="gpu-a", gpu_type=h100, gpu_count=2, docker_url=A, address="10.0.0.1"),
        HostFactory(name="gpu-b", gpu_type=h100, gpu_count=2, docker_url=B, address="10.0.0.2"),
    )


@pytest.fixture
def owner(db):
    return UserFactory(username="owner", gpu_quota=64)


def live(deployment):
    return list(Instance.objects.filter(deployment=deployment, state__in=Instance.LIVE_STATES).select_related("host"))


def running_container(fake, deployment):
    for instance in live(deployment):
        info = fake.containers.get(instance.container_name)
        if info is not None and info.running and instance.state == Instance.State.READY:
            return instance
    return None


# --- 1. containers that keep exiting by themselves ------------------------------------------------


@pytest.mark.parametrize("code", [0, 137, 143])
def test_a_container_that_keeps_exiting_by_itself_backs_off_then_fails(fake, clock, hosts, owner, settings, code):
    settings.INSTANCE_MAX_RESTARTS = 3
    deployment = DeploymentFactory(user=owner, gpu_type=hosts[0].gpu_type)

    for _ in range(40):
        reconcile.reconcile_all()
        if (instance := running_container(fake, deployment)) is not None:
            fake.exit(instance.container_name, code)
        clock.shift(timedelta(seconds=20))

    deployment.refresh_from_db()
    assert deployment.status == Deployment.Status.FAILED
    assert f"exited with code {code}" in deployment.fail_reason
    rows = Instance.objects.filter(deployment=deployment).order_by("id")
    assert [i.restarts for i in rows] == [0, 1, 2, 3]
    assert len(fake.runs) == 4
    assert deployment.events.filter(kind="crashed").count() == 3 and not deployment.events.filter(kind="lost")
    gaps = [(b.started_at - a.stopped_at).total_seconds() for a, b in zip(rows, rows[1:])]
    assert all(gap >= 5 for gap in gaps)  # backoff, never at once


def test_an_engine_restart_is_not_a_crash(fake, hosts, owner):
    deployment = DeploymentFactory(user=owner, gpu_type=hosts[0].gpu_type)
    reconcile.reconcile_all()
    reconcile.reconcile_all()
    [first] = live(deployment)

    fake.restart_engine(A)  # its shutdown stopped the container (exit 0); the engine forgot its events
    reconcile.reconcile_all()
    reconcile.reconcile_all()

    first.refresh_from_db()
    assert first.state == Instance.State.LOST and "engine restarted" in first.last_error
    [second] = live(deployment)
    assert second.state == Instance.State.READY and second.restarts == 0 and second.next_attempt_at is None
    assert not deployment.events.filter(kind="crashed").exists()


# --- 5. crash counts: the deployment's recent history, the healthy-run reset, another host ---------


def test_a_replacement_does_not_inherit_a_stale_crash_count(fake, clock, hosts, owner, settings):
    settings.INSTANCE_MAX_RESTARTS = 3
    deployment = DeploymentFactory(user=owner, gpu_type=hosts[0].gpu_type, min_instances=2, max_instances=2)
    for _ in range(3):  # three crashes at start, early in its life
        reconcile.reconcile_all()
        reconcile.reconcile_all()
        fake.crash(live(deployment)[0].container_name)
        reconcile.reconcile_all()
        clock.shift(timedelta(seconds=60))
    reconcile.reconcile_all()
    reconcile.reconcile_all()
    assert all(i.state == Instance.State.READY for i in live(deployment))

    clock.shift(timedelta(hours=2))  # two healthy hours
    [one, other] = live(deployment)
    fake.vanish(one.container_name)  # lost, not a crash
    reconcile.reconcile_all()
    reconcile.reconcile_all()
    clock.shift(timedelta(seconds=60))
    [replacement] = [i for i in live(deployment) if i.id != other.id]
    assert replacement.state == Instance.State.READY
    fake.crash(replacement.container_name)  # one crash after two healthy hours
    reconcile.reconcile_all()

    deployment.refresh_from_db()
    assert deployment.status == Deployment.Status.RUNNING
    other.refresh_from_db()
    assert other.state == Instance.State.READY  # the healthy replica keeps serving
    assert [i.restarts for i in live(deployment) if i.id != other.id] == [1]


def test_a_replacement_avoids_the_host_where_the_instance_crashed(fake, hosts, owner):
    a, b = hosts
    deployment = DeploymentFactory(user=owner, gpu_type=a.gpu_type, num_gpus=1)
    reconcile.reconcile_all()
    [first] = live(deployment)
    assert first.host_id == a.id

    fake.crash(first.container_name)
    reconcile.reconcile_all()
    [second] = live(deployment)
    Instance.objects.filter(id=second.id).update(next_attempt_at=None)  # backoff over
    reconcile.reconcile_all()

    second.refresh_from_db()
    assert second.host_id == b.id


# --- 6. GPUs of a returning host; one engine, one host ----------------------------------------------


def test_a_returning_hosts_gpus_are_handed_out_only_after_its_old_containers_are_gone(
    fake, clock, hosts, owner, settings
):
    settings.HOST_UNREACHABLE_GRACE = 0
    a, b = hosts
    first = DeploymentFactory(user=owner, gpu_type=a.gpu_type, num_gpus=2)
    reconcile.reconcile_all()
    [old] = live(first)
    assert old.host_id == a.id
    fake.down.add(A)  # silent, its container still running
    clock.shift(timedelta(seconds=1))
    reconcile.reconcile_all()  # lost; replaced on gpu-b
    assert [i.host_id for i in live(first)] == [b.id]
    second = DeploymentFactory(user=owner, gpu_type=a.gpu_type, num_gpus=2)
    reconcile.reconcile_all()  # no room: pending

    fake.down.discard(A)
    reconcile.reconcile_all()

    [placed] = live(second)
    assert placed.host_id == a.id and placed.gpu_indexes == [0, 1]
    [(url, name, others)] = [r for r in fake.runs_seen if r[1] == placed.container_name]
    assert url == A and others == []  # the old container was gone before the new one started


def test_one_engine_cannot_be_registered_as_two_hosts(fake, h100, admin_client):
    fake.gpus[A] = fake.gpus[B] = 2
    fake.engine_ids[B] = fake.engine_ids[A] = "ZQ7A:engine-1"  # two URLs, one engine
    services.host_register(name="gpu-a", docker_url=A, address="10.0.0.1", gpu_type=h100, engine_image="v")

    with pytest.raises(ValidationError) as caught:
        services.host_register(name="gpu-b", docker_url=B, address="10.0.0.2", gpu_type=h100, engine_image="v")
    assert "already registered as host gpu-a" in " ".join(caught.value.message_dict["docker_url"])
    with pytest.raises(CommandError, match="already registered as host gpu-a"):
        call_command("host_add", "gpu-c", "--docker-url", B, "--gpu-type", "H100-80GB", "--engine-image", "v")
    form = {"name": "gpu-d", "address": "10.0.0.4", "bind_address": "10.0.0.4", "gpu_type": h100.id, "engine_image": "v", "tls_ca_cert": "",
            "tls_client_cert": "", "tls_client_key": "", "gpu_count": "", "docker_url": B}  # fmt: skip
    page = admin_client.post("/admin/fleet/host/add/", form)
    assert page.status_code == 200 and "already registered as host gpu-a" in page.content.decode()
    assert list(Host.objects.values_list("name", flat=True)) == ["gpu-a"]
    services.host_register(name="gpu-a", docker_url=A, address="10.0.0.9", gpu_type=h100, engine_image="v2")
    assert Host.objects.get(name="gpu-a").address == "10.0.0.9"  # updating the host itself is fine


# --- 7. fair placement ----------------------------------------------------------------------------------


def fairness_setup(fake, clock, h100, owner):
    host = HostFactory(name="gpu-a", gpu_type=h100, gpu_count=2, docker_url=A)
    filler = DeploymentFactory(user=owner, gpu_type=h100, model_name="filler")
    reconcile.deployment_reconcile(deployment_id=filler.id)
    clock.shift(timedelta(seconds=1))
    older = DeploymentFactory(user=owner, gpu_type=h100, model_name="older")
    clock.shift(timedelta(seconds=1))
    newer = DeploymentFactory(user=owner, gpu_type=h100, model_name="newer", min_instances=1, max_instances=2)
    reconcile.deployment_reconcile(deployment_id=newer.id)  # takes the last GPU
    reconcile.deployment_reconcile(deployment_id=older.id)  # no room: waits, nothing serving
    Deployment.objects.filter(id=newer.id).update(target_instances=2)
    reconcile.deployment_reconcile(deployment_id=newer.id)  # its extra instance waits too
    deployment_delete(deployment=filler)
    reconcile.deployment_reconcile(deployment_id=filler.id)  # one GPU free
    return host, older, newer


def test_a_deployment_with_nothing_serving_is_placed_before_another_ones_extra_instance(fake, clock, h100, owner):
    _, older, newer = fairness_setup(fake, clock, h100, owner)

    reconcile.reconcile_all()

    assert [i.state for i in live(older)] == [Instance.State.STARTING]
    assert sorted(i.state for i in live(newer)) == [Instance.State.PENDING, Instance.State.READY]


def test_a_reconcile_on_change_does_not_jump_the_queue(fake, clock, h100, owner):
    _, older, newer = fairness_setup(fake, clock, h100, owner)

    reconcile.deployment_reconcile(deployment_id=newer.id)  # e.g. the autoscaler asked for it
    reconcile.reconcile_all()

    assert [i.state for i in live(older)] == [Instance.State.STARTING]
    assert Instance.State.PENDING in [i.state for i in live(newer)]


# --- 8. requests that can never be placed ------------------------------------------------------------


def test_more_gpus_per_instance_than_any_host_has_is_refused_at_create(fake, hosts, owner, client):
    from tests.factories import token_for

    data = {"model_name": "big", "gpu": "H100-80GB", "num_gpus": 4, "max_batch_size": 8,
            "hf_repo": "llmhub/tiny-random-llama", "min_instances": 1, "max_instances": 1}  # fmt: skip
    form = DeploymentForm(data)
    assert not form.is_valid()
    assert "the largest has 2" in " ".join(form.errors["num_gpus"])

    body = {"model_name": "big", "gpu": "H100-80GB", "num_gpus": 4, "max_batch_size": 8,
            "hf": {"repo": "llmhub/tiny-random-llama"}, "settings": {"min_instances": 1, "max_instances": 1}}  # fmt: skip
    response = client.post("/deploy/llm", json.dumps(body), content_type="application/json",
                           HTTP_AUTHORIZATION=f"Bearer {token_for(owner)}")  # fmt: skip
    assert response.status_code == 400
    message = " ".join(response.json()["errors"]["num_gpus"])
    assert "the largest has 2" in message and "gpu-a" not in message and "10.0.0" not in message
    assert not Deployment.objects.exists()


def test_capacity_that_disappears_shows_in_fail_reason_and_the_gateways_503(fake, hosts, owner, client, settings):
    from tests.factories import token_for

    settings.GATEWAY_HOLD_TIMEOUT = 2.0
    a, b = hosts
    deployment = DeploymentFactory(user=owner, gpu_type=a.gpu_type, num_gpus=2, min_instances=0, max_instances=1,
                                   target_instances=0)  # fmt: skip
    Host.objects.update(gpu_count=1)  # the hosts shrank (re-registered with fewer GPUs)
    Deployment.objects.filter(id=deployment.id).update(target_instances=1)
    reconcile.reconcile_all()

    deployment.refresh_from_db()
    assert deployment.status == Deployment.Status.DEPLOYING
    assert deployment.fail_reason == "no H100-80GB host has 2 GPUs (the largest has 1)"
    token = token_for(owner)
    api = client.get(f"/deploy/{deployment.deploy_id}", HTTP_AUTHORIZATION=f"Bearer {token}").json()
    assert api["fail_reason"] == deployment.fail_reason
    payload = {"model": deployment.full_name, "messages": [{"role": "user", "content": "hi"}]}
    response = client.post("/v1/openai/chat/completions", json.dumps(payload), content_type="application/json",
                           HTTP_AUTHORIZATION=f"Bearer {token}")  # fmt: skip
    assert response.status_code == 503
    message = response.json()["error"]["message"]
    assert "has 2 GPUs (the largest has 1)" in message and "gpu-a" not in message and "10.0.0" not in message

    Host.objects.filter(id=a.id).update(gpu_count=2)  # capacity back
    reconcile.reconcile_all()
    deployment.refresh_from_db()
    assert deployment.fail_reason == "" and [i.host_id for i in live(deployment)] == [a.id]


# --- 2, 3, 4. the autoscaler: its stored target, the scale-down window, pending instances, wedged engines --


def autoscaled(**kw):
    defaults = {"status": "running", "min_instances": 1, "max_instances": 4, "max_batch_size": 4,
                "cooldown_seconds": 300, "target_instances": 1, "busy_at": T0}  # fmt: skip
    return DeploymentFactory(**{**defaults, **kw})


def step(deployment, at_seconds, **signals):
    deployment.refresh_from_db()
    result = autoscaler.deployment_autoscale(
        deployment=deployment, signals=autoscaler.Signals(**signals), now=T0 + timedelta(seconds=at_seconds)
    )
    deployment.refresh_from_db()
    return result


def test_lowering_min_does_not_stop_loaded_instances_before_the_cooldown():
    deployment = autoscaled()
    deployment_scale(deployment=deployment, min_instances=4, max_instances=4)
    step(deployment, 10, inflight=12)  # four instances carry the load

    deployment_scale(deployment=deployment, min_instances=1, max_instances=4)

    deployment.refresh_from_db()
    assert deployment.desired_instances == 4
    assert step(deployment, 20, inflight=12) is None and deployment.desired_instances == 4
    assert step(deployment, 200, inflight=0) is None  # below target, within the cooldown
    assert step(deployment, 321, inflight=0) == 1


def test_the_stored_target_is_the_decision_within_min_and_max_so_raising_max_starts_nothing_unneeded():
    deployment = autoscaled(target_instances=4)
    deployment_scale(deployment=deployment, min_instances=1, max_instances=2)
    step(deployment, 10, inflight=3)  # one instance would do: the cooldown runs

    assert deployment.target_instances == 2
    deployment_scale(deployment=deployment, min_instances=1, max_instances=4)
    deployment.refresh_from_db()
    assert deployment.desired_instances == 2


def test_scale_down_goes_to_the_largest_load_of_the_window_not_a_momentary_dip():
    deployment = autoscaled(target_instances=3)
    step(deployment, 0, inflight=9)  # three instances justified
    for t in range(30, 301, 30):
        step(deployment, t, inflight=6)  # two would do

    assert step(deployment, 301, inflight=3) == 2  # a dip to one at the end of the window
    assert [step(deployment, t, inflight=6) for t in (302, 303)] == [None, None]  # no bounce


def test_a_fresh_wake_survives_the_next_ticks_even_with_no_cooldown():
    deployment = autoscaled(min_instances=0, max_instances=2, target_instances=0, cooldown_seconds=0)
    Deployment.objects.filter(id=deployment.id).update(target_instances=1, busy_at=T0)  # as gateway.wake does

    # The gateway publishes the waiting request within a second: the next two ticks must not undo the wake.
    assert [step(deployment, t) for t in (2, 4)] == [None, None]
    assert deployment.desired_instances == 1
    assert step(deployment, 6, inflight=1) is None and deployment.desired_instances == 1


def test_pending_instances_do_not_block_scale_down(monkeypatch, cpu_host):
    deployment = autoscaled(gpu_type=cpu_host.gpu_type, min_instances=1, max_instances=3, target_instances=3)
    Instance.objects.create(deployment=deployment, host=cpu_host, state="ready", port=1, gpu_indexes=[0])
    Instance.objects.create(deployment=deployment)  # no room: pending
    Instance.objects.create(deployment=deployment)
    monkeypatch.setattr(autoscaler.vllm, "engine_load", lambda base_url, **kw: (0.0, 0.0))

    for minutes in range(0, 61, 5):
        autoscaler.autoscale_all(inflight={}, now=T0 + timedelta(minutes=minutes))

    deployment.refresh_from_db()
    assert deployment.desired_instances == 1


def test_a_drain_completes_once_the_deployment_no_longer_needs_the_instance(fake, clock, hosts, owner, monkeypatch):
    a, b = hosts
    services.host_cordon(host=b)
    deployment = DeploymentFactory(user=owner, gpu_type=a.gpu_type, num_gpus=2, min_instances=0, max_instances=1,
                                   target_instances=1, cooldown_seconds=60)  # fmt: skip
    reconcile.reconcile_all()
    reconcile.reconcile_all()
    services.host_drain(host=a)
    reconcile.reconcile_all()  # its replacement waits: no room elsewhere
    assert sorted(i.state for i in live(deployment)) == [Instance.State.PENDING, Instance.State.READY]
    monkeypatch.setattr(autoscaler.vllm, "engine_load", lambda base_url, **kw: (0.0, 0.0))

    for _ in range(10):  # idle
        clock.shift(timedelta(seconds=30))
        autoscaler.autoscale_all(inflight={})
        reconcile.reconcile_all()

    assert live(deployment) == []
    assert Host.objects.get(id=a.id).state == Host.State.CORDONED


def test_wedged_engines_delay_no_other_deployments_decision(monkeypatch, cpu_host):
    import threading

    monkeypatch.setattr(autoscaler, "METRICS_DEADLINE_SECONDS", 0.2, raising=False)
    wedged = [autoscaled(gpu_type=cpu_host.gpu_type, max_batch_size=4) for _ in range(3)]
    busy = autoscaled(gpu_type=cpu_host.gpu_type, max_batch_size=4)
    for n, deployment in enumerate([*wedged, busy]):
        Instance.objects.create(deployment=deployment, host=cpu_host, state="ready", port=41000 + n)
    release, entered, returned = threading.Event(), [], []

    def engine_load(base_url, **kw):
        if base_url.endswith(":41003"):
            return (9.0, 0.0)  # busy: three instances' worth
        entered.append(base_url)
        release.wait(timeout=5)  # wedged: answers only when the test lets it (or gives up, as a guard)
        returned.append(base_url)
        return None

    monkeypatch.setattr(autoscaler.vllm, "engine_load", engine_load)
    try:
        autoscaler.autoscale_all(inflight={})
        assert returned == []  # the pass did not wait for any wedged engine
        assert len(entered) == 3  # all three were asked at once, within the same deadline
    finally:
        release.set()
    busy.refresh_from_db()
    assert busy.desired_instances == 3


# --- 2. stopping an instance: the least loaded, once its requests drained -------------------------------


def test_lowering_max_stops_the_least_loaded_instance_once_its_requests_drain(fake, clock, hosts, owner, monkeypatch):
    from llmhub.fleet import scaling

    deployment = DeploymentFactory(user=owner, gpu_type=hosts[0].gpu_type, min_instances=3, max_instances=3)
    reconcile.reconcile_all()
    reconcile.reconcile_all()
    first, second, third = sorted(live(deployment), key=lambda i: i.id)
    inflight = {first.id: 5, second.id: 0, third.id: 2}
    monkeypatch.setattr(scaling, "instance_inflight", lambda: dict(inflight))

    deployment_scale(deployment=deployment, min_instances=1, max_instances=2)
    reconcile.reconcile_all()
    states = dict(Instance.objects.filter(deployment=deployment).values_list("id", "state"))
    assert states == {first.id: "ready", second.id: "stopping", third.id: "ready"}  # the idle one, not the newest
    assert second.container_name in fake.containers  # the gateway stops routing to it first
    clock.shift(timedelta(seconds=3))
    reconcile.reconcile_all()
    assert Instance.objects.get(id=second.id).state == "stopped" and second.container_name not in fake.containers

    deployment_scale(deployment=deployment, min_instances=1, max_instances=1)
    reconcile.reconcile_all()
    clock.shift(timedelta(seconds=30))
    reconcile.reconcile_all()  # two requests still in flight on it
    assert Instance.objects.get(id=third.id).state == "stopping" and third.container_name in fake.containers
    inflight[third.id] = 0
    reconcile.reconcile_all()

    assert Instance.objects.get(id=third.id).state == "stopped" and third.container_name not in fake.containers
    assert [i.id for i in live(deployment)] == [first.id]


def test_the_dashboard_form_says_so_too(client, user, cpu_host):
    client.force_login(user)
    data = {"model_name": "web-model", "gpu": "CPU", "num_gpus": 3, "max_batch_size": 8, "hf_revision": "",
            "hf_repo": "llmhub/tiny-random-llama", "hf_token": "", "min_instances": 1, "max_instances": 1}  # fmt: skip

    response = client.post("/deployments/new", data)

    page = response.content.decode()
    assert response.status_code == 400 and "No CPU host has 3 GPUs: the largest has 2" in page
    assert not Deployment.objects.exists()
