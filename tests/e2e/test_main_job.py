"""End to end on the real stack: deploy API → worker → real vLLM container on the real Docker Engine
→ OpenAI-compatible gateway (official `openai` client) → crash → delete.

One vLLM deployment serves every assertion (a cold start costs about a minute on 2 cores): after the chats,
its container is killed behind LLMHub's back (an exit LLMHub did not ask for: a crash); the running worker
replaces it after the backoff, the first is billed up to when it died, and the model answers through the
gateway again; then the deployment is deleted."""

import time

import docker
import httpx
import openai
import pytest
from django.conf import settings

from llmhub.fleet import engine
from llmhub.fleet.models import Instance
from tests.factories import UserFactory, token_for
from tests.security.attacks import ENGINE_PATHS, engine_call
from tests.stack import DOCKER, deploy_and_wait, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.vllm, pytest.mark.docker]


def test_deploy_chat_stream_crash_and_delete(stack):
    user = UserFactory(username="e2e")
    token = token_for(user)
    api = httpx.Client(base_url=stack, headers={"Authorization": f"Bearer {token}"}, timeout=30)

    deployed = deploy_and_wait(api, model_name="tiny")
    deploy_id = deployed["deploy_id"]
    assert deployed["instances"] == {"running": 1, "pending": 0}
    assert deployed["model_name"] == "e2e/tiny"
    [container] = engine.containers_list(DOCKER, installation=settings.CONTAINER_PREFIX)
    assert container.running and container.labels[engine.LABEL_DEPLOYMENT] == deploy_id
    assert container.labels[engine.LABEL_OWNER] == "e2e"

    # An attacker on the host's network calls the real vLLM engine directly: nothing but /health answers
    # without the instance's key, vLLM's unguarded routes (/invocations runs the model) included.
    instance = Instance.objects.select_related("host").get(deployment__deploy_id=deploy_id, state="ready")
    for method, path in ENGINE_PATHS:
        for key in (None, "EMPTY", token):  # no key, a guess, the user's own LLMHub token
            answer = engine_call(instance.base_url, method, path, key=key, model="e2e/tiny")
            assert answer.status_code == 401, (method, path, key, answer.status_code, answer.text[:200])
    assert engine_call(instance.base_url, "GET", "/health", key=None, model="").status_code == 200
    own = engine_call(instance.base_url, "GET", "/v1/models", key=instance.engine_key, model="")
    assert own.status_code == 200 and own.json()["data"][0]["id"] == "e2e/tiny"
    attrs = docker.from_env().containers.get(container.name).attrs
    config = attrs["HostConfig"]
    assert config["CapDrop"] == ["ALL"] and not config["CapAdd"] and "no-new-privileges:true" in config["SecurityOpt"]
    assert config["PidsLimit"] == settings.ENGINE_PIDS_LIMIT and config["NetworkMode"] == engine.network_name(
        settings.CONTAINER_PREFIX
    )
    assert [b["HostIp"] for b in config["PortBindings"]["8000/tcp"]] == ["127.0.0.1"]
    [cache] = [m["Name"] for m in attrs["Mounts"] if m["Destination"] == engine.HF_CACHE_PATH]
    assert cache == engine.cache_volume_name(settings.CONTAINER_PREFIX, user.id)  # a fresh volume: Docker seeded it

    client = openai.OpenAI(base_url=f"{stack}/v1/openai", api_key=token, max_retries=0)
    assert [m.id for m in client.models.list()] == ["e2e/tiny"]

    chat = client.chat.completions.create(
        model="e2e/tiny", messages=[{"role": "user", "content": "Hello there"}], max_tokens=8
    )
    assert chat.model == "e2e/tiny"
    assert chat.choices[0].message.content
    assert chat.usage.prompt_tokens > 0 and 0 < chat.usage.completion_tokens <= 8
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens

    arrivals, text = [], ""
    stream = client.chat.completions.create(
        model="e2e/tiny",
        messages=[{"role": "user", "content": "Tell me a story"}],
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    usage = None
    for chunk in stream:
        arrivals.append(time.monotonic())
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        usage = chunk.usage or usage
    assert len(arrivals) >= 8, "a stream of 8 tokens arrives as several chunks"
    assert text
    assert usage.completion_tokens == 8

    completion = client.completions.create(model="e2e/tiny", prompt="Once upon a time", max_tokens=8)
    assert completion.choices[0].text and completion.usage.completion_tokens <= 8
    pieces = list(
        client.completions.create(
            model="e2e/tiny", prompt="Once upon a time", max_tokens=8, stream=True, extra_body={"ignore_eos": True}
        )
    )
    assert len([p for p in pieces if p.choices and p.choices[0].text]) >= 2

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="someone/else", messages=[{"role": "user", "content": "hi"}])

    # The container killed behind LLMHub's back (SIGKILL: exit 137, not the OOM killer) is a crash: replaced
    # after its backoff, the first billed up to when it died, and the model answers again.
    first = instance
    docker.from_env().containers.get(first.container_name).kill()

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
    again = client.chat.completions.create(model="e2e/tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert again.choices[0].message.content
    [container] = engine.containers_list(DOCKER, installation=settings.CONTAINER_PREFIX)
    assert container.name == second.container_name and container.running

    assert api.delete(f"/deploy/{deploy_id}").json()["status"] == "deleting"
    wait_for(lambda: api.get(f"/deploy/{deploy_id}").status_code == 404, timeout=120, what="the deletion")
    assert engine.containers_list(DOCKER, installation=settings.CONTAINER_PREFIX) == []
