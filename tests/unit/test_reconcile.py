"""The reconcile pass with the engine seam stubbed: convergence, idempotence, crashes, deletion."""

from pathlib import Path

import pytest

from llmhub.deployments.models import Deployment
from llmhub.fleet import crashes, engine, reconcile
from llmhub.fleet.models import Instance
from tests.factories import DeploymentFactory, GpuTypeFactory, HostFactory

pytestmark = pytest.mark.django_db


def snapshot(deployment):
    instances = list(
        Instance.objects.filter(deployment=deployment)
        .order_by("id")
        .values_list("id", "state", "host_id", "gpu_indexes", "container_id", "port")
    )
    deployment.refresh_from_db()
    return deployment.status, instances, deployment.events.count()


def test_a_deployment_converges_to_ready_and_a_second_pass_changes_nothing(fake, cpu_host):
    deployment = DeploymentFactory(gpu_type=cpu_host.gpu_type, min_instances=1, max_instances=1)

    reconcile.deployment_reconcile(deployment_id=deployment.id)  # place + start
    reconcile.deployment_reconcile(deployment_id=deployment.id)  # health → ready
    first = snapshot(deployment)
    reconcile.deployment_reconcile(deployment_id=deployment.id)
    reconcile.reconcile_all()

    assert snapshot(deployment) == first
    status, instances, _ = first
    assert status == Deployment.Status.RUNNING
    assert [(i[1], i[2], i[3]) for i in instances] == [("ready", cpu_host.id, [0])]
    assert list(fake.containers) == [Instance.objects.get(id=instances[0][0]).container_name]
    kinds = list(deployment.events.order_by("id").values_list("kind", flat=True))
    assert kinds == ["scheduled", "starting", "ready", "running"]


def test_the_container_gets_the_deployments_engine_arguments(fake, cpu_host):
    deployment = DeploymentFactory(
        gpu_type=cpu_host.gpu_type, model_name="chat", max_batch_size=16, hf_revision="abc123"
    )

    reconcile.deployment_reconcile(deployment_id=deployment.id)

    spec = fake.runs[0]
    assert spec.image == cpu_host.engine_image
    assert spec.args[:4] == ["--model", "llmhub/tiny-random-llama", "--revision", "abc123"]
    args = dict(zip(spec.args[4::2], spec.args[5::2]))
    assert args["--served-model-name"] == f"{deployment.user.username}/chat"
    assert args["--max-num-seqs"] == "16"
    assert args["--tensor-parallel-size"] == "1"
    assert spec.device_ids is None  # CPU host: no device request
    assert spec.labels[engine.LABEL_DEPLOYMENT] == deployment.deploy_id


def test_gpu_hosts_get_device_requests_for_the_reserved_indexes(fake):
    h100 = GpuTypeFactory(name="H100-80GB", memory_gb=80, uses_devices=True)
    host = HostFactory(gpu_type=h100, gpu_count=8, address="10.0.0.5", bind_address="10.0.0.5")
    first = DeploymentFactory(gpu_type=h100, num_gpus=2)
    second = DeploymentFactory(gpu_type=h100, num_gpus=4)

    reconcile.deployment_reconcile(deployment_id=first.id)
    reconcile.deployment_reconcile(deployment_id=second.id)

    specs = {s.labels[engine.LABEL_DEPLOYMENT]: s for s in fake.runs}
    assert specs[first.deploy_id].device_ids == ["0", "1"]
    assert specs[second.deploy_id].device_ids == ["2", "3", "4", "5"]
    assert "--tensor-parallel-size" in specs[second.deploy_id].args
    assert specs[second.deploy_id].args[specs[second.deploy_id].args.index("--tensor-parallel-size") + 1] == "4"
    kwargs = engine.run_kwargs(specs[second.deploy_id])
    [request] = kwargs["device_requests"]
    assert request["Driver"] == "nvidia" and request["DeviceIDs"] == ["2", "3", "4", "5"]
    assert request["Capabilities"] == [["gpu"]]
    assert kwargs["ports"] == {"8000/tcp": ("10.0.0.5", None)}
    assert kwargs["restart_policy"] == {"Name": "no"}
    assert host.instances.count() == 2


def test_no_capacity_leaves_the_instance_pending_with_a_reason(fake, cpu_host):
    deployment = DeploymentFactory(gpu_type=cpu_host.gpu_type, num_gpus=3, min_instances=1, max_instances=1)

    reconcile.deployment_reconcile(deployment_id=deployment.id)
    reconcile.deployment_reconcile(deployment_id=deployment.id)

    [instance] = Instance.objects.filter(deployment=deployment)
    assert instance.state == Instance.State.PENDING and instance.started_at is None
    assert fake.runs == []
    assert list(deployment.events.filter(kind="pending").values_list("message", flat=True)) == [
        f"instance {instance.id} waits: no CPU host has 3 GPUs (the largest has 2)"
    ]


def test_a_crash_restarts_with_backoff_then_fails_the_deployment(fake, cpu_host, settings, monkeypatch):
    settings.INSTANCE_MAX_RESTARTS = 1
    monkeypatch.setattr(crashes, "restart_backoff", lambda n: 0)
    deployment = DeploymentFactory(gpu_type=cpu_host.gpu_type)
    reconcile.deployment_reconcile(deployment_id=deployment.id)

    fake.crash(next(iter(fake.containers)))
    reconcile.deployment_reconcile(deployment_id=deployment.id)  # crash 1: replaced
    reconcile.deployment_reconcile(deployment_id=deployment.id)  # replacement starts
    assert Instance.objects.filter(deployment=deployment, state="starting", restarts=1).count() == 1
    fake.crash(next(iter(fake.containers)))
    reconcile.deployment_reconcile(deployment_id=deployment.id)  # crash 2: over the limit

    deployment.refresh_from_db()
    assert deployment.status == Deployment.Status.FAILED
    assert "exited with code 1" in deployment.fail_reason
    assert "CUDA out of memory" in deployment.fail_reason
    assert not Instance.objects.filter(deployment=deployment, state__in=Instance.LIVE_STATES).exists()
    assert fake.containers == {}


def test_delete_removes_the_container_and_keeps_history(fake, cpu_host):
    deployment = DeploymentFactory(gpu_type=cpu_host.gpu_type)
    reconcile.deployment_reconcile(deployment_id=deployment.id)
    reconcile.deployment_reconcile(deployment_id=deployment.id)
    Deployment.objects.filter(id=deployment.id).update(status=Deployment.Status.DELETING)

    reconcile.deployment_reconcile(deployment_id=deployment.id)  # stopping
    reconcile.deployment_reconcile(deployment_id=deployment.id)  # stopped, deleted

    deployment.refresh_from_db()
    assert deployment.status == Deployment.Status.DELETED and deployment.deleted_at
    assert fake.containers == {}
    [instance] = Instance.objects.filter(deployment=deployment)
    assert instance.state == Instance.State.STOPPED
    assert instance.started_at <= instance.stopped_at


def test_orphan_containers_are_swept(fake, cpu_host, settings):
    ours = {engine.LABEL_INSTANCE: "999", engine.LABEL_INSTALLATION: settings.CONTAINER_PREFIX}
    another_installations = {engine.LABEL_INSTANCE: "999", engine.LABEL_INSTALLATION: "elsewhere"}
    fake.container_run(
        cpu_host.docker_url, engine.ContainerSpec(name="ours-999", image="llmhub/vllm-cpu:test", args=[], labels=ours)
    )
    fake.container_run(
        cpu_host.docker_url,
        engine.ContainerSpec(name="theirs-999", image="llmhub/vllm-cpu:test", args=[], labels=another_installations),
    )

    assert reconcile.host_sweep(host=cpu_host) == ["ours-999"]
    assert list(fake.containers) == ["theirs-999"]


def test_scaling_down_stops_extra_instances_and_keeps_the_others_running(fake, cpu_host):
    from llmhub.deployments.services import deployment_scale

    deployment = DeploymentFactory(gpu_type=cpu_host.gpu_type, min_instances=2, max_instances=2)
    reconcile.deployment_reconcile(deployment_id=deployment.id)
    reconcile.deployment_reconcile(deployment_id=deployment.id)
    ready = list(Instance.objects.filter(deployment=deployment, state="ready").order_by("id"))
    assert len(ready) == 2

    deployment_scale(deployment=deployment, min_instances=1, max_instances=1)
    reconcile.deployment_reconcile(deployment_id=deployment.id)
    reconcile.deployment_reconcile(deployment_id=deployment.id)

    states = dict(Instance.objects.filter(deployment=deployment).values_list("id", "state"))
    assert states == {ready[0].id: "ready", ready[1].id: "stopped"}  # the newest one stops
    assert list(fake.containers) == [ready[0].container_name]
    assert len(fake.runs) == 2  # nothing was restarted


def test_a_host_without_the_engine_image_pulls_it_in_a_task_with_progress(
    fake, cpu_host, django_capture_on_commit_callbacks, monkeypatch
):
    from llmhub import queue
    from llmhub.fleet import services

    fake.images_everywhere.clear()
    enqueued = []
    monkeypatch.setattr(queue.app, "send_task", lambda name, args: enqueued.append(args))  # image_pull only
    monkeypatch.setattr(services, "reconcile_soon", lambda deployment_id: None)
    deployment = DeploymentFactory(gpu_type=cpu_host.gpu_type)

    with django_capture_on_commit_callbacks(execute=True):
        reconcile.deployment_reconcile(deployment_id=deployment.id)
        reconcile.deployment_reconcile(deployment_id=deployment.id)  # still pulling: no second pull
    [instance] = Instance.objects.filter(deployment=deployment)
    assert instance.state == Instance.State.STARTING and instance.started_at is None  # GPUs held, not billed
    assert fake.runs == [] and len(enqueued) == 1

    assert services.image_pull_run(pull_id=enqueued[0][0], attempt=enqueued[0][1]) == "done"
    assert services.image_pull_run(pull_id=enqueued[0][0], attempt=enqueued[0][1]) == "done"  # a duplicate: no-op
    reconcile.deployment_reconcile(deployment_id=deployment.id)

    assert fake.pulls == [(cpu_host.docker_url, cpu_host.engine_image)]  # once
    assert len(fake.runs) == 1
    events = list(deployment.events.order_by("id").values_list("kind", "message"))
    assert [k for k, _ in events[:7]] == ["scheduled", "pulling", "pulling", "pulling", "pulling", "pulled", "starting"]
    assert events[1][1] == "the host pulls the engine image first"
    assert [m.split(": ")[-1] for _, m in events[2:5]] == ["25% (100 MB of 400 MB)", "52% (210 MB of 400 MB)",
                                                        "82% (330 MB of 400 MB)"]  # fmt: skip
    assert events[5][1].startswith("the host pulled the engine image in ")


def test_a_failed_pull_fails_the_start_and_in_the_end_the_deployment(
    fake, cpu_host, django_capture_on_commit_callbacks, monkeypatch, settings
):
    from llmhub import queue
    from llmhub.fleet import services

    settings.INSTANCE_MAX_RESTARTS = 1
    monkeypatch.setattr(crashes, "restart_backoff", lambda n: 0)
    fake.images_everywhere.clear()
    fake.pull_error = "manifest for llmhub/vllm-cpu:test not found"
    enqueued = []
    monkeypatch.setattr(queue.app, "send_task", lambda name, args: enqueued.append(args))  # image_pull only
    monkeypatch.setattr(services, "reconcile_soon", lambda deployment_id: None)
    deployment = DeploymentFactory(gpu_type=cpu_host.gpu_type)
    with django_capture_on_commit_callbacks(execute=True):
        reconcile.deployment_reconcile(deployment_id=deployment.id)
    assert services.image_pull_run(pull_id=enqueued[0][0], attempt=enqueued[0][1]) == "failed"

    reconcile.deployment_reconcile(deployment_id=deployment.id)  # start fails: crash 1, replaced
    reconcile.deployment_reconcile(deployment_id=deployment.id)  # the failure is recent: crash 2, failed

    deployment.refresh_from_db()
    assert deployment.status == Deployment.Status.FAILED
    assert "cannot pull the engine image" in deployment.fail_reason  # users: no image, host or registry detail
    last_error = Instance.objects.filter(deployment=deployment).order_by("id").last().last_error
    assert "manifest for llmhub/vllm-cpu:test not found" in last_error  # operators: the engine's words
    assert fake.runs == [] and len(fake.pulls) == 1


def test_the_hugging_face_token_reaches_the_container_and_nothing_else(fake, cpu_host):
    from llmhub import crypto

    deployment = DeploymentFactory(gpu_type=cpu_host.gpu_type, hf_token_encrypted=crypto.encrypt("hf_private_123"))

    reconcile.deployment_reconcile(deployment_id=deployment.id)

    instance = Instance.objects.get(deployment=deployment)
    assert fake.runs[0].environment == {"HF_TOKEN": "hf_private_123", "VLLM_API_KEY": instance.engine_key,
                                        "PYTHONPATH": "/opt/llmhub"}  # fmt: skip
    assert "hf_private_123" not in " ".join(fake.runs[0].args)
    assert "hf_private_123" not in " ".join(deployment.events.values_list("message", flat=True))


def test_a_pull_whose_worker_died_is_taken_over_once_stale_and_a_failed_one_retried_later(
    fake, cpu_host, django_capture_on_commit_callbacks, monkeypatch
):
    from datetime import timedelta

    from django.utils import timezone

    from llmhub import queue
    from llmhub.fleet import services
    from llmhub.fleet.models import ImagePull

    enqueued = []
    monkeypatch.setattr(queue.app, "send_task", lambda name, args: enqueued.append(args))  # image_pull only
    with django_capture_on_commit_callbacks(execute=True):
        pull, started = services.image_pull_request(host=cpu_host, image="img:1")
        again, started_again = services.image_pull_request(host=cpu_host, image="img:1")
        assert (started, started_again, again.id) == (True, False, pull.id)
        ImagePull.objects.filter(id=pull.id).update(updated_at=timezone.now() - timedelta(seconds=121))
        taken, taken_over = services.image_pull_request(host=cpu_host, image="img:1")  # its worker was killed
    assert taken_over and taken.attempt == 2 and enqueued == [(pull.id, 1), (pull.id, 2)]
    assert services.image_pull_run(pull_id=pull.id, attempt=1) == "pulling"  # the dead attempt's task: no-op

    fake.pull_error = "registry unreachable"
    assert services.image_pull_run(pull_id=pull.id, attempt=2) == "failed"
    with django_capture_on_commit_callbacks(execute=True):
        assert services.image_pull_request(host=cpu_host, image="img:1")[1] is False  # recent failure: not yet
        ImagePull.objects.filter(id=pull.id).update(updated_at=timezone.now() - timedelta(seconds=61))
        assert services.image_pull_request(host=cpu_host, image="img:1")[1] is True
    assert enqueued[-1] == (pull.id, 3)


def test_the_engines_own_refusal_reaches_fail_reason(fake, cpu_host, settings, monkeypatch):
    """The CPU engine refuses `engine.quantization: fp8` (vLLM 0.32, observed with the CPU engine image): its
    last lines are a launcher traceback ending in "Engine core initialization failed. See root cause above";
    the cause is about 150 lines higher. A person reading fail_reason must see that cause, not the wrapper."""
    settings.INSTANCE_MAX_RESTARTS = 0
    fake.logs = (Path(__file__).parents[1] / "fakes/logs/vllm_cpu_quantization_fp8.log").read_text()
    deployment = DeploymentFactory(gpu_type=cpu_host.gpu_type)
    reconcile.deployment_reconcile(deployment_id=deployment.id)
    fake.crash(next(iter(fake.containers)))
    reconcile.deployment_reconcile(deployment_id=deployment.id)

    deployment.refresh_from_db()
    assert deployment.status == Deployment.Status.FAILED
    first_line = deployment.fail_reason.splitlines()[0]
    assert first_line.startswith("container exited with code 1: the engine said: RuntimeError: ")
    assert "_C::static_scaled_fp8_quant() expected at most 0 argument(s)" in first_line
    assert "Engine core initialization failed" in deployment.fail_reason  # the log tail still follows


@pytest.mark.parametrize(
    ("logs", "cause"),
    [
        ("", ""),
        ("INFO starting\nWARNING slow", ""),  # no exception line: no cause is made up
        ("RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}", ""),
        ("(EngineCore pid=18) ERROR 11-22 13:33:13 [core.py:1510] ValueError: max_model_len 9999 > 2048\n"
         "RuntimeError: Engine core initialization failed. See root cause above.", "ValueError: max_model_len 9999 > 2048"),
        ("torch.OutOfMemoryError: CUDA out of memory. " + "x" * 500, "torch.OutOfMemoryError: CUDA out of memory. "),
    ],
)  # fmt: skip
def test_engine_error_picks_the_engines_cause(logs, cause):
    assert crashes.engine_error(logs).startswith(cause)
    assert len(crashes.engine_error(logs)) <= crashes.CAUSE_MAX_CHARS
    if not cause:
        assert crashes.engine_error(logs) == ""
