"""Autoscaling with real vLLM containers: a deployment with min 0 scales to zero when idle, held
requests wake exactly one instance and are answered, and load scales it up. The cooldown is set to
5 s so the test does not wait 5 minutes."""

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from llmhub.deployments.models import Deployment
from llmhub.fleet.models import Instance
from tests.factories import UserFactory, token_for
from tests.stack import deploy, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.vllm, pytest.mark.docker]


def test_scale_to_zero_wake_with_held_requests_then_scale_up_under_load(stack):
    user = UserFactory(username="scaler")
    token = token_for(user)
    api = httpx.Client(base_url=stack, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    deploy_id = deploy(api, model_name="elastic", max_batch_size=8, min_instances=0, max_instances=2,
                       cooldown_seconds=5)  # fmt: skip
    deployment = Deployment.objects.get(deploy_id=deploy_id)

    def instances():
        return api.get(f"/deploy/{deploy_id}").json()["instances"]

    # Starts warm, then goes to zero after 5 idle seconds.
    wait_for(lambda: instances()["running"] == 1, timeout=600, interval=1, what="the first instance")
    wait_for(lambda: instances() == {"running": 0, "pending": 0}, timeout=120, interval=1, what="scale to zero")
    assert deployment.events.filter(kind="scaled", message__contains="1 → 0 instances").exists()
    started_before = Instance.objects.filter(deployment=deployment).count()

    # Three concurrent requests are held while exactly one instance starts, then all answered.
    client = openai.OpenAI(base_url=f"{stack}/v1/openai", api_key=token, max_retries=0, timeout=600)

    def ask(_):
        reply = client.chat.completions.create(
            model="scaler/elastic", messages=[{"role": "user", "content": "wake up"}], max_tokens=4
        )
        return reply.choices[0].message.content

    with ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(ask, range(3)))
    assert all(replies)
    assert Instance.objects.filter(deployment=deployment).count() - started_before == 1
    assert deployment.events.filter(kind="scaled", message__contains="scale from zero").count() == 1

    # The same deployment, now at one instance: seven long streams exceed its target concurrency (75 % of 8
    # slots) and a second instance starts.
    started_before = Instance.objects.filter(deployment=deployment).count()
    enough = threading.Event()

    def stream(_):
        while not enough.is_set():  # keep seven streams open until the autoscaler has reacted
            with client.chat.completions.create(
                model="scaler/elastic", messages=[{"role": "user", "content": "go"}], max_tokens=1500,
                stream=True, extra_body={"ignore_eos": True},
            ) as chunks:  # fmt: skip
                for _ in chunks:
                    if enough.is_set():
                        return  # closing the stream cancels the engine's work

    with ThreadPoolExecutor(7) as pool:
        futures = [pool.submit(stream, i) for i in range(7)]
        try:
            wait_for(
                lambda: Instance.objects.filter(deployment=deployment).count() - started_before >= 1,
                timeout=180, interval=1, what="a second instance under load",
            )  # fmt: skip
        finally:
            enough.set()
        for future in futures:
            future.result()
    scaled_up = deployment.events.filter(kind="scaled", message__contains="1 → 2 instances").get()
    assert "load above target" in scaled_up.message and "in flight" in scaled_up.message

    api.delete(f"/deploy/{deploy_id}")
    wait_for(lambda: api.get(f"/deploy/{deploy_id}").status_code == 404, timeout=120, what="the deletion")
