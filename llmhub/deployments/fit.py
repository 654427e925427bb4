"""Will a model fit its GPUs? The weights' memory, estimated before anything is deployed.

Sources, best first: the repo's safetensors metadata on the Hugging Face hub (exact parameter
counts per dtype, `huggingface_hub.get_safetensors_metadata`), then its `config.json` (from the
local Hugging Face cache, else the hub) with the parameter count of a Llama-style decoder:
embeddings V·h (twice unless tied) + per layer attention h·(q + 2·kv + o heads × head_dim) and a
gated MLP 3·h·i (× experts for mixture-of-experts). The weights must leave at least
`KV_CACHE_SHARE` of the GPUs' memory free for vLLM's KV cache and activations.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import tempfile
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from django.conf import settings
from django.core.cache import cache

log = logging.getLogger(__name__)

GB = 1e9
KV_CACHE_SHARE = 0.2  # of num_gpus × GPU memory, kept for the KV cache and activations
DTYPE_BYTES = {"float32": 4, "F32": 4, "float16": 2, "F16": 2, "bfloat16": 2, "BF16": 2, "F8_E4M3": 1, "I8": 1}
CACHE_SECONDS = 3600
UNKNOWN, UNKNOWN_CACHE_SECONDS = -1.0, 300  # "size unknown" is remembered briefly, so typing stays fast
HUB_DEADLINE = 3.0  # seconds: all hub calls of one estimate together
UNREACHABLE_KEY, UNREACHABLE_SECONDS = "fit:hub-unreachable", 60  # a hub that missed the deadline is skipped
_hub_calls = ThreadPoolExecutor(max_workers=4, thread_name_prefix="llmhub-fit")


@dataclass(frozen=True)
class Fit:
    """`weights_gb` None: size unknown. `available_gb` None: the GPU type's memory is unknown (e.g. CPU)."""

    weights_gb: float | None
    available_gb: float | None

    @property
    def needed_gb(self) -> float | None:
        return None if self.weights_gb is None else self.weights_gb / (1 - KV_CACHE_SHARE)

    @property
    def fits(self) -> bool | None:
        """True/False when both sizes are known, None otherwise."""
        if self.needed_gb is None or not self.available_gb:
            return None
        return self.needed_gb <= self.available_gb


def parameter_count(config: dict) -> int | None:
    """Parameters of a Llama-style decoder described by a transformers `config.json` dict, or None."""
    config = config.get("text_config", config)
    try:
        h, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
        heads = config["num_attention_heads"]
    except KeyError:
        return None
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or h // heads
    attention = h * head_dim * (2 * heads + 2 * kv_heads)
    experts = config.get("num_local_experts") or config.get("num_experts") or config.get("n_routed_experts") or 1
    intermediate = (config.get("moe_intermediate_size") if experts > 1 else None) or config.get(
        "intermediate_size", 4 * h
    )
    mlp = 3 * h * intermediate * experts
    embeddings = vocab * h * (1 if config.get("tie_word_embeddings") else 2)
    return layers * (attention + mlp) + embeddings


def weights_bytes_from_config(config: dict) -> int | None:
    """Bytes of the weights at the config's `torch_dtype` (2 bytes when unstated)."""
    params = parameter_count(config)
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    return None if params is None else params * DTYPE_BYTES.get(dtype, 2)


def _from_hub(repo: str, revision: str, token: str) -> int | None:
    """Bytes of the weights from the hub (safetensors metadata, else config.json), or None."""
    size = _safetensors_bytes(repo, revision, token)
    if size is None and (config := _config(repo, revision, token)) is not None:
        size = weights_bytes_from_config(config)
    return size


def _config(repo: str, revision: str, token: str, *, local_only: bool = False) -> dict | None:
    """The repo's config.json: from the local Hugging Face cache, else downloaded. The local cache is shared
    by every user's estimates, so only what anyone may read goes into it: a download made with a token
    (perhaps of a private repo) goes to a temporary directory, removed at once."""
    import huggingface_hub

    def download(cache_dir, local_only: bool) -> dict | None:
        try:
            path = huggingface_hub.hf_hub_download(
                repo, "config.json", revision=revision or None, token=token or None,
                cache_dir=cache_dir, local_files_only=local_only, etag_timeout=3,
            )  # fmt: skip
        except Exception:  # noqa: BLE001 - any hub or network failure means "unknown"
            return None
        with open(path) as f:
            return json.load(f)

    if (config := download(settings.HF_CACHE_DIR, True)) is not None or local_only:
        return config
    if not token:
        return config if config is not None else download(settings.HF_CACHE_DIR, False)
    with tempfile.TemporaryDirectory(prefix="llmhub-fit-") as private:
        return download(private, False)


def _safetensors_bytes(repo: str, revision: str, token: str) -> int | None:
    from huggingface_hub import get_safetensors_metadata

    try:
        meta = get_safetensors_metadata(repo, revision=revision or None, token=token or None, timeout=3)
    except Exception:  # noqa: BLE001 - offline, private, no safetensors: fall back to config.json
        return None
    return sum(count * DTYPE_BYTES.get(dtype, 2) for dtype, count in meta.parameter_count.items())


def token_key(token: str) -> str:
    """'anonymous' for no token, else 16 hex digits of HMAC-SHA256(SECRET_KEY, token): names the token's
    cache entries without revealing it (also not to someone who reads the cache)."""
    if not token:
        return "anonymous"
    return hmac.new(settings.SECRET_KEY.encode(), token.encode(), hashlib.sha256).hexdigest()[:16]


def weights_gb(repo: str, revision: str = "", token: str = "") -> float | None:
    """Estimated GB (10^9 bytes) of the weights of `repo` at `revision`, or None when unknown.

    Cached per repo, revision and Hugging Face token, an hour when found and 5 minutes when unknown: a
    private repo's existence and size are learned only with a token that can read it. The key holds a
    keyed hash of the token (`token_key`), never the token. All hub calls of one estimate share one deadline
    of HUB_DEADLINE (3) seconds; a hub that misses it is not asked again for UNREACHABLE_SECONDS (60), and
    with HF_HUB_OFFLINE it is never asked: only the local Hugging Face cache is read.
    """
    key = f"fit:weights:{token_key(token)}:{repo}@{revision or 'main'}"
    cached = cache.get(key)
    if cached is not None:
        return cached if cached >= 0 else None
    size = None
    if settings.HF_HUB_OFFLINE or cache.get(UNREACHABLE_KEY):
        config = _config(repo, revision, token, local_only=True)
        size = weights_bytes_from_config(config) if config is not None else None
    else:
        try:
            size = _hub_calls.submit(_from_hub, repo, revision, token).result(timeout=HUB_DEADLINE)
        except FutureTimeout:  # the calls go on in their thread until their own timeouts; nobody waits
            log.warning("the model hub did not answer within %.0f s; sizes unknown for %d s", HUB_DEADLINE,
                        UNREACHABLE_SECONDS)  # fmt: skip
            cache.set(UNREACHABLE_KEY, True, UNREACHABLE_SECONDS)
    if size is None:
        cache.set(key, UNKNOWN, UNKNOWN_CACHE_SECONDS)
        return None
    cache.set(key, size / GB, CACHE_SECONDS)
    return size / GB


def model_fit(*, repo: str, revision: str, token: str, gpu_memory_gb: int, num_gpus: int) -> Fit:
    """The fit of `repo` on `num_gpus` GPUs of `gpu_memory_gb` each (0: memory unknown)."""
    available = gpu_memory_gb * num_gpus if gpu_memory_gb else None
    return Fit(weights_gb=weights_gb(repo, revision, token), available_gb=available)
