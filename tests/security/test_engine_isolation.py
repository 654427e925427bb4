"""Two tenants' engines on one real Docker Engine (the machine's own, iptables on), attacked from the
host's network and from inside the other tenant's container. The small fake engine image stands in for
vLLM (it checks VLLM_API_KEY on /v1/* as vLLM does); tests/browser/test_dashboard_flow.py makes the same calls
against a real vLLM container."""

import time

import docker
import pytest
from django.conf import settings
from django.core.exceptions import ValidationError

from llmhub.deployments.models import Deployment
from llmhub.deployments.services import deployment_delete
from llmhub.fleet import engine, images, reconcile
from llmhub.fleet.models import Instance
from tests.factories import DeploymentFactory, GpuTypeFactory, HostFactory, UserFactory
from tests.security.attacks import engine_call, reach_from
from tests.stack import DOCKER

pytestmark = [pytest.mark.docker, pytest.mark.django_db]


@pytest.fixture(scope="module")
def main():
    return docker.from_env(timeout=120)


@pytest.fixture(scope="module")
def fake_image(main):
    return images.engine_image_ensure(recipe="fake-engine", progress=lambda line: None)


def _cleanup(main):
    installation = {"label": [f"{engine.LABEL_INSTALLATION}={settings.CONTAINER_PREFIX}"]}
    for container in main.containers.list(all=True, filters=installation):
        container.remove(force=True)
    for volume in main.volumes.list(filters=installation):
        volume.remove(force=True)


@pytest.fixture
def tenants(main, fake_image):
    """alice and bob each deploy the same repo on one local 2-slot CPU host; both instances ready."""
    _cleanup(main)
    host = HostFactory(name="local", docker_url=DOCKER, address="127.0.0.1",
                       gpu_type=GpuTypeFactory(name="CPU"), gpu_count=2, engine_image=fake_image)  # fmt: skip
    alice, bob = UserFactory(username="alice"), UserFactory(username="bob")
    deployments = [
        DeploymentFactory(user=user, model_name="shared", gpu_type=host.gpu_type, hf_repo="acme/gated-model")
        for user in (alice, bob)
    ]
    deadline = time.monotonic() + 60
    while True:
        for deployment in deployments:
            reconcile.deployment_reconcile(deployment_id=deployment.id)
        instances = [Instance.objects.select_related("host").filter(deployment=d, state="ready").first()
                     for d in deployments]  # fmt: skip
        if all(instances):
            break
        assert time.monotonic() < deadline, "the two engines did not become ready"
        time.sleep(0.3)
    yield host, alice, bob, deployments, instances
    _cleanup(main)


def test_a_direct_call_to_an_engine_needs_that_instance_s_own_key(tenants):
    _, _, _, deployments, (mine, theirs) = tenants
    model = deployments[0].full_name

    without = engine_call(mine.base_url, "POST", "/v1/chat/completions", key=None, model=model)
    wrong = engine_call(mine.base_url, "POST", "/v1/chat/completions", key=theirs.engine_key, model=model)
    made_up = engine_call(mine.base_url, "GET", "/v1/models", key="EMPTY", model=model)
    own = engine_call(mine.base_url, "POST", "/v1/chat/completions", key=mine.engine_key, model=model)

    assert without.status_code == 401, without.text
    assert wrong.status_code == 401, wrong.text
    assert made_up.status_code == 401, made_up.text
    assert own.status_code == 200, own.text
    assert mine.engine_key != theirs.engine_key


def test_two_owners_have_their_own_cache_and_cannot_reach_each_other(main, tenants):
    host, alice, bob, deployments, (a, b) = tenants
    ca, cb = main.containers.get(a.container_name), main.containers.get(b.container_name)

    def cache(container):
        [mount] = [m for m in container.attrs["Mounts"] if m["Destination"] == engine.HF_CACHE_PATH]
        return mount

    assert cache(ca)["Name"] != cache(cb)["Name"]
    assert str(alice.id) in cache(ca)["Name"] and str(bob.id) in cache(cb)["Name"]
    assert main.volumes.get(cache(ca)["Name"]).attrs["Labels"][engine.LABEL_OWNER] == "alice"
    assert (ca.labels[engine.LABEL_OWNER], cb.labels[engine.LABEL_OWNER]) == ("alice", "bob")
    # alice's engine 'downloaded' the repo first; bob's engine does not find her copy.
    state_b = engine_call(b.base_url, "GET", "/fake/state", key=b.engine_key, model="").json()
    assert state_b["cache_hit"] is False

    def ip(container):
        return next(iter(container.attrs["NetworkSettings"]["Networks"].values()))["IPAddress"]

    assert reach_from(ca, "127.0.0.1", engine.ENGINE_PORT), "the probe reaches the container's own engine"
    assert not reach_from(ca, ip(cb), engine.ENGINE_PORT), "alice's container reaches bob's engine"
    assert not reach_from(cb, ip(ca), engine.ENGINE_PORT), "bob's container reaches alice's engine"


def test_engine_containers_are_hardened_and_published_on_the_bind_address_only(main, tenants):
    _, _, _, _, instances = tenants
    for instance in instances:
        attrs = main.containers.get(instance.container_name).attrs
        config = attrs["HostConfig"]
        assert config["CapDrop"] == ["ALL"] and not config["CapAdd"]
        assert "no-new-privileges:true" in config["SecurityOpt"]
        assert config["PidsLimit"] == settings.ENGINE_PIDS_LIMIT > 0
        assert config["NetworkMode"] not in ("host", "default", "bridge")
        assert not config["Privileged"]
        [binding] = config["PortBindings"][f"{engine.ENGINE_PORT}/tcp"]
        assert binding["HostIp"] == instance.host.bind_address == "127.0.0.1"
        assert "VLLM_API_KEY" not in " ".join(attrs["Args"])  # the key is not on the command line
        network = main.networks.get(config["NetworkMode"])
        assert network.attrs["Options"]["com.docker.network.bridge.enable_icc"] == "false"


def test_the_memory_limit_follows_the_gpu_type(main, fake_image):
    _cleanup(main)
    small = GpuTypeFactory(name="CPU-small", host_memory_gb_per_gpu=1)
    host = HostFactory(name="local", docker_url=DOCKER, gpu_type=small, gpu_count=2, engine_image=fake_image)
    deployment = DeploymentFactory(user=UserFactory(username="carol"), gpu_type=host.gpu_type, num_gpus=2)
    try:
        reconcile.deployment_reconcile(deployment_id=deployment.id)
        instance = Instance.objects.get(deployment=deployment)
        config = main.containers.get(instance.container_name).attrs["HostConfig"]
        assert config["Memory"] == config["MemorySwap"] == 2 * 1024**3
    finally:
        _cleanup(main)


def test_an_owner_s_cache_is_pruned_only_when_none_of_their_instances_lives_on_the_host(main, tenants):
    from llmhub.fleet.services import owner_cache_prune

    host, alice, bob, deployments, (a, b) = tenants
    volume_of = {
        user.username: next(m["Name"] for m in main.containers.get(i.container_name).attrs["Mounts"]
                            if m["Destination"] == engine.HF_CACHE_PATH)
        for user, i in ((alice, a), (bob, b))
    }  # fmt: skip

    with pytest.raises(ValidationError, match="live instance"):
        owner_cache_prune(host=host, user=alice)
    assert main.containers.get(a.container_name).status == "running"

    deployment_delete(deployment=deployments[0])
    for _ in range(20):
        reconcile.deployment_reconcile(deployment_id=deployments[0].id)
        if Deployment.objects.get(id=deployments[0].id).status == Deployment.Status.DELETED:
            break
        time.sleep(0.2)
    assert owner_cache_prune(host=host, user=alice) is True

    names = {v.name for v in main.volumes.list()}
    assert volume_of["alice"] not in names and volume_of["bob"] in names
    assert main.containers.get(b.container_name).status == "running"
