"""Model fit: weights estimated from config.json in a Hugging Face cache; too big → 400, unknown → warning."""

import json
import time
import uuid

import pytest

from llmhub.deployments.fit import parameter_count
from llmhub.deployments.models import Deployment
from tests.factories import GpuTypeFactory, HostFactory

pytestmark = pytest.mark.django_db

LLAMA_3_8B = {
    "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "intermediate_size": 14336, "vocab_size": 128256, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}  # fmt: skip


def test_parameter_count_of_llama_3_8b():
    assert parameter_count(LLAMA_3_8B) == 8_029_995_008  # Meta's model card: 8.03 B


@pytest.fixture
def hf_cache(tmp_path, settings):
    """A Hugging Face hub cache holding an 8 B model's config.json under a fresh repo id."""
    settings.HF_CACHE_DIR = str(tmp_path)
    repo = f"acme/llama-{uuid.uuid4().hex[:8]}"
    model_dir = tmp_path / f"models--{repo.replace('/', '--')}"
    snapshot = model_dir / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(LLAMA_3_8B))
    (model_dir / "refs").mkdir()
    (model_dir / "refs" / "main").write_text("0123abc")
    return repo


@pytest.fixture
def gpu_hosts(db):
    HostFactory(gpu_type=GpuTypeFactory(name="A100-80GB", memory_gb=80, uses_devices=True), gpu_count=8)
    HostFactory(gpu_type=GpuTypeFactory(name="T4-16GB", memory_gb=16, uses_devices=True), gpu_count=4)


def create(client, auth, repo, gpu, num_gpus):
    body = {
        "model_name": f"m-{gpu.lower()}-{num_gpus}", "gpu": gpu, "num_gpus": num_gpus, "max_batch_size": 8,
        "hf": {"repo": repo}, "settings": {"min_instances": 1, "max_instances": 1},
    }  # fmt: skip
    return client.post("/deploy/llm", json.dumps(body), content_type="application/json", **auth)


def test_a_model_too_big_for_the_gpus_is_refused_saying_how_much_it_needs(client, auth, hf_cache, gpu_hosts):
    response = create(client, auth, hf_cache, "T4-16GB", 1)

    assert response.status_code == 400
    message = response.json()["errors"]["num_gpus"][0]
    assert "needs about 20 GB (16 GB of weights" in message and "1 × T4-16GB have 16 GB" in message
    assert not Deployment.objects.exists()


def test_a_model_that_fits_is_accepted_without_warning(client, auth, hf_cache, gpu_hosts):
    one_a100 = create(client, auth, hf_cache, "A100-80GB", 1)
    two_t4 = create(client, auth, hf_cache, "T4-16GB", 2)

    assert one_a100.status_code == 200 and "warnings" not in one_a100.json()
    assert two_t4.status_code == 200


def test_an_unknown_size_is_accepted_with_a_warning(client, auth, gpu_hosts, settings, tmp_path):
    settings.HF_CACHE_DIR = str(tmp_path)

    response = create(client, auth, f"acme/unknown-{uuid.uuid4().hex[:8]}", "T4-16GB", 1)

    assert response.status_code == 200
    assert "could not be read" in response.json()["warnings"][0]


def test_the_create_form_shows_the_estimate_as_the_user_types(client, user, hf_cache, gpu_hosts):
    client.force_login(user)
    data = {"gpu": "A100-80GB", "num_gpus": 1, "hf_repo": hf_cache, "min_instances": 1, "max_instances": 1}

    fits = client.post("/deployments/new/estimate", data).content.decode()
    too_small = client.post("/deployments/new/estimate", {**data, "gpu": "T4-16GB"}).content.decode()

    assert "Weights ≈ <strong>16.1 GB</strong>" in fits and "fits" in fits
    assert "needs about 20 GB" in too_small


@pytest.fixture
def unreachable_hub(monkeypatch, settings, tmp_path):
    """The hub at an address that accepts connections and never answers; nothing in the local cache."""
    from huggingface_hub import constants, hf_api

    from tests.fakes.silent_hub import silent_hub

    settings.HF_CACHE_DIR = str(tmp_path)
    settings.HF_HUB_OFFLINE = False
    with silent_hub() as url:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(hf_api.api, "endpoint", url)
        yield url


def test_create_answers_within_4_s_when_the_hub_never_answers(client, auth, gpu_hosts, unreachable_hub):
    started = time.perf_counter()
    response = create(client, auth, f"acme/unknown-{uuid.uuid4().hex[:8]}", "T4-16GB", 1)
    elapsed = time.perf_counter() - started

    assert response.status_code == 200, response.content
    assert "could not be read" in response.json()["warnings"][0]
    assert elapsed < 4, f"the create waited {elapsed:.1f} s on the hub"


def test_an_unreachable_hub_is_remembered_so_the_next_estimate_does_not_wait(
    client, auth, user, gpu_hosts, unreachable_hub
):
    create(client, auth, f"acme/first-{uuid.uuid4().hex[:8]}", "T4-16GB", 1)
    client.force_login(user)

    started = time.perf_counter()
    response = client.post("/deployments/new/estimate", {"gpu": "T4-16GB", "num_gpus": 1, "hf_repo": "acme/other",
                                                          "min_instances": 1, "max_instances": 1})  # fmt: skip
    elapsed = time.perf_counter() - started

    assert elapsed < 0.5, f"the second estimate waited {elapsed:.1f} s on a hub known to be unreachable"
    assert response.status_code == 200 and "could not be read" in response.content.decode()
