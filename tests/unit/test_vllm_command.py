"""The vLLM command line of an engine container (`vllm_command`): one flag per deployment fact, nothing
secret, and the key guard always loaded."""

from llmhub.fleet import engine, engine_spec
from llmhub.fleet.vllm_command import vllm_command


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
