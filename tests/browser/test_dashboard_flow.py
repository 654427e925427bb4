"""The main job end to end on the real stack (web, worker, beat, a real vLLM container on the real Docker
Engine), first as a user in a real browser (Playwright driving Debian's Chromium): sign in, create a deployment
with the form (live cost estimate), watch its badge reach `running` without reloading, chat with it, change its
scale, read its API examples, create an API token. Then with that token, through the OpenAI-compatible gateway
(the official `openai` client), as an attacker on the host's network against the engine itself, and behind
LLMHub's back: its container is killed (a crash: replaced after the backoff, the first billed up to when it
died, the model answers again). Last, the deployment is deleted with the trash icon and its container is gone.

One vLLM deployment serves every assertion (each cold start is about 13 s of two busy cores). Screenshots go
to test-artifacts/browser/."""

import re
import time

import docker
import httpx
import openai
import pytest
from django.conf import settings
from playwright.sync_api import expect

from llmhub.fleet import engine
from llmhub.fleet.models import Instance
from tests.browser_support import chromium_page, sign_in
from tests.conftest import ARTIFACTS
from tests.factories import UserFactory
from tests.security.attacks import ENGINE_PATHS, engine_call
from tests.stack import DOCKER, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.browser, pytest.mark.vllm, pytest.mark.docker]

def test_create_watch_chat_use_the_api_crash_and_delete(stack):
    user = UserFactory(username="carol", password="carol-password-1")
    shots = ARTIFACTS / "browser"
    shots.mkdir(parents=True, exist_ok=True)

    with chromium_page(width=1280, height=860, timeout_ms=30_000) as page:

        page.goto(f"{stack}/deployments/")
        expect(page).to_have_url(re.compile(r"/login/"))
        page.fill("input[name=username]", "carol")
        page.fill("input[name=password]", "carol-password-1")
        page.screenshot(path=shots / "01-login.png")
        page.click("button[type=submit]")
        expect(page.get_by_text("No deployments yet")).to_be_visible()
        page.screenshot(path=shots / "02-empty-list.png")

        page.click("text=Create your first deployment")
        page.fill("input[name=model_name]", "browser-llama")
        page.select_option("select[name=gpu]", "CPU")
        page.fill("input[name=max_batch_size]", "4")
        page.fill("input[name=hf_repo]", "llmhub/tiny-random-llama")
        page.fill("input[name=min_instances]", "3")
        page.fill("input[name=max_instances]", "1")
        expect(page.locator("#estimate")).to_contain_text("Per month")  # live cost as the user types
        expect(page.locator("#errors-min_instances")).to_contain_text("must not be more than")  # live validation
        page.click("button:has-text('Deploy')")
        expect(page.locator(".has-error .error")).to_contain_text("must not be more than max instances")
        page.screenshot(path=shots / "03-form-error.png", full_page=True)
        page.fill("input[name=min_instances]", "1")
        page.click("button:has-text('Deploy')")

        badge = page.locator("h1 .badge")
        expect(badge).to_have_text("deploying")
        page.screenshot(path=shots / "04-deploying.png", full_page=True)
        # Swapped in by htmx polling, no reload.
        expect(badge).to_have_text(re.compile("running|failed"), timeout=600_000)
        expect(badge).to_have_text("running")
        expect(page.locator("#live")).to_contain_text("ready", timeout=10_000)
        page.screenshot(path=shots / "05-running.png", full_page=True)

        page.fill("#scale-form input[name=max_instances]", "2")
        page.click("#scale-form button")
        expect(page.locator("#messages")).to_contain_text("now runs 1–2 instances")
        page.screenshot(path=shots / "07-scaled.png", full_page=True)

        page.click("text=model page")  # the web demo, /carol/browser-llama
        expect(page).to_have_url(re.compile(r"/carol/browser-llama$"))
        page.fill("#chat-input", "Hello, who are you?")
        page.click("#chat-form button")
        reply = page.locator(".msg-assistant").last
        expect(reply).not_to_have_class(re.compile("streaming"), timeout=60_000)
        expect(reply).not_to_be_empty()
        expect(reply).not_to_have_class(re.compile("msg-error"))
        page.screenshot(path=shots / "06-chat.png", full_page=True)

        page.click("nav.tabs >> text=API")
        expect(page.locator("pre.code").first).to_contain_text('"model": "carol/browser-llama"')
        page.screenshot(path=shots / "08-model-api.png", full_page=True)

        page.click("nav >> text=API tokens")
        page.fill("input[name=name]", "laptop")
        page.click("button:has-text('Create token')")
        secret = page.locator("#new-token-secret").inner_text()
        assert secret.startswith("lh-")
        page.screenshot(path=shots / "09-token-created.png", full_page=True)
        page.goto(page.url)  # a fresh GET of the tokens page
        expect(page.get_by_text(secret)).to_have_count(0)  # shown once

    # Outside the browser's block: Playwright's sync API runs an event loop there, where Django refuses queries.
    deploy_id = the_api_the_engine_and_a_crash(stack, token=secret, user=user)

    with chromium_page(width=1280, height=860, timeout_ms=30_000) as page:
        sign_in(page, f"{stack}/deployments/", "carol", "carol-password-1")
        row = page.locator("tr", has_text="carol/browser-llama")
        expect(row.locator(".badge")).to_have_text("running")
        page.screenshot(path=shots / "10-list.png", full_page=True)
        page.once("dialog", lambda dialog: dialog.accept())
        row.locator("button[title^='Delete']").click()
        expect(row).to_have_count(0)
        expect(page.locator("#messages")).to_contain_text("Deleting carol/browser-llama")
        page.screenshot(path=shots / "11-deleted.png", full_page=True)

    api = httpx.Client(base_url=stack, headers={"Authorization": f"Bearer {secret}"}, timeout=30)
    wait_for(lambda: api.get(f"/deploy/{deploy_id}").status_code == 404, timeout=120, what="the deletion")
    assert engine.containers_list(DOCKER, installation=settings.CONTAINER_PREFIX) == []


MODEL = "carol/browser-llama"


def the_api_the_engine_and_a_crash(stack: str, *, token: str, user) -> str:
    """The running deployment MODEL through the deploy API and the gateway with `token` (created in the
    dashboard), its engine called directly as an attacker would, then its container killed and replaced.
    Returns its deploy_id."""
    api = httpx.Client(base_url=stack, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    [deployed] = api.get("/deploy/list").json()
    deploy_id = deployed["deploy_id"]
    assert (deployed["model_name"], deployed["instances"]) == (MODEL, {"running": 1, "pending": 0})
    [container] = engine.containers_list(DOCKER, installation=settings.CONTAINER_PREFIX)
    assert container.running and container.labels[engine.LABEL_DEPLOYMENT] == deploy_id
    assert container.labels[engine.LABEL_OWNER] == "carol"

    # An attacker on the host's network calls the real vLLM engine directly: nothing but /health answers
    # without the instance's key, vLLM's unguarded routes (/invocations runs the model) included.
    instance = Instance.objects.select_related("host").get(deployment__deploy_id=deploy_id, state="ready")
    for method, path in ENGINE_PATHS:
        for key in (None, "EMPTY", token):  # no key, a guess, the user's own LLMHub token
            answer = engine_call(instance.base_url, method, path, key=key, model=MODEL)
            assert answer.status_code == 401, (method, path, key, answer.status_code, answer.text[:200])
    assert engine_call(instance.base_url, "GET", "/health", key=None, model="").status_code == 200
    own = engine_call(instance.base_url, "GET", "/v1/models", key=instance.engine_key, model="")
    assert own.status_code == 200 and own.json()["data"][0]["id"] == MODEL
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
    assert [m.id for m in client.models.list()] == [MODEL]

    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello there"}], max_tokens=8
    )
    assert chat.model == MODEL
    assert chat.choices[0].message.content
    assert chat.usage.prompt_tokens > 0 and 0 < chat.usage.completion_tokens <= 8
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens

    arrivals, text = [], ""
    stream = client.chat.completions.create(
        model=MODEL,
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

    completion = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8)
    assert completion.choices[0].text and completion.usage.completion_tokens <= 8
    pieces = list(
        client.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=8, stream=True, extra_body={"ignore_eos": True}
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
    again = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert again.choices[0].message.content
    [container] = engine.containers_list(DOCKER, installation=settings.CONTAINER_PREFIX)
    assert container.name == second.container_name and container.running

    return deploy_id
