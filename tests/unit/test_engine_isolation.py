"""Tenant isolation as the engine seam receives it: the container request (`run_kwargs`), per-instance
engine keys, the vLLM client's credentials and the host bind address."""

from io import StringIO

import httpx
import pytest
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command

from llmhub import crypto
from llmhub.fleet import engine, reconcile, services, vllm
from llmhub.fleet.models import Host, Instance, bind_address_validate
from tests.factories import DeploymentFactory, GpuTypeFactory, HostFactory, UserFactory
from tests.fakes.engine import FakeEngine

pytestmark = pytest.mark.django_db

SPEC = engine.ContainerSpec(
    name="llmhub-7", image="vllm:1", args=["--model", "m"], labels={engine.LABEL_INSTANCE: "7"},
    environment={"VLLM_API_KEY": "k"}, publish_ip="10.0.0.5", cache_volume="llmhub-hf-cache-u3",
    network="llmhub-engines", pids_limit=4096, memory_limit=2 * 1024**3,
)  # fmt: skip


def test_run_kwargs_drop_every_capability_and_bound_the_container():
    kwargs = engine.run_kwargs(SPEC)

    assert kwargs["cap_drop"] == ["ALL"] and kwargs["cap_add"] == []
    assert kwargs["security_opt"] == ["no-new-privileges:true"]
    assert kwargs["pids_limit"] == 4096
    assert kwargs["mem_limit"] == kwargs["memswap_limit"] == 2 * 1024**3
    assert kwargs["network"] == "llmhub-engines" and kwargs.get("network_mode") != "host"
    assert kwargs["ports"] == {"8000/tcp": ("10.0.0.5", None)}
    assert kwargs["volumes"] == {"llmhub-hf-cache-u3": {"bind": "/root/.cache/huggingface", "mode": "rw"}}
    assert not kwargs.get("privileged")
    assert "k" not in kwargs["command"]


def test_run_kwargs_without_a_memory_figure_set_no_memory_limit():
    kwargs = engine.run_kwargs(engine.ContainerSpec(name="n", image="i", args=[], labels={}))

    assert "mem_limit" not in kwargs
    assert kwargs["cap_drop"] == ["ALL"] and kwargs["pids_limit"] > 0


def test_each_instance_gets_its_own_key_stored_encrypted():
    deployment = DeploymentFactory()
    one, two = Instance.objects.create(deployment=deployment), Instance.objects.create(deployment=deployment)

    assert one.engine_key and one.engine_key != two.engine_key and len(one.engine_key) >= 32
    stored = Instance.objects.values_list("engine_key_encrypted", flat=True).get(id=one.id)
    assert one.engine_key not in stored and crypto.decrypt(stored) == one.engine_key


def test_two_owners_containers_differ_in_cache_key_and_owner_label(settings):
    settings.CONTAINER_PREFIX = "lh"
    gpu = GpuTypeFactory(name="H100-80GB", memory_gb=80, uses_devices=True, host_memory_gb_per_gpu=100)
    host = HostFactory(gpu_type=gpu, gpu_count=8, address="gpu-1.internal", bind_address="10.0.0.5")
    alice, bob = UserFactory(username="alice"), UserFactory(username="bob")
    specs = []
    for user in (alice, bob):
        deployment = DeploymentFactory(user=user, gpu_type=gpu, num_gpus=2)
        instance = Instance.objects.create(deployment=deployment, host=host, gpu_indexes=[0, 1], state="starting")
        specs.append((instance, reconcile.container_spec(instance)))

    (ia, a), (ib, b) = specs
    assert (a.cache_volume, b.cache_volume) == (f"lh-hf-cache-u{alice.id}", f"lh-hf-cache-u{bob.id}")
    assert (a.labels[engine.LABEL_OWNER], b.labels[engine.LABEL_OWNER]) == ("alice", "bob")
    assert a.environment["VLLM_API_KEY"] == ia.engine_key and b.environment["VLLM_API_KEY"] == ib.engine_key
    assert ia.engine_key not in " ".join(a.args)
    assert a.publish_ip == "10.0.0.5" and ia.base_url.startswith("http://gpu-1.internal:")
    assert a.memory_limit == 200 * 1024**3 and a.network == b.network == "lh-engines"
    assert "--middleware" in a.args and a.files  # the guard that closes vLLM's routes outside /v1


def test_the_worker_and_the_scrape_send_the_instance_key(monkeypatch):
    seen = []

    def get(url, *, headers=None, timeout=None):
        seen.append((url.rsplit("/", 1)[-1], (headers or {}).get("Authorization")))
        text = '{"data": []}' if url.endswith("models") else ""
        return httpx.Response(200, text=text, request=httpx.Request("GET", url))

    monkeypatch.setattr(vllm.httpx, "get", get)
    vllm.engine_healthy("http://e:1", key="sekrit")
    vllm.served_models("http://e:1", key="sekrit")
    vllm.engine_load("http://e:1", key="sekrit")

    assert seen == [("health", "Bearer sekrit"), ("models", "Bearer sekrit"), ("metrics", "Bearer sekrit")]


@pytest.mark.parametrize(
    "address, message",
    [
        ("0.0.0.0", "every interface"),
        ("::", "every interface"),
        ("8.8.8.8", "public"),
        ("169.254.169.254", "link-local"),
        ("224.0.0.1", "multicast"),
        ("gpu-1.internal", "not an IP address"),
        ("", "not an IP address"),
    ],
)
def test_bind_addresses_that_would_expose_engines_are_refused(address, message):
    with pytest.raises(ValueError, match=message):
        bind_address_validate(address)


@pytest.mark.parametrize("address", ["127.0.0.1", "10.0.0.5", "172.16.3.4", "192.168.1.9", "100.64.0.7", "fd00::5"])
def test_loopback_and_private_bind_addresses_are_accepted(address):
    assert bind_address_validate(address) == address


def test_host_register_defaults_and_refusals(monkeypatch):
    FakeEngine().install(monkeypatch)
    cpu = GpuTypeFactory(name="CPU")
    tls = engine.TlsCredentials(ca_cert="ca", client_cert="cert", client_key="key")

    local = services.host_register(name="local", docker_url="unix:///var/run/docker.sock", address="127.0.0.1",
                                   gpu_type=cpu, engine_image="i", gpu_count=2)  # fmt: skip
    remote = services.host_register(name="gpu-1", docker_url="tcp://gpu-1.internal:2376", address="gpu-1.internal",
                                    bind_address="10.0.0.5", gpu_type=cpu, engine_image="i", gpu_count=2, tls=tls)  # fmt: skip
    assert (local.bind_address, local.address) == ("127.0.0.1", "127.0.0.1")
    assert (remote.bind_address, remote.address) == ("10.0.0.5", "gpu-1.internal")
    with pytest.raises(ValidationError) as refused:
        services.host_register(name="gpu-2", docker_url="tcp://gpu-2.internal:2376", address="gpu-2.internal",
                               gpu_type=cpu, engine_image="i", gpu_count=2, tls=tls)  # fmt: skip
    assert "bind_address" in refused.value.message_dict
    with pytest.raises(ValidationError) as everywhere:
        services.host_register(name="gpu-3", docker_url="unix:///var/run/docker.sock", address="0.0.0.0",
                               gpu_type=cpu, engine_image="i", gpu_count=2)  # fmt: skip
    assert "every interface" in " ".join(everywhere.value.message_dict["bind_address"])


def test_host_add_needs_a_bind_address_for_a_remote_engine(monkeypatch, tmp_path):
    fake = FakeEngine().install(monkeypatch)
    fake.gpus["tcp://gpu-1.internal:2376"] = 4
    GpuTypeFactory(name="H100-80GB")
    for name in ("ca", "cert", "key"):
        (tmp_path / name).write_text(name)
    base = ["host_add", "gpu-1", "--docker-url", "tcp://gpu-1.internal:2376", "--gpu-type", "H100-80GB",
            "--engine-image", "v", "--tls-ca", str(tmp_path / "ca"), "--tls-cert", str(tmp_path / "cert"),
            "--tls-key", str(tmp_path / "key")]  # fmt: skip

    with pytest.raises(CommandError, match="--bind-address"):
        call_command(*base, stdout=StringIO())
    call_command(*base, "--bind-address", "10.0.0.5", stdout=StringIO())

    host = Host.objects.get(name="gpu-1")
    assert (host.bind_address, host.address) == ("10.0.0.5", "10.0.0.5")


def test_the_admin_prunes_a_user_s_cache_on_a_host_unless_they_run_there(monkeypatch, admin_client, settings):
    fake = FakeEngine().install(monkeypatch)
    host = HostFactory(name="gpu-1", docker_url="unix:///run/gpu-1.sock")
    alice, bob = UserFactory(username="alice"), UserFactory(username="bob")
    for user in (alice, bob):
        fake.volumes[host.docker_url].add(engine.cache_volume_name(settings.CONTAINER_PREFIX, user.id))
    DeploymentFactory(user=bob, gpu_type=host.gpu_type)
    Instance.objects.create(deployment=bob.deployments.get(), host=host, state="ready")
    action = {"action": "prune_cache", "_selected_action": [host.id]}

    asked = admin_client.post("/admin/fleet/host/", action)
    pruned = admin_client.post("/admin/fleet/host/", {**action, "apply": "1", "user": "alice"}, follow=True)
    refused = admin_client.post("/admin/fleet/host/", {**action, "apply": "1", "user": "bob"}, follow=True)

    assert asked.status_code == 200 and "Prune a user" in asked.content.decode()
    assert "alice&#x27;s model cache pruned" in pruned.content.decode()
    assert any("bob has a live instance on gpu-1" in str(m) for m in refused.context["messages"])
    assert fake.volumes[host.docker_url] == {engine.cache_volume_name(settings.CONTAINER_PREFIX, bob.id)}


def test_log_tails_shown_to_users_have_the_host_facts_redacted():
    from llmhub.fleet import notices

    host = HostFactory(name="gpu-secret", docker_url="tcp://gpu-secret.corp:2376", address="gpu-secret.corp",
                       bind_address="10.1.2.3")  # fmt: skip
    text = "INFO loading on gpu-secret (10.1.2.3, tcp://gpu-secret.corp:2376)\nlocal_rank=0 gpu-secretive"

    assert notices.redact(text, host=host) == "INFO loading on [host] ([host], [host])\nlocal_rank=0 gpu-secretive"
