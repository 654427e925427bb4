"""Served model names beyond the base model: LoRA adapters (``username/model:adapter``), embeddings
(/v1/openai/embeddings, only on deployments with task embed), /v1/openai/models and completions' suffix —
with the official `openai` client against the gateway's ASGI application and a stand-in engine."""


import openai
import pytest

from llmhub.gateway.models import UsageRecord
from tests.factories import DeploymentFactory, InstanceFactory, token_for
from tests.fakes.http import Handler, chat_completion, serve
from tests.gateway_support import openai_over_asgi

pytestmark = pytest.mark.django_db(transaction=True)


class Engine(Handler):
    """Answers chat, completions and embeddings; keeps every (path, body) it received."""

    def do_POST(self):  # noqa: N802
        body = self.read_json()
        self.server.received.append((self.path, body))
        if self.path == "/v1/embeddings":
            inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
            data = [{"object": "embedding", "index": i, "embedding": [0.5, -0.25, float(i)]} for i in range(len(inputs))]
            self.reply(200, {"object": "list", "model": body["model"], "data": data,
                             "usage": {"prompt_tokens": 4 * len(inputs), "total_tokens": 4 * len(inputs)}})  # fmt: skip
        elif self.path == "/v1/completions":
            self.reply(200, {"id": "c", "object": "text_completion", "created": 0, "model": body["model"],
                             "choices": [{"index": 0, "text": "x", "finish_reason": "stop", "logprobs": None}],
                             "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}})  # fmt: skip
        else:
            self.reply(200, chat_completion(body["model"], "hi"))


def run(token, work):
    return openai_over_asgi(token, work, flush=True)


async def status_of(call):
    try:
        await call
    except openai.APIStatusError as exc:
        return exc.status_code, exc.body.get("code"), exc.body.get("message")
    return 200, None, None


def chat(client, model):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])


@pytest.fixture
def engine():
    server = serve(Engine, received=[])
    yield server
    server.shutdown()


ADAPTERS = [{"name": "sql", "repo": "org/sql-lora", "revision": "main"}]


def test_adapter_model_name_routes_to_its_deployment_and_others_are_404(engine):
    deployment = DeploymentFactory(status="running", model_name="m", lora_adapters=ADAPTERS)
    InstanceFactory(deployment=deployment, ready=True, port=engine.server_address[1])
    other = DeploymentFactory(status="running", model_name="theirs", lora_adapters=ADAPTERS)
    name = deployment.full_name

    async def calls(client):
        answer = await chat(client, f"{name}:sql")
        return answer.model, {
            "unknown adapter": await status_of(chat(client, f"{name}:nope")),
            "someone else's adapter": await status_of(chat(client, f"{other.full_name}:sql")),
            "empty adapter": await status_of(chat(client, f"{name}:")),
        }

    model, errors = run(token_for(deployment.user), calls)
    assert model == f"{name}:sql"
    assert engine.received[0][1]["model"] == f"{name}:sql"  # forwarded unchanged: the engine's served name
    assert len(engine.received) == 1
    assert list(UsageRecord.objects.values_list("deployment_id", "prompt_tokens")) == [(deployment.id, 3)]
    for label, (status, code, message) in errors.items():
        assert (status, code) == (404, "model_not_found"), label
        assert "does not exist or you do not have access to it" in message, label


def test_embeddings_on_an_embed_deployment_and_400_across_tasks(engine):
    embedder = DeploymentFactory(status="running", model_name="e5", task="embed")
    InstanceFactory(deployment=embedder, ready=True, port=engine.server_address[1])
    generator = DeploymentFactory(status="running", model_name="gen", user=embedder.user)
    InstanceFactory(deployment=generator, ready=True, port=engine.server_address[1])
    other = DeploymentFactory(status="running", model_name="theirs", task="embed")

    async def calls(client):
        answer = await client.embeddings.create(model=embedder.full_name, input=["a b", "c"])
        return answer, {
            "embeddings on a generate deployment": await status_of(
                client.embeddings.create(model=generator.full_name, input="a")),
            "chat on an embed deployment": await status_of(chat(client, embedder.full_name)),
            "completions on an embed deployment": await status_of(
                client.completions.create(model=embedder.full_name, prompt="a")),
            "someone else's embed deployment": await status_of(
                client.embeddings.create(model=other.full_name, input="a")),
        }  # fmt: skip

    answer, errors = run(token_for(embedder.user), calls)
    assert [d.embedding for d in answer.data] == [[0.5, -0.25, 0.0], [0.5, -0.25, 1.0]]
    assert [d.index for d in answer.data] == [0, 1]
    assert answer.usage.prompt_tokens == 8 and answer.usage.total_tokens == 8
    assert [path for path, _ in engine.received] == ["/v1/embeddings"]
    assert engine.received[0][1]["input"] == ["a b", "c"]
    assert list(UsageRecord.objects.values_list("deployment_id", "endpoint", "prompt_tokens", "completion_tokens")) == [
        (embedder.id, "embeddings", 8, 0)
    ]
    assert errors["embeddings on a generate deployment"][:2] == (400, "model_not_embedding")
    assert "does not serve embeddings" in errors["embeddings on a generate deployment"][2]
    for label in ("chat on an embed deployment", "completions on an embed deployment"):
        assert errors[label][:2] == (400, "model_is_embedding"), label
        assert "serves embeddings only" in errors[label][2], label
    assert errors["someone else's embed deployment"][:2] == (404, "model_not_found")


def test_models_list_adapters_and_embedding_models_and_completions_pass_suffix(engine):
    deployment = DeploymentFactory(status="running", model_name="m", lora_adapters=ADAPTERS)
    InstanceFactory(deployment=deployment, ready=True, port=engine.server_address[1])
    embedder = DeploymentFactory(status="running", model_name="e5", task="embed", user=deployment.user)
    DeploymentFactory(status="running", model_name="theirs", lora_adapters=ADAPTERS)

    async def calls(client):
        listed = await client.models.list()
        await client.completions.create(model=f"{deployment.full_name}:sql", prompt="def f(", suffix="\n    return x")
        return [m.model_dump() for m in listed.data]

    listed = run(token_for(deployment.user), calls)
    by_id = {m["id"]: m for m in listed}
    assert set(by_id) == {deployment.full_name, f"{deployment.full_name}:sql", embedder.full_name}
    assert by_id[f"{deployment.full_name}:sql"]["parent"] == deployment.full_name
    assert by_id[deployment.full_name].get("parent") is None
    path, body = engine.received[-1]
    assert path == "/v1/completions" and body["suffix"] == "\n    return x" and body["model"].endswith(":sql")
