"""The vLLM command line of an engine container (`vllm_command`), beside the client for vLLM's HTTP
endpoints (`vllm`). `containers.container_spec` gives it the deployment's facts and puts the result in
the `ContainerSpec`; everything Docker-specific (environment, volumes, network, limits) stays there.

The engine image's entrypoint is vLLM's OpenAI-compatible server (``python -m
vllm.entrypoints.openai.api_server``, the same arguments as ``vllm serve``); these arguments are appended
to it. Flags per vLLM's documentation: "Engine Arguments"
(https://docs.vllm.ai/en/latest/configuration/engine_args.html) and the ``vllm serve`` reference
(https://docs.vllm.ai/en/latest/cli/serve.html), as of vLLM 0.32.

A new engine option is one more keyword argument (with a default that adds no flag, so the command of
every existing deployment stays the same) and one more line below.
"""

from __future__ import annotations

from .engine_spec import ENGINE_PORT, GUARD_MIDDLEWARE

# Inside the container: the engine port is published on the host's bind address only (`run_kwargs`).
LISTEN_HOST = "0.0.0.0"


def vllm_command(
    *,
    model: str,
    served_model_name: str,
    max_num_seqs: int,
    tensor_parallel_size: int,
    revision: str = "",
) -> list[str]:
    """The arguments for vLLM's OpenAI server, one argv item per flag and per value (never split or
    parsed by a shell, so a value that looks like a flag stays a value).

    - ``--model <model>``: the Hugging Face repo id (the deployment's ``hf_repo``);
    - ``--revision <revision>``: branch, tag or commit of that repo; left out when empty (vLLM takes the
      default branch);
    - ``--served-model-name <served_model_name>``: the name clients send as ``model``
      (``username/model_name``) and ``GET /v1/models`` lists;
    - ``--max-num-seqs <max_num_seqs>``: the most sequences in one iteration (the deployment's max
      batch size);
    - ``--tensor-parallel-size <tensor_parallel_size>``: GPUs the model is split across (the
      deployment's GPU count; 1 on CPU hosts);
    - ``--host 0.0.0.0 --port <engine.ENGINE_PORT>``: where the server listens inside the container;
    - ``--middleware llmhub_engine_guard.EngineKeyGuard``: the key guard (`engine_guard`), always: it
      closes every path but ``GET /health`` to callers without the instance's key.

    No secret is ever an argument (a command line is visible to anyone on the host in ``ps``): the
    engine key is ``VLLM_API_KEY`` and the Hugging Face token ``HF_TOKEN``, both in the environment.
    """
    command = ["--model", model]
    if revision:
        command += ["--revision", revision]
    command += [
        "--served-model-name", served_model_name,
        "--max-num-seqs", str(max_num_seqs),
        "--tensor-parallel-size", str(tensor_parallel_size),
        "--host", LISTEN_HOST,
        "--port", str(ENGINE_PORT),
        "--middleware", GUARD_MIDDLEWARE,
    ]  # fmt: skip
    return command
