"""One reconcile pass and what it knows of the engines, decided once at its start: the periodic pass
works from its observation of every host (`ReconcilePass`); a pass asked for on a change lists nothing
and inspects each container on its engine (`ChangePass`)."""

import pytest

from llmhub.fleet import engine, reconcile
from llmhub.fleet.hosts import Observation
from llmhub.fleet.models import Instance
from tests.factories import DeploymentFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def inspected(fake, monkeypatch):
    """Names of the containers inspected one by one on their engine (`engine.container_get`)."""
    names = []

    def container_get(target, name):
        names.append(name)
        return fake.container_get(target, name)

    monkeypatch.setattr(engine, "container_get", container_get)
    return names


def ready_instance(fake, cpu_host):
    deployment = DeploymentFactory(gpu_type=cpu_host.gpu_type, min_instances=1, max_instances=1)
    reconcile.deployment_reconcile(deployment_id=deployment.id)  # placed, started
    reconcile.deployment_reconcile(deployment_id=deployment.id)  # ready
    [instance] = Instance.objects.filter(deployment=deployment, state=Instance.State.READY)
    return deployment, instance


def test_a_periodic_pass_leaves_the_instances_of_a_silent_host_as_they_are(fake, cpu_host, inspected):
    deployment, instance = ready_instance(fake, cpu_host)
    fake.exit(instance.container_name, 1)  # the engine would say it crashed, were it asked
    inspected.clear()

    assert reconcile.ReconcilePass(Observation(unreachable={cpu_host.id})).deployment(deployment.id, place=False)

    assert inspected == []  # its engine is silent: nothing asked, nothing decided before it is declared lost
    assert Instance.objects.get(id=instance.id).state == Instance.State.READY


def test_a_periodic_pass_trusts_its_observation_of_a_running_container(fake, cpu_host, inspected):
    deployment, instance = ready_instance(fake, cpu_host)
    observation = Observation(containers={cpu_host.id: dict(fake.hosts[cpu_host.docker_url])})
    inspected.clear()

    reconcile.ReconcilePass(observation).deployment(deployment.id, place=False)

    assert inspected == []
    assert Instance.objects.get(id=instance.id).state == Instance.State.READY


def test_a_pass_on_a_change_inspects_each_container_on_its_engine(fake, cpu_host, inspected):
    deployment, instance = ready_instance(fake, cpu_host)
    fake.exit(instance.container_name, 1)
    inspected.clear()

    assert reconcile.ChangePass().deployment(deployment.id, place=True)

    assert inspected == [instance.container_name]
    assert Instance.objects.get(id=instance.id).state == Instance.State.STOPPED  # the crash, seen on the engine
    assert Instance.objects.filter(deployment=deployment, state=Instance.State.PENDING).count() == 1  # replaced


def test_a_pass_on_a_change_tries_every_pending_instance(fake, cpu_host):
    deployment = DeploymentFactory(gpu_type=cpu_host.gpu_type, num_gpus=3, min_instances=2, max_instances=2)

    reconcile.deployment_reconcile(deployment_id=deployment.id)

    reasons = set(Instance.objects.filter(deployment=deployment).values_list("last_error", flat=True))
    assert reasons == {"no CPU host has 3 GPUs (the largest has 2)"}  # each one tried, each one says why


def test_the_periodic_pass_tries_no_placement_it_already_knows_has_no_room(fake, cpu_host):
    deployment = DeploymentFactory(gpu_type=cpu_host.gpu_type, num_gpus=3, min_instances=2, max_instances=2)
    reconcile.ChangePass().deployment(deployment.id, place=False)  # two pending instances, not placed
    first, second = Instance.objects.filter(deployment=deployment).order_by("id")
    one_pass = reconcile.ReconcilePass(Observation(containers={cpu_host.id: {}}))

    one_pass.place_one(deployment.id, first.id)
    one_pass.place_one(deployment.id, second.id)

    first.refresh_from_db(), second.refresh_from_db()
    assert first.last_error == "no CPU host has 3 GPUs (the largest has 2)"
    assert second.last_error == ""  # not tried again in this pass: nothing was freed since
