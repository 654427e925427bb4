"""The engine seam and the reconcile loop against the real Docker Engine (no vLLM: a plain Debian
container stands in where the engine's behaviour is not what is tested)."""

import re
import time
import uuid

import docker
import pytest
from django.conf import settings

from llmhub.deployments.models import Deployment
from llmhub.fleet import crashes, engine, images, reconcile
from llmhub.fleet.models import Instance
from tests.factories import DeploymentFactory, GpuTypeFactory, HostFactory

pytestmark = [pytest.mark.docker, pytest.mark.django_db]

DOCKER = "unix:///var/run/docker.sock"


@pytest.fixture
def cleanup():
    yield
    for info in engine.containers_list(DOCKER, installation=settings.CONTAINER_PREFIX):
        engine.container_remove(DOCKER, info.name)


def spec(name, *args):
    return engine.ContainerSpec(
        name=name,
        image=images.BASE_IMAGE,
        args=list(args),
        labels={engine.LABEL_INSTANCE: "1", engine.LABEL_INSTALLATION: settings.CONTAINER_PREFIX},
    )


def test_run_is_idempotent_publishes_a_port_and_removes(cleanup):
    name = f"{settings.CONTAINER_PREFIX}-engine-test"

    first = engine.container_run(DOCKER, spec(name, "sleep", "120"))
    again = engine.container_run(DOCKER, spec(name, "sleep", "120"))

    assert first.id == again.id and first.running
    assert first.host_port and first.host_port > 0
    assert [c.name for c in engine.containers_list(DOCKER, installation=settings.CONTAINER_PREFIX)] == [name]
    assert engine.container_remove(DOCKER, name) is True
    assert engine.container_get(DOCKER, name) is None
    assert engine.container_remove(DOCKER, name) is False


def test_missing_image_is_an_engine_error(cleanup):
    bad = engine.ContainerSpec(name=f"{settings.CONTAINER_PREFIX}-bad", image="llmhub/nope:missing", args=[], labels={})

    with pytest.raises(engine.EngineError, match="starting"):
        engine.container_run(DOCKER, bad)


def test_image_presence_and_a_failed_pull():
    assert engine.image_present(DOCKER, images.BASE_IMAGE) is True
    assert engine.image_present(DOCKER, "llmhub/nope:missing") is False
    with pytest.raises(engine.EngineError, match="pulling llmhub/nope:missing failed"):
        engine.image_pull(DOCKER, "llmhub/nope:missing")  # no registry answers here


def test_an_image_is_built_and_a_failed_step_reported_through_the_seam(tmp_path, monkeypatch):
    """images builds with the real engine through `engine.image_build`: the tag appears; a failing step
    is an EngineImageError naming it, with the step's own output."""
    monkeypatch.setattr(images, "RECIPES_DIR", tmp_path)
    good, bad = f"seam-test-{uuid.uuid4().hex[:8]}", f"seam-test-{uuid.uuid4().hex[:8]}"
    (tmp_path / good).mkdir()
    (tmp_path / good / "Dockerfile").write_text(f"FROM {images.BASE_IMAGE}\nRUN echo built > /built\n")
    (tmp_path / bad).mkdir()
    (tmp_path / bad / "Dockerfile").write_text(f"FROM {images.BASE_IMAGE}\nRUN echo 'no wheel here' && exit 3\n")
    lines = []
    try:
        tag = images.engine_image_ensure(target=DOCKER, recipe=good, progress=lines.append)

        assert tag == images.recipe_tag(good) and engine.image_present(DOCKER, tag)
        assert any(re.search(r"\] Step 2/\d : RUN echo built > /built$", line) for line in lines)  # one per step
        with pytest.raises(images.EngineImageError, match=r"failed at Step 2/\d : RUN echo 'no wheel here'") as failure:
            images.engine_image_ensure(target=DOCKER, recipe=bad, progress=lines.append)
        assert "no wheel here" in failure.value.log_tail
        assert "returned a non-zero code: 3" in str(failure.value)
        assert not engine.image_present(DOCKER, images.recipe_tag(bad))
    finally:
        client = docker.from_env()
        for recipe in (good, bad):
            try:
                client.images.remove(images.recipe_tag(recipe), force=True)
            except docker.errors.ImageNotFound:
                pass


def test_a_crashing_engine_fails_the_deployment_with_its_log_tail(cleanup, monkeypatch, settings):
    """Real containers that exit: restarted, then the deployment is failed with the container's last words."""
    settings.INSTANCE_MAX_RESTARTS = 1
    monkeypatch.setattr(crashes, "restart_backoff", lambda n: 0)
    host = HostFactory(gpu_type=GpuTypeFactory(name="CPU"), engine_image=images.BASE_IMAGE, docker_url=DOCKER)
    deployment = DeploymentFactory(gpu_type=host.gpu_type)
    # The base image has no entrypoint: the engine arguments become the command, which cannot run.
    monkeypatch.setattr(
        reconcile, "container_spec",
        lambda instance: spec(instance.container_name, "sh", "-c", "echo 'ValueError: model does not fit'; exit 3"),
    )  # fmt: skip

    for _ in range(8):
        reconcile.deployment_reconcile(deployment_id=deployment.id)
        deployment.refresh_from_db()
        if deployment.status == Deployment.Status.FAILED:
            break
        time.sleep(0.5)

    assert deployment.status == Deployment.Status.FAILED
    assert "exited with code 3" in deployment.fail_reason
    assert "ValueError: model does not fit" in deployment.fail_reason
    assert Instance.objects.filter(deployment=deployment).count() == 2  # first start + one restart
    assert engine.containers_list(DOCKER, installation=settings.CONTAINER_PREFIX) == []
