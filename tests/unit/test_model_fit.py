"""Model fit: weights estimated from config.json in a Hugging Face cache; too big → 400, unknown → warning."""

import json
import time
import uuid

import pytest

from llmhub.deployments.fit import (
    GB,
    Fit,
    ModelFacts,
    facts_from_config,
    kv_token_bytes,
    lora_bytes,
    parameter_count,
    weights_bytes,
)
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
    assert "needs about 16.1 GB on the GPUs (16.1 GB of weights)" in message
    assert "1 × T4-16GB have 14.4 GB for vLLM (90 % of 16 GB)" in message
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

    assert '<th>Weights</th><td class="nowrap">16.1 GB</td>' in fits and "Fits" in fits
    assert "needs about 16.1 GB on the GPUs" in too_small


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


# --- The arithmetic, against published sizes -------------------------------------------------------------

LLAMA_3_1_8B = {**LLAMA_3_8B, "max_position_embeddings": 131072}


def test_weights_of_an_8b_model_at_16_8_and_4_bits():
    facts = facts_from_config(LLAMA_3_1_8B)
    # 16 bits: 8.03 B × 2 bytes (Meta's bf16 safetensors total 16.06 GB).
    assert weights_bytes(facts) / GB == pytest.approx(16.06, abs=0.01)
    assert weights_bytes(facts, dtype="float32") / GB == pytest.approx(32.12, abs=0.01)
    # fp8 linear layers, 16-bit embeddings and LM head (1.05 B): about 9.1 GB, as published FP8 checkpoints of
    # Llama 3 8B are (neuralmagic/Meta-Llama-3-8B-Instruct-FP8: 9.1 GB).
    assert weights_bytes(facts, quantization="fp8") / GB == pytest.approx(9.08, abs=0.05)
    # 4 bits with group-128 scales: about 5.7 GB, as published AWQ checkpoints of Llama 3 8B are.
    for method in ("awq", "gptq", "bitsandbytes"):
        assert weights_bytes(facts, quantization=method) / GB == pytest.approx(5.74, abs=0.1)


def test_an_already_quantized_repo_counts_at_its_stored_size():
    quantized = {**LLAMA_3_1_8B, "quantization_config": {"quant_method": "awq", "bits": 4}}
    facts = ModelFacts(**{**facts_from_config(quantized).__dict__, "stored_bytes": 5_730_000_000})
    assert facts.quantized and weights_bytes(facts, quantization="awq") == 5_730_000_000


def test_kv_cache_per_token_and_per_sequence():
    facts = facts_from_config(LLAMA_3_1_8B)
    # 2 × 32 layers × 8 KV heads × 128 dims × 2 bytes = 128 KiB per token; an fp8 KV cache halves it.
    assert kv_token_bytes(facts) == 131072
    assert kv_token_bytes(facts, kv_cache_dtype="fp8") == 65536
    # vLLM's own figure for Llama 3.1 8B at its full 131,072-token context: 16 GiB for one sequence.
    fit = Fit(weights_gb=16.06, available_gb=80, kv_token_bytes=131072, context_len=131072, batch=8)
    assert fit.kv_sequence_gb == pytest.approx(17.18, abs=0.01) and fit.kv_batch_gb == pytest.approx(137.4, abs=0.1)


def test_lora_slots_of_an_8b_model():
    # rank 16 × (in + out) of q, k, v, o, gate, up, down (4096, 1024 KV, 14336 MLP) × 32 layers × 2 bytes.
    assert lora_bytes(facts_from_config(LLAMA_3_1_8B)) / GB == pytest.approx(0.0839, abs=0.001)


@pytest.fixture
def llama_31(tmp_path, settings):
    """An 8 B model with a 131,072-token context in a Hugging Face cache, under a fresh repo id."""
    settings.HF_CACHE_DIR = str(tmp_path)
    repo = f"acme/llama31-{uuid.uuid4().hex[:8]}"
    snapshot = tmp_path / f"models--{repo.replace('/', '--')}" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(LLAMA_3_1_8B))
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0123abc")
    return repo


def create_with(client, auth, repo, gpu, num_gpus, *, batch=8, engine=None, adapters=()):
    body = {
        "model_name": f"m-{uuid.uuid4().hex[:6]}", "gpu": gpu, "num_gpus": num_gpus, "max_batch_size": batch,
        "hf": {"repo": repo}, "settings": {"min_instances": 1, "max_instances": 1}, "engine": engine or {},
        "lora_adapters": [{"name": n, "repo": "acme/adapter"} for n in adapters],
    }  # fmt: skip
    return client.post("/deploy/llm", json.dumps(body), content_type="application/json", **auth)


def test_weights_plus_one_full_length_sequence_must_fit(client, auth, llama_31, gpu_hosts):
    """16 bits on 2 × T4 (28.8 GB for vLLM): the weights alone fit, a 131,072-token sequence's 17.2 GB of KV
    cache does not; at 8,192 tokens it does, and 4-bit weights with the full context fit too."""
    full = create_with(client, auth, llama_31, "T4-16GB", 2)
    assert full.status_code == 400
    message = full.json()["errors"]["num_gpus"][0]
    assert "16.1 GB of weights + 17.2 GB of KV cache for one 131,072-token sequence" in message
    assert "needs about 33.2 GB" in message and "2 × T4-16GB have 28.8 GB" in message

    short = create_with(client, auth, llama_31, "T4-16GB", 2, batch=1, engine={"max_model_len": 8192})
    assert short.status_code == 200 and "warnings" not in short.json()
    quantized = create_with(client, auth, llama_31, "T4-16GB", 2, batch=1, engine={"quantization": "awq"})
    assert quantized.status_code == 200, quantized.json()
    assert not Deployment.objects.filter(model_name=full.json().get("model_name", "")).exists()


def test_a_full_batch_that_does_not_fit_is_a_warning_with_the_numbers(client, auth, llama_31, gpu_hosts):
    """1 × A100-80GB (72 GB for vLLM), 8,192-token sequences (1.07 GB of KV cache each): a batch of 64 needs
    68.7 GB of KV cache; 52 sequences fit beside the weights."""
    response = create_with(client, auth, llama_31, "A100-80GB", 1, batch=64, engine={"max_model_len": 8192})
    assert response.status_code == 200
    [warning] = response.json()["warnings"]
    assert "A full batch of 64 sequences of 8,192 tokens needs 68.7 GB of KV cache" in warning
    assert "84.8 GB in all" in warning and "72.0 GB vLLM has" in warning and "about 52 such sequences" in warning
    # An fp8 KV cache halves it: the batch fits, no warning.
    fp8 = create_with(client, auth, llama_31, "A100-80GB", 1, batch=64,
                      engine={"max_model_len": 8192, "kv_cache_dtype": "fp8"})  # fmt: skip
    assert fp8.status_code == 200 and "warnings" not in fp8.json()


def test_adapters_are_counted(client, auth, user, llama_31, gpu_hosts):
    """On 1 × T4 at 4 bits with 2,048-token sequences: 5.7 GB + 0.27 GB + the LoRA slots (0.08 GB)."""
    engine = {"quantization": "awq", "max_model_len": 2048}
    response = create_with(client, auth, llama_31, "T4-16GB", 1, batch=1, engine=engine, adapters=("a",))
    assert response.status_code == 200
    client.force_login(user)
    form_page = client.post("/deployments/new/estimate", {
        "gpu": "T4-16GB", "num_gpus": 1, "hf_repo": llama_31, "min_instances": 1, "max_instances": 1,
        "max_batch_size": 1, "quantization": "awq", "max_model_len": 2048, "lora_adapters": "a acme/adapter",
    }).content.decode()  # fmt: skip
    assert '<th>LoRA slots</th><td class="nowrap">0.08 GB</td>' in form_page, form_page


def test_a_context_past_the_models_own_is_a_field_error(client, auth, llama_31, gpu_hosts):
    response = create_with(client, auth, llama_31, "A100-80GB", 1, engine={"max_model_len": 200_000})
    assert response.status_code == 400
    assert "at most 131,072 tokens per sequence" in response.json()["errors"]["engine.max_model_len"][0]


# --- An 8 B model on one 24 GB GPU: refused at its full context, warned with a batch of 64 ------------------


@pytest.fixture
def l4_host(db):
    HostFactory(gpu_type=GpuTypeFactory(name="L4-24GB", memory_gb=24, uses_devices=True), gpu_count=2)


def test_an_8b_model_at_16_bits_on_a_24_gb_gpu_through_the_api(client, auth, llama_31, l4_host):
    """21.6 GB for vLLM (90 % of 24 GB). 131,072 tokens: 16.1 GB + 17.2 GB = 33.2 GB, refused. 8,192 tokens
    with a batch of 64: one sequence (1.07 GB) fits, the batch (68.7 GB) does not: a warning with the numbers
    and what to change, and about 5 sequences at once."""
    refused = create_with(client, auth, llama_31, "L4-24GB", 1, batch=1, engine={"max_model_len": 131072})
    assert refused.status_code == 400
    [message] = refused.json()["errors"]["num_gpus"]
    assert "needs about 33.2 GB" in message and "1 × L4-24GB have 21.6 GB for vLLM (90 % of 24 GB)" in message

    warned = create_with(client, auth, llama_31, "L4-24GB", 1, batch=64, engine={"max_model_len": 8192})
    assert warned.status_code == 200, warned.json()
    [warning] = warned.json()["warnings"]
    assert "A full batch of 64 sequences of 8,192 tokens needs 68.7 GB of KV cache" in warning
    assert "84.8 GB in all" in warning and "21.6 GB vLLM has" in warning and "about 5 such sequences" in warning
    for advice in ("max_batch_size", "max_model_len", "kv_cache_dtype", "quantiz", "more GPUs"):
        assert advice in warning, advice


def test_an_8b_model_on_a_24_gb_gpu_through_the_form(client, user, llama_31, l4_host):
    client.force_login(user)
    data = {
        "model_name": "llama-on-l4", "gpu": "L4-24GB", "num_gpus": 1, "hf_repo": llama_31, "hf_revision": "",
        "hf_token": "", "min_instances": 1, "max_instances": 1, "max_batch_size": 64, "max_model_len": 8192,
    }  # fmt: skip
    live = client.post("/deployments/new/estimate", data).content.decode()
    for row, value in (("Weights", "16.1"), ("KV cache, one sequence of 8192 tokens", "1.1"),
                       ("KV cache, a full batch of 64", "68.7"), ("Needed: weights + one sequence", "17.1"),
                       ("Needed with a full batch", "84.8"),
                       ("vLLM's share of the GPUs (90 % of 24 GB)", "21.6")):  # fmt: skip
        assert f'<th>{row}</th><td class="nowrap">{value} GB</td>' in live, (row, live)
    assert "a full batch does not" in live

    refused = client.post("/deployments/new", {**data, "max_model_len": 131072})
    assert refused.status_code == 400 and "needs about 33.2 GB" in refused.content.decode()
    assert not Deployment.objects.filter(model_name="llama-on-l4").exists()

    created = client.post("/deployments/new", data, follow=True)
    page = created.content.decode()
    assert Deployment.objects.filter(model_name="llama-on-l4").exists()
    assert "A full batch of 64 sequences of 8,192 tokens needs 68.7 GB of KV cache" in page
