"""The official `openai` client against the gateway's ASGI application, for every error the gateway
answers, plus load balancing over instances and the /metrics endpoint. (Successful calls against real
vLLM are in tests/e2e.)"""

import asyncio
import time

import openai
import pytest

from llmhub.fleet.models import Instance
from tests.factories import DeploymentFactory, HostFactory, InstanceFactory, token_for
from tests.fakes.http import Handler, chat_completion, serve
from tests.gateway_support import openai_over_asgi

pytestmark = pytest.mark.django_db(transaction=True)

COMPUTE = 0.05  # seconds an answer takes


class Engine(Handler):
    """A minimal OpenAI-compatible engine that answers every chat completion and counts them, after
    COMPUTE seconds (so that concurrent requests are in flight together, as on a real engine)."""

    def do_POST(self):  # noqa: N802
        body = self.read_json()
        self.server.hits += 1
        time.sleep(COMPUTE)
        self.reply(200, chat_completion(body["model"], "hi"))


def engine_server():
    return serve(Engine, hits=0)


def run(token, work):
    return openai_over_asgi(token, work)


def chat(client, model, **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], **kw)


@pytest.fixture
def deployment():
    return DeploymentFactory(status="running", model_name="m")


def test_openai_client_errors(deployment, settings):
    settings.GATEWAY_HOLD_TIMEOUT = 0.6
    token = token_for(deployment.user)
    other = DeploymentFactory(status="running", model_name="theirs")

    async def errors(client):
        raised = {}
        for name, call in {
            "unknown model": chat(client, f"{deployment.user.username}/nope"),
            "someone else's": chat(client, other.full_name),
            "no instance in time": chat(client, deployment.full_name),
            "bad body": client.chat.completions.create(model="", messages=[]),
        }.items():
            try:
                await call
            except openai.APIStatusError as exc:
                raised[name] = (type(exc), exc.status_code, exc.body.get("code"))
        bad_token = openai.AsyncOpenAI(base_url=str(client.base_url), api_key="lh-wrong", max_retries=0,
                                       http_client=client._client)  # fmt: skip
        try:
            await bad_token.models.list()
        except openai.AuthenticationError as exc:
            raised["bad token"] = (type(exc), exc.status_code, exc.body.get("code"))
        return raised

    assert run(token, errors) == {
        "unknown model": (openai.NotFoundError, 404, "model_not_found"),
        "someone else's": (openai.NotFoundError, 404, "model_not_found"),
        "no instance in time": (openai.InternalServerError, 503, "no_ready_instance"),
        "bad body": (openai.BadRequestError, 400, "missing_model"),
        "bad token": (openai.AuthenticationError, 401, "invalid_api_key"),
    }


def test_openai_client_rate_limit(deployment, settings):
    settings.GATEWAY_RATE_LIMIT_PER_MINUTE = 1
    server = engine_server()
    InstanceFactory(deployment=deployment, ready=True, port=server.server_address[1])

    async def twice(client):
        await chat(client, deployment.full_name)
        with pytest.raises(openai.RateLimitError) as caught:
            await chat(client, deployment.full_name)
        return caught.value

    error = run(token_for(deployment.user), twice)
    server.shutdown()
    assert error.status_code == 429 and int(error.response.headers["Retry-After"]) >= 1


def test_requests_spread_over_instances_and_a_dead_one_gets_none(deployment):
    servers = [engine_server(), engine_server()]
    host = HostFactory()
    for server in servers:
        Instance.objects.create(deployment=deployment, host=host, state="ready", port=server.server_address[1])

    async def burst(client, n=10):
        answers = await asyncio.gather(*(chat(client, deployment.full_name) for _ in range(n)))
        return [a.choices[0].message.content for a in answers]

    token = token_for(deployment.user)
    assert run(token, burst) == ["hi"] * 10
    assert all(s.hits >= 3 for s in servers), [s.hits for s in servers]  # least outstanding spreads the load

    servers[0].shutdown()
    servers[0].server_close()
    before = servers[1].hits
    assert run(token, burst) == ["hi"] * 10  # connect failures are retried on the live instance
    assert servers[1].hits - before == 10
    servers[1].shutdown()


def test_metrics_need_their_token_and_show_gateway_and_fleet_series(client, deployment, settings):
    from datetime import timedelta

    from django.utils import timezone
    from prometheus_client.parser import text_string_to_metric_families

    server = engine_server()
    two_hours_ago = timezone.now() - timedelta(hours=2)
    InstanceFactory(deployment=deployment, ready=True, port=server.server_address[1],
                            started_at=two_hours_ago)  # fmt: skip
    InstanceFactory(deployment=deployment)
    run(token_for(deployment.user), lambda c: chat(c, deployment.full_name))
    server.shutdown()

    settings.METRICS_TOKEN = ""
    assert client.get("/metrics").status_code == 404
    settings.METRICS_TOKEN = "scrape-secret"
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    text = client.get("/metrics", HTTP_AUTHORIZATION="Bearer scrape-secret").content.decode()

    assert f'llmhub_gateway_requests_total{{deployment="{deployment.full_name}",status="200"}}' in text
    assert "llmhub_gateway_request_duration_seconds_bucket" in text
    samples = {(m.name, tuple(sorted(m.labels.items()))): m.value
               for family in text_string_to_metric_families(text) for m in family.samples}  # fmt: skip
    assert samples[("llmhub_instances", (("state", "ready"),))] == 1
    assert samples[("llmhub_pending_instances", ())] == 1
    gpu_hours = samples[
        ("llmhub_gpu_hours", (("deploy_id", deployment.deploy_id), ("deployment", deployment.full_name)))
    ]
    assert 2.0 <= gpu_hours < 2.01  # 2 hours × 1 GPU
