"""End to end with real vLLM: its container killed behind LLMHub's back (an exit LLMHub did not ask
for: a crash) is replaced by the running worker after the backoff, billed up to when it died, and the
model answers through the gateway again."""

import docker
import httpx
import openai
import pytest
from django.conf import settings

from llmhub.fleet import engine
from llmhub.fleet.models import Instance
from tests.factories import UserFactory, token_for
from tests.stack import DOCKER, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.vllm, pytest.mark.docker]


def chat(client, model):
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    return reply.choices[0].message.content


def test_a_killed_vllm_container_is_replaced_and_serves_again(stack):
    user = UserFactory(username="fleet-e2e")
    token = token_for(user)
    api = httpx.Client(base_url=stack, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    created = api.post(
        "/deploy/llm",
        json={"model_name": "tiny", "gpu": "CPU", "num_gpus": 1, "max_batch_size": 4,
              "hf": {"repo": "llmhub/tiny-random-llama"}, "settings": {"min_instances": 1, "max_instances": 1}},
    )  # fmt: skip
    assert created.status_code == 200, created.text
    deploy_id = created.json()["deploy_id"]
    running = lambda: api.get(f"/deploy/{deploy_id}").json()["status"] == "running"  # noqa: E731
    wait_for(running, timeout=600, interval=2, what="the deployment to run")
    client = openai.OpenAI(base_url=f"{stack}/v1/openai", api_key=token, max_retries=0)
    assert chat(client, "fleet-e2e/tiny")
    [first] = Instance.objects.filter(deployment__deploy_id=deploy_id, state=Instance.State.READY)

    docker.from_env().containers.get(first.container_name).kill()  # SIGKILL: exit 137, not the OOM killer

    def replaced():
        ready = list(Instance.objects.filter(deployment__deploy_id=deploy_id, state=Instance.State.READY))
        return ready if ready and ready[0].id != first.id else None

    [second] = wait_for(replaced, timeout=600, interval=2, what="a replacement to serve")
    first.refresh_from_db()
    assert first.state == Instance.State.STOPPED and "exited with code 137" in first.last_error
    assert first.started_at < first.stopped_at < second.started_at
    assert second.restarts == 1 and second.started_at >= second.next_attempt_at  # a crash, with its backoff
    data = api.get(f"/deploy/{deploy_id}").json()
    assert (data["status"], data["fail_reason"], data["instances"]) == ("running", None, {"running": 1, "pending": 0})
    assert chat(client, "fleet-e2e/tiny")
    [container] = engine.containers_list(DOCKER, installation=settings.CONTAINER_PREFIX)
    assert container.name == second.container_name and container.running
