"""Redis and the worker killed mid-operation, with the real worker and beat (Celery) on a Redis of the
test's own, placing deployments on the extra Docker Engines: no work lost, none done twice."""

import os
import signal
import socket
import subprocess
import time

import kombu
import pytest
from django.conf import settings

from llmhub import processes
from llmhub.deployments.models import Deployment, DeploymentEvent
from llmhub.deployments.services import deployment_create, deployment_delete
from llmhub.fleet.models import Instance
from tests.engines import containers, free_port
from tests.stack import database_url, wait_for

pytestmark = [pytest.mark.docker, pytest.mark.django_db(transaction=True)]


class Redis:
    """A redis-server of this test's own (never the shared one), without persistence: a restart loses
    every queued task, as a crashed Redis without AOF does."""

    def __init__(self, log_dir):
        self.port = free_port()
        self.log_dir = log_dir
        self.process = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self):
        log = open(self.log_dir / "redis.log", "ab")  # noqa: SIM115 - kept by the child
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("redis-server did not start")

    def kill(self):
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class Worker:
    """The platform's worker with beat embedded (as the end-to-end tests run it), on `redis`."""

    def __init__(self, redis: Redis, log_dir):
        self.redis, self.log_dir, self.process = redis, log_dir, None

    def start(self):
        commands = processes.platform_commands(
            port=0, schedule=self.log_dir / "celerybeat-schedule", embedded_beat=True
        )
        env = {
            **os.environ,
            "DATABASE_URL": database_url(),
            "REDIS_URL": self.redis.url,
            "CELERY_BROKER_URL": self.redis.url,
            "LLMHUB_RECONCILE_INTERVAL": "1",
            "LLMHUB_QUEUE": settings.CELERY_TASK_DEFAULT_QUEUE,
            "LLMHUB_CONTAINER_PREFIX": settings.CONTAINER_PREFIX,
        }
        [self.process] = processes.start({"worker": commands["worker"]}, log_dir=self.log_dir, env=env)

    def kill(self):
        """SIGKILL the worker and its pool processes at once: nothing gets to tidy up."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self):
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def publish_to(monkeypatch):
    """publish_to(redis): this test process enqueues reconciles on `redis` (as the web process would on the
    platform's broker), one connection per message, failing fast when it is down."""
    from llmhub import queue

    send = queue.app.send_task

    def route(redis: Redis):
        def send_task(name, args=(), **options):
            with kombu.Connection(redis.url, connect_timeout=2) as connection:
                return send(name, args=args, connection=connection, retry=False, **options)

        monkeypatch.setattr(queue.app, "send_task", send_task)

    return route


def settled(deployments):
    """True once every deployment is running with exactly its desired instances, all ready."""
    for deployment in deployments:
        deployment.refresh_from_db()
        live = Instance.objects.filter(deployment=deployment, state__in=Instance.LIVE_STATES)
        if deployment.status != Deployment.Status.RUNNING or live.exclude(state=Instance.State.READY).exists():
            return False
        if live.count() != deployment.desired_instances:
            return False
    return True


def test_killing_redis_and_the_worker_mid_operation_loses_nothing_and_duplicates_nothing(fleet, tmp_path, publish_to):
    fleet.owner.gpu_quota = 8
    fleet.owner.save(update_fields=["gpu_quota"])
    redis, worker = Redis(tmp_path), None
    publish_to(redis)
    redis.start()
    worker = Worker(redis, tmp_path)
    try:
        worker.start()
        deployments = [
            deployment_create(
                user=fleet.owner, model_name=f"m{n}", gpu_type=fleet.gpu_type, num_gpus=1, max_batch_size=8,
                hf_repo="llmhub/tiny-random-llama", min_instances=1 + n % 2, max_instances=2,
            )
            for n in range(3)
        ]  # fmt: skip
        # Mid-operation: as soon as the worker has placed an instance, kill it and Redis with it.
        wait_for(lambda: DeploymentEvent.objects.filter(kind="scheduled").exists(), timeout=120, interval=0.05,
                 what="the worker to place an instance")  # fmt: skip
        worker.kill()
        redis.kill()  # the queued reconcile tasks are gone with it
        placed_when_killed = Instance.objects.exclude(host=None).count()

        # While Redis is down, a deletion is still accepted and recorded.
        deployment_delete(deployment=deployments[0])

        redis.start()
        worker = Worker(redis, tmp_path)
        worker.start()
        try:
            wait_for(lambda: settled(deployments[1:]), timeout=180, interval=0.5, what="the deployments to settle")
            wait_for(
                lambda: Deployment.objects.get(id=deployments[0].id).status == Deployment.Status.DELETED,
                timeout=30, what="the deletion",
            )  # fmt: skip
        except AssertionError as exc:
            tail = (tmp_path / "worker.log").read_text(errors="replace").splitlines()[-80:]
            states = list(Instance.objects.values_list("id", "deployment_id", "state", "host_id", "last_error"))
            raise AssertionError(f"{exc}\ninstances: {states}\nworker log:\n" + "\n".join(tail)) from exc
    finally:
        if worker:
            worker.stop()
        redis.kill()

    assert placed_when_killed >= 1
    live = list(Instance.objects.filter(state__in=Instance.LIVE_STATES))
    assert sorted(i.deployment_id for i in live) == sorted(
        d.id for d in deployments[1:] for _ in range(d.desired_instances)
    )
    # Nothing done twice: one instance row per wanted replica, one container started and recorded for each.
    for deployment in deployments[1:]:
        rows = Instance.objects.filter(deployment=deployment)
        assert rows.count() == deployment.desired_instances, list(rows.values_list("id", "state"))
    for instance in Instance.objects.exclude(container_id=""):
        starts = DeploymentEvent.objects.filter(kind="starting", message__startswith=f"instance {instance.id}: ")
        assert starts.count() == 1, (instance.id, list(starts.values_list("message", flat=True)))
    names = sorted(c.name for c in containers(fleet.engines.a) + containers(fleet.engines.b))
    assert names == sorted(i.container_name for i in live)  # no orphan, no instance without its container
