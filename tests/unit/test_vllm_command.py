"""The vLLM command line of an engine container (`vllm_command`): one flag per deployment fact, nothing
secret, and the key guard always loaded."""

import json

import pytest

from llmhub.fleet import engine, engine_spec
from llmhub.fleet.containers import container_spec
from llmhub.fleet.models import Instance
from llmhub.fleet.vllm_command import vllm_command
from tests.factories import DeploymentFactory, HostFactory, UserFactory


def flags(command: list[str]) -> dict[str, str]:
    assert all(command[i].startswith("--") for i in range(0, len(command), 2))
    return dict(zip(command[::2], command[1::2], strict=True))


def test_every_deployment_fact_becomes_its_vllm_flag():
    command = vllm_command(
        model="Qwen/Qwen3-8B", revision="abc123", served_model_name="alice/chat", max_num_seqs=16,
        tensor_parallel_size=4,
    )  # fmt: skip

    assert command[:2] == ["--model", "Qwen/Qwen3-8B"]
    assert flags(command) == {
        "--model": "Qwen/Qwen3-8B",
        "--revision": "abc123",
        "--served-model-name": "alice/chat",
        "--max-num-seqs": "16",
        "--tensor-parallel-size": "4",
        "--host": "0.0.0.0",
        "--port": str(engine.ENGINE_PORT),
        "--middleware": engine_spec.GUARD_MIDDLEWARE,
    }


def test_no_revision_means_no_revision_flag():
    command = vllm_command(model="m/x", served_model_name="bob/x", max_num_seqs=1, tensor_parallel_size=1)

    assert "--revision" not in command
    assert flags(command)["--middleware"] == engine_spec.GUARD_MIDDLEWARE  # the key guard is never optional


def test_a_value_that_looks_like_a_flag_stays_one_argument():
    # Values come from users (model repo, served model name): each is exactly one argv item, never split
    # or re-parsed by a shell, so "--api-key x" in a name cannot add a flag.
    command = vllm_command(
        model="m/x --trust-remote-code", served_model_name="bob/x --api-key x", max_num_seqs=2,
        tensor_parallel_size=1,
    )  # fmt: skip

    assert command[1] == "m/x --trust-remote-code"
    assert "--trust-remote-code" not in command and "--api-key" not in command


BASE = {"model": "m/x", "served_model_name": "bob/x", "max_num_seqs": 4, "tensor_parallel_size": 1}


def extra(**options) -> list[str]:
    """The arguments `options` add to a plain command (everything after the key guard)."""
    plain = vllm_command(**BASE)
    command = vllm_command(**BASE, **options)
    assert command[: len(plain)] == plain
    return command[len(plain) :]


def test_default_engine_options_add_no_flag():
    assert extra(
        task="generate", quantization=None, dtype="auto", max_model_len=None, prefix_caching=True,
        kv_cache_dtype="auto", speculative=None, lora_modules={},
    ) == []  # fmt: skip


def test_embed_task_uses_the_pooling_runner():
    assert extra(task="embed") == ["--runner", "pooling", "--convert", "embed"]


def test_quantization_dtype_and_max_model_len():
    assert extra(quantization="awq") == ["--quantization", "awq"]
    assert extra(dtype="bfloat16") == ["--dtype", "bfloat16"]
    assert extra(max_model_len=512) == ["--max-model-len", "512"]


def test_prefix_caching_off_and_fp8_kv_cache():
    assert extra(prefix_caching=False) == ["--no-enable-prefix-caching"]
    assert extra(kv_cache_dtype="fp8") == ["--kv-cache-dtype", "fp8"]


def test_speculative_config_is_one_json_argument():
    ngram = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4}
    args = extra(speculative=ngram)
    assert args[0] == "--speculative-config" and len(args) == 2
    assert json.loads(args[1]) == ngram
    draft = {"model": "m/draft --trust-remote-code", "num_speculative_tokens": 2}
    args = extra(speculative=draft)
    assert json.loads(args[1]) == draft and "--trust-remote-code" not in args


def test_lora_adapters_are_served_under_their_full_names():
    args = extra(lora_modules={"bob/x:tiny": "llmhub/tiny-random-llama-lora", "bob/x:sql": "acme/sql-lora"})
    assert args == [
        "--enable-lora", "--max-lora-rank", "16",
        "--lora-modules", "bob/x:tiny=llmhub/tiny-random-llama-lora",
        "--lora-modules", "bob/x:sql=acme/sql-lora",
    ]  # fmt: skip


@pytest.mark.django_db
def test_the_container_gets_the_deployment_s_engine_options_and_adapters():
    user = UserFactory(username="bob")
    deployment = DeploymentFactory(
        user=user, model_name="x", task="embed", engine_options={"max_model_len": 512, "prefix_caching": False},
        lora_adapters=[{"name": "tiny", "repo": "llmhub/tiny-random-llama-lora"}],
    )  # fmt: skip
    instance = Instance.objects.create(deployment=deployment, host=HostFactory(), gpu_indexes=[])

    spec = container_spec(instance)

    args = spec.args
    assert args[args.index("--max-model-len") + 1] == "512"
    assert "--no-enable-prefix-caching" in args and args[args.index("--runner") + 1] == "pooling"
    assert args[args.index("--lora-modules") + 1] == "bob/x:tiny=llmhub/tiny-random-llama-lora"
    assert spec.environment["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"


@pytest.mark.django_db
def test_a_deployment_without_adapters_does_not_enable_lora():
    instance = Instance.objects.create(deployment=DeploymentFactory(), host=HostFactory(), gpu_indexes=[])

    spec = container_spec(instance)

    assert "--enable-lora" not in spec.args and "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in spec.environment
