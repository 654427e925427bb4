"""The container an instance runs in (`container_spec`): the vLLM command line (built by `vllm_command`),
the engine key, the owner's cache, the host's engine network and the limits; `engine_spec.run_kwargs`
turns it into Docker's request."""

from __future__ import annotations

from django.conf import settings

from llmhub import crypto

from . import engine
from .models import Instance
from .vllm_command import LORA_RUNTIME_ENV, lora_served_name, vllm_command

GIB = 1024**3


def container_spec(instance: Instance) -> engine.ContainerSpec:
    """The container for `instance` (host and GPU indexes already reserved; deployment and user loaded).

    Arguments: `vllm_command` of the deployment's repo, revision, full name (the served model name), max
    batch size and GPU count, task, engine options and LoRA adapters (served as
    ``username/model-name:adapter``); it loads the key guard (`engine_guard`, copied in as `spec.files`). Environment:
    ``VLLM_API_KEY`` (the instance's key), ``HF_TOKEN`` when the deployment has one, ``PYTHONPATH`` for
    the guard, ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` when the deployment has adapters. GPU hosts get a device request for exactly the reserved indexes; CPU hosts none. The
    port is published on the host's bind address; the cache volume is the owner's; the memory limit is
    the GPU type's host memory per GPU (GB) × the GPU count, when the type says it.
    """
    deployment = instance.deployment
    host = instance.host
    options = deployment.engine
    args = vllm_command(
        model=deployment.hf_repo,
        revision=deployment.hf_revision,
        served_model_name=deployment.full_name,
        max_num_seqs=deployment.max_batch_size,
        tensor_parallel_size=deployment.num_gpus,
        task=deployment.task,
        quantization=options.quantization,
        dtype=options.dtype,
        max_model_len=options.max_model_len,
        prefix_caching=options.prefix_caching,
        kv_cache_dtype=options.kv_cache_dtype,
        speculative=options.speculative,
        lora_modules={lora_served_name(deployment.full_name, a.name): a.repo for a in deployment.adapters},
    )
    environment = {"VLLM_API_KEY": instance.engine_key, "PYTHONPATH": engine.engine_spec.GUARD_DIR}
    if deployment.adapters:
        environment.update(LORA_RUNTIME_ENV)
    hf_token = crypto.decrypt(deployment.hf_token_encrypted)
    if hf_token:
        environment["HF_TOKEN"] = hf_token
    installation = settings.CONTAINER_PREFIX
    per_gpu = host.gpu_type.host_memory_gb_per_gpu
    return engine.ContainerSpec(
        name=instance.container_name,
        image=host.engine_image,
        args=args,
        labels={
            engine.LABEL_INSTANCE: str(instance.id),
            engine.LABEL_DEPLOYMENT: deployment.deploy_id,
            engine.LABEL_INSTALLATION: installation,
            engine.LABEL_OWNER: deployment.user.username,
            engine.LABEL_OWNER_ID: str(deployment.user_id),
        },
        environment=environment,
        device_ids=[str(i) for i in instance.gpu_indexes] if host.gpu_type.uses_devices else None,
        publish_ip=host.bind_address,
        cache_volume=engine.cache_volume_name(installation, deployment.user_id),
        network=engine.network_name(installation),
        pids_limit=settings.ENGINE_PIDS_LIMIT,
        memory_limit=per_gpu * deployment.num_gpus * GIB if per_gpu else None,
        cap_add=settings.ENGINE_CAP_ADD,
        files={engine.engine_spec.GUARD_FILE: engine.engine_spec.guard_source()},
    )
