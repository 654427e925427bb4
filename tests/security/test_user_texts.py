"""What a user sees of the fleet (fail reasons, events, the instance pages and log view) names no
host, internal address, Docker endpoint or credential; operators keep the detail on the instance and
the host."""

import pytest
from django.utils import timezone

from llmhub.deployments.models import Deployment
from llmhub.fleet import hosts as fleet_hosts
from llmhub.fleet import reconcile, services
from llmhub.fleet.models import Host, Instance
from tests.factories import DeploymentFactory, GpuTypeFactory, HostFactory, UserFactory

pytestmark = pytest.mark.django_db

SECRET_URL = "tcp://gpu-secret-7.corp.internal:2376"
SECRETS = ("gpu-secret-7", "10.9.8.7", "corp.internal", "tcp://", "unix://", "2376", "nowhere.sock")


def shown(deployment) -> str:
    deployment.refresh_from_db()
    events = " | ".join(deployment.events.values_list("message", flat=True))
    return f"{deployment.fail_reason} | {events}"


def assert_clean(text: str) -> None:
    leaked = [s for s in SECRETS if s in text]
    assert not leaked, f"{leaked} shown to the user in: {text}"


@pytest.fixture
def owner(db):
    return UserFactory(username="owner")


def gpu_host(**kw):
    h100 = GpuTypeFactory(name="H100-80GB", memory_gb=80, uses_devices=True)
    return HostFactory(name="gpu-secret-7", gpu_type=h100, gpu_count=2, docker_url=SECRET_URL, address="10.9.8.7",
                       **kw)  # fmt: skip


def test_events_of_a_placement_a_pull_a_drain_and_a_lost_host_name_no_host(fake, owner):
    host = gpu_host()
    fake.images_everywhere = set()
    deployment = DeploymentFactory(user=owner, gpu_type=host.gpu_type)
    reconcile.reconcile_all()  # placed; the image is missing: a pull is requested
    pull = host.image_pulls.get()
    services.image_pull_run(pull_id=pull.id, attempt=pull.attempt)
    for _ in range(3):
        reconcile.reconcile_all()
    services.host_drain(host=host)
    reconcile.reconcile_all()
    HostFactory(name="gpu-other-9", gpu_type=host.gpu_type, gpu_count=2, docker_url="unix:///run/o.sock")
    fake.down.add(SECRET_URL)
    Host.objects.filter(id=host.id).update(heartbeat_at=timezone.now() - timezone.timedelta(hours=1))
    host.refresh_from_db()
    fleet_hosts.host_lost(host, reason=f"{SECRET_URL}: the engine did not answer")

    text = shown(deployment)
    assert {"scheduled", "pulling", "pulled", "lost"} <= set(deployment.events.values_list("kind", flat=True))
    assert_clean(text)


def test_an_engine_that_refuses_a_start_fails_the_deployment_without_its_internal_detail(fake, owner, settings,
                                                                                        monkeypatch):  # fmt: skip
    settings.INSTANCE_MAX_RESTARTS = 0
    host = gpu_host()
    deployment = DeploymentFactory(user=owner, gpu_type=host.gpu_type)

    def refuse(target, spec):
        raise reconcile.engine.EngineError(
            f"starting {spec.name} failed: driver failed programming external connectivity: listen tcp4 "
            f"10.9.8.7:49153: bind: cannot assign requested address ({SECRET_URL})"
        )

    monkeypatch.setattr(reconcile.engine, "container_run", refuse)
    reconcile.reconcile_all()

    deployment.refresh_from_db()
    assert deployment.status == Deployment.Status.FAILED
    assert_clean(shown(deployment))
    assert "10.9.8.7" in Instance.objects.get(deployment=deployment).last_error  # operators keep the detail


def test_an_unreachable_engine_names_no_endpoint_in_events_or_the_log_view(owner, client):
    h100 = GpuTypeFactory(name="H100-80GB", memory_gb=80, uses_devices=True)
    host = HostFactory(name="gpu-secret-7", gpu_type=h100, gpu_count=2, address="10.9.8.7",
                       docker_url="unix:///run/nowhere.sock")  # fmt: skip
    deployment = DeploymentFactory(user=owner, gpu_type=h100)
    reconcile.deployment_reconcile(deployment_id=deployment.id)  # the real seam: the socket does not exist
    assert_clean(shown(deployment))
    assert "nowhere.sock" in Host.objects.get(id=host.id).last_error  # operators keep the detail

    instance = Instance.objects.create(deployment=deployment, host=host, state="ready", container_id="c1", port=1)
    client.force_login(owner)
    page = client.get(f"/deployments/{deployment.deploy_id}/").content.decode()
    log = client.get(f"/deployments/{deployment.deploy_id}/instances/{instance.id}/logs").content.decode()
    assert "did not answer" in log
    assert_clean(log)
    assert "gpu-secret-7" not in page and "10.9.8.7" not in page
