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

import json

from .engine_spec import ENGINE_PORT, GUARD_MIDDLEWARE

# Inside the container: the engine port is published on the host's bind address only (`run_kwargs`).
LISTEN_HOST = "0.0.0.0"
# vLLM's default (``--max-lora-rank``, choices 1, 8, 16, 32, 64, ...): adapters of rank up to 16 load (the
# baked test adapter is rank 8); a higher rank reserves more memory per adapter slot, so it is not raised.
MAX_LORA_RANK = 16
# The environment variable that opens vLLM's ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``.
LORA_RUNTIME_ENV = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}


def vllm_command(
    *,
    model: str,
    served_model_name: str,
    max_num_seqs: int,
    tensor_parallel_size: int,
    revision: str = "",
    task: str = "generate",
    quantization: str | None = None,
    dtype: str = "auto",
    max_model_len: int | None = None,
    prefix_caching: bool = True,
    kv_cache_dtype: str = "auto",
    speculative: dict | None = None,
    lora_modules: dict[str, str] | None = None,
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

    Engine options (`deployments.models.EngineOptions`; each default adds no flag):

    - ``task="embed"`` → ``--runner pooling --convert embed`` (vLLM 0.32's pooling runner, which serves
      ``/v1/embeddings``; checked with ``--help=all`` on the CPU engine image);
    - ``quantization`` → ``--quantization <method>``; ``dtype`` other than ``auto`` → ``--dtype <dtype>``;
    - ``max_model_len`` (tokens) → ``--max-model-len <n>``;
    - ``prefix_caching=False`` → ``--no-enable-prefix-caching`` (on is vLLM's default);
    - ``kv_cache_dtype`` other than ``auto`` → ``--kv-cache-dtype <dtype>``;
    - ``speculative`` (``{"method": "ngram", "num_speculative_tokens": n, "prompt_lookup_max": m}`` or
      ``{"model": "<draft repo>", "num_speculative_tokens": n}``) → ``--speculative-config <json>``;
    - ``lora_modules`` (served name ``username/model-name:adapter`` → adapter repo) → ``--enable-lora --max-lora-rank 16`` and one ``--lora-modules <name>=<repo>`` per adapter
      (vLLM takes a repo id or path there, no revision). The container then also needs
      `LORA_RUNTIME_ENV` so adapters can be loaded and unloaded while it runs.

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
    if task == "embed":
        command += ["--runner", "pooling", "--convert", "embed"]
    if quantization:
        command += ["--quantization", quantization]
    if dtype and dtype != "auto":
        command += ["--dtype", dtype]
    if max_model_len:
        command += ["--max-model-len", str(max_model_len)]
    if not prefix_caching:
        command.append("--no-enable-prefix-caching")
    if kv_cache_dtype and kv_cache_dtype != "auto":
        command += ["--kv-cache-dtype", kv_cache_dtype]
    if speculative:
        command += ["--speculative-config", json.dumps(speculative, sort_keys=True)]
    if lora_modules:
        command += ["--enable-lora", "--max-lora-rank", str(MAX_LORA_RANK)]
        for name, repo in (lora_modules or {}).items():
            command += ["--lora-modules", f"{name}={repo}"]
    return command


def lora_served_name(full_name: str, adapter: str) -> str:
    """The served model name of a deployment's LoRA adapter: ``username/model-name:adapter`` (what the
    gateway sends as ``model`` for it)."""
    return f"{full_name}:{adapter}"
