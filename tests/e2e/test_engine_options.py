"""Engine options and LoRA adapters on the real vLLM engine: a deployment with a context length, prefix
caching, n-gram speculative decoding and one adapter serves the base model and the adapter (on the engine
itself, with the instance's key, and through the gateway as ``user/model:adapter`` with the official `openai`
client), and an adapter added by PUT /deploy/<id> is loaded into the running instance. An embed deployment answers /v1/openai/embeddings."""

import httpx
import openai
import pytest

from llmhub.fleet.models import Instance
from tests.factories import UserFactory, token_for
from tests.stack import TINY_LLAMA, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.vllm, pytest.mark.docker]

LORA = "llmhub/tiny-random-llama-lora"  # rank 8, baked into the engine image beside the model


def complete(instance, model: str, prompt: str = "The capital of France is", max_tokens: int = 8) -> str:
    answer = httpx.post(
        f"{instance.base_url}/v1/completions",
        headers={"Authorization": f"Bearer {instance.engine_key}"},
        json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True},
        timeout=120,
    )  # fmt: skip
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == model
    return answer.json()["choices"][0]["text"]


def spec_decode_drafts(instance) -> float:
    """vLLM's count of speculative drafts proposed (its /metrics, with the instance's key)."""
    answer = httpx.get(
        f"{instance.base_url}/metrics", headers={"Authorization": f"Bearer {instance.engine_key}"}, timeout=10
    )
    assert answer.status_code == 200, answer.text
    lines = [line for line in answer.text.splitlines() if line.startswith("vllm:spec_decode_num_drafts_total")]
    assert lines, "the engine does not run speculative decoding"
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


def models(instance) -> dict[str, dict]:
    answer = httpx.get(
        f"{instance.base_url}/v1/models", headers={"Authorization": f"Bearer {instance.engine_key}"}, timeout=10
    )
    assert answer.status_code == 200, answer.text
    return {m["id"]: m for m in answer.json()["data"]}


def test_engine_options_and_lora_adapters_on_the_real_engine(stack):
    user = UserFactory(username="opts")
    api = httpx.Client(base_url=stack, headers={"Authorization": f"Bearer {token_for(user)}"}, timeout=30)
    created = api.post("/deploy/llm", json={
        "model_name": "tiny", "gpu": "CPU", "num_gpus": 1, "max_batch_size": 4, "hf": {"repo": TINY_LLAMA},
        "settings": {"min_instances": 1, "max_instances": 1},
        "engine": {"max_model_len": 512, "prefix_caching": True,
                   "speculative": {"method": "ngram", "num_speculative_tokens": 2}},
        "lora_adapters": [{"name": "tiny", "repo": LORA}],
    })  # fmt: skip
    assert created.status_code == 200, created.text
    deploy_id = created.json()["deploy_id"]

    def running():
        data = api.get(f"/deploy/{deploy_id}").json()
        assert data["status"] in ("deploying", "running"), data
        return data["status"] == "running"

    wait_for(running, timeout=600, interval=1, what="the deployment to run")
    instance = Instance.objects.select_related("host").get(deployment__deploy_id=deploy_id, state="ready")

    served = models(instance)
    assert set(served) == {"opts/tiny", "opts/tiny:tiny"}
    assert served["opts/tiny"]["max_model_len"] == 512
    base, adapted = complete(instance, "opts/tiny"), complete(instance, "opts/tiny:tiny")
    assert base and adapted and base != adapted  # the adapter changes the logits
    assert complete(instance, "opts/tiny") == base  # temperature 0: deterministic
    # n-gram speculative decoding runs on the CPU engine: a prompt that repeats itself gets drafts proposed.
    complete(instance, "opts/tiny", prompt="a b c a b c a b c a b", max_tokens=16)
    assert spec_decode_drafts(instance) > 0

    # Through the gateway: the adapter is a model name of its own, the same answer as on the engine.
    client = openai.OpenAI(base_url=f"{stack}/v1/openai", api_key=token_for(user), max_retries=0)
    via_gateway = client.completions.create(
        model="opts/tiny:tiny", prompt="The capital of France is", max_tokens=8, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert via_gateway.model == "opts/tiny:tiny" and via_gateway.choices[0].text == adapted
    assert via_gateway.usage.completion_tokens == 8
    listed = {m.id: m for m in client.models.list()}
    assert "opts/tiny:tiny" in listed
    stranger = openai.OpenAI(base_url=f"{stack}/v1/openai", api_key=token_for(UserFactory()), max_retries=0)
    with pytest.raises(openai.NotFoundError):
        stranger.completions.create(model="opts/tiny:tiny", prompt="hi", max_tokens=1)

    # An adapter added while the deployment runs is loaded into the same instance at run time.
    changed = api.put(f"/deploy/{deploy_id}", json={
        "lora_adapters": [{"name": "tiny", "repo": LORA}, {"name": "second", "repo": LORA}],
    })  # fmt: skip
    assert changed.status_code == 200, changed.text
    wait_for(lambda: "opts/tiny:second" in models(instance), timeout=120, interval=1, what="the new adapter")
    assert complete(instance, "opts/tiny:second") == adapted  # same weights as "tiny"
    instance.refresh_from_db()
    assert instance.state == "ready" and instance.replace_requested_at is None  # not restarted

    # Removing one unloads it from the running instance.
    removed = api.put(f"/deploy/{deploy_id}", json={"lora_adapters": [{"name": "second", "repo": LORA}]})
    assert removed.status_code == 200, removed.text
    wait_for(lambda: "opts/tiny:tiny" not in models(instance), timeout=60, interval=1, what="the adapter unloaded")
    assert set(models(instance)) == {"opts/tiny", "opts/tiny:second"}


def test_an_embed_deployment_answers_embeddings_on_the_engine(stack):
    user = UserFactory(username="embedder")
    api = httpx.Client(base_url=stack, headers={"Authorization": f"Bearer {token_for(user)}"}, timeout=30)
    created = api.post("/deploy/llm", json={
        "model_name": "vectors", "gpu": "CPU", "num_gpus": 1, "max_batch_size": 4, "hf": {"repo": TINY_LLAMA},
        "settings": {"min_instances": 1, "max_instances": 1}, "task": "embed",
    })  # fmt: skip
    assert created.status_code == 200, created.text
    deploy_id = created.json()["deploy_id"]
    wait_for(
        lambda: api.get(f"/deploy/{deploy_id}").json()["status"] == "running", timeout=600, what="the embed deployment"
    )
    instance = Instance.objects.select_related("host").get(deployment__deploy_id=deploy_id, state="ready")

    answer = httpx.post(
        f"{instance.base_url}/v1/embeddings",
        headers={"Authorization": f"Bearer {instance.engine_key}"},
        json={"model": "embedder/vectors", "input": ["hello", "a longer sentence"]},
        timeout=120,
    )

    assert answer.status_code == 200, answer.text
    vectors = [item["embedding"] for item in answer.json()["data"]]
    assert len(vectors) == 2 and len(vectors[0]) == len(vectors[1]) > 0 and vectors[0] != vectors[1]

    # Through the gateway, with the official client, as an editor's embeddings provider would call it.
    client = openai.OpenAI(base_url=f"{stack}/v1/openai", api_key=token_for(user), max_retries=0)
    result = client.embeddings.create(model="embedder/vectors", input=["hello", "a longer sentence"])
    assert [len(item.embedding) for item in result.data] == [len(vectors[0])] * 2
    assert result.usage.prompt_tokens > 0
    with pytest.raises(openai.BadRequestError):  # an embedding model does not chat
        client.chat.completions.create(model="embedder/vectors", messages=[{"role": "user", "content": "hi"}])
