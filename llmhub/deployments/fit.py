"""Will a model fit its GPUs? Its memory on the GPUs, estimated before anything is deployed.

What vLLM puts in GPU memory (vLLM docs, "Conserving memory" and the engine arguments
``--gpu-memory-utilization``, ``--max-model-len``, ``--kv-cache-dtype``, ``--max-lora-rank``):

- **weights**: parameters × bytes per parameter. The parameter count comes, best first, from the repo's
  safetensors metadata on the Hugging Face hub (`huggingface_hub.get_safetensors_metadata`), then from its
  `config.json` (a Llama-style decoder: embeddings V·h, twice unless tied, + per layer attention
  h·(q + 2·kv + o heads × head_dim) and a gated MLP 3·h·i, × experts for mixture-of-experts). Bytes per
  parameter: 2 at 16 bits (dtype ``auto``, ``bfloat16``, ``float16``; vLLM's ``auto`` runs float32 models
  at 16 bits), 4 at ``float32``; with ``quantization`` the linear layers take 1 byte (``fp8``) or 4 bits plus
  scales (``awq``, ``gptq``, ``bitsandbytes``: a 16-bit scale and a 4-bit zero point per group of 128
  weights, 0.52 bytes in all), while the embeddings and the LM head stay at 16 bits. A repo that is already
  quantized (``quantization_config`` in its config) is counted at its stored size.
- **KV cache** (the formula of vLLM's and every paged-attention KV cache): per token
  2 (K and V) × layers × KV heads × head dim × bytes of the KV cache dtype (``fp8``: 1, else the model's);
  one sequence holds ``max_model_len`` tokens (the engine option, else the model's
  ``max_position_embeddings``), a full batch ``max_batch_size`` sequences.
- **LoRA adapters**: vLLM keeps ``--max-loras`` (1) adapter slots on the GPU at ``--max-lora-rank``
  (16): rank × (inputs + outputs) of the 7 projections per layer, at 16 bits.

Sources: vLLM, "Conserving memory" (https://docs.vllm.ai/en/latest/configuration/conserving_memory.html) and
"Engine arguments" (https://docs.vllm.ai/en/latest/configuration/engine_args.html); the KV cache formula
2·L·H_kv·d·bytes is the one of the paged-attention paper (Kwon et al., "Efficient Memory Management for Large
Language Model Serving with PagedAttention", SOSP 2023, https://arxiv.org/abs/2309.06180) and gives vLLM's
128 KiB per token for Llama 3.1 8B; the group-128 4-bit layout is AWQ's and GPTQ's default (AutoAWQ
``q_group_size=128``; https://arxiv.org/abs/2306.00978).

vLLM uses ``--gpu-memory-utilization`` (0.9) of the GPUs' memory. `Fit.fits` is False when the weights,
adapters and one full-length sequence do not fit in it (vLLM refuses to start: "max seq len is larger than
the maximum number of tokens that can be stored in KV cache"); `Fit.batch_fits` is False when a full batch
does not (vLLM then runs fewer sequences at once and queues the rest: a warning, not a refusal).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import tempfile
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass, replace

from django.conf import settings
from django.core.cache import cache

log = logging.getLogger(__name__)

GB = 1e9
GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default share of the GPUs' memory it uses
FOUR_BIT_BYTES = 0.5 + (16 + 4) / 8 / 128  # 4-bit weights + a 16-bit scale and 4-bit zero per 128: 0.52 bytes
QUANTIZED_BYTES = {"fp8": 1.0, "awq": FOUR_BIT_BYTES, "gptq": FOUR_BIT_BYTES, "bitsandbytes": FOUR_BIT_BYTES}
LORA_SLOTS = 1  # vLLM's --max-loras default: adapters held on the GPU at once
DTYPE_BYTES = {"float32": 4, "F32": 4, "float16": 2, "F16": 2, "bfloat16": 2, "BF16": 2, "F8_E4M3": 1, "I8": 1}
CACHE_SECONDS = 3600
UNKNOWN, UNKNOWN_CACHE_SECONDS = -1.0, 300  # "size unknown" is remembered briefly, so typing stays fast
HUB_DEADLINE = 3.0  # seconds: all hub calls of one estimate together
UNREACHABLE_KEY, UNREACHABLE_SECONDS = "fit:hub-unreachable", 60  # a hub that missed the deadline is skipped
_hub_calls = ThreadPoolExecutor(max_workers=4, thread_name_prefix="llmhub-fit")


@dataclass(frozen=True)
class ModelFacts:
    """What the estimate needs to know of a model; any field may be None when it could not be read."""

    params: int | None = None  # parameters
    stored_bytes: int | None = None  # the weights as stored in the repo
    embedding_params: int | None = None  # embeddings and LM head (kept at 16 bits by quantization)
    quantized: bool = False  # the repo is already quantized (config's quantization_config)
    layers: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    max_position: int | None = None  # max_position_embeddings: the model's own context length


@dataclass(frozen=True)
class Fit:
    """The estimate, in GB (10^9 bytes). `weights_gb` None: size unknown. `available_gb` None: the GPU type's
    memory is unknown (e.g. CPU). `kv_token_bytes` or `context_len` None: KV cache not counted."""

    weights_gb: float | None
    available_gb: float | None
    kv_token_bytes: int | None = None
    context_len: int | None = None
    batch: int = 1
    adapters_gb: float = 0.0
    model_max_len: int | None = None

    @property
    def usable_gb(self) -> float | None:
        return None if not self.available_gb else self.available_gb * GPU_MEMORY_UTILIZATION

    @property
    def kv_sequence_gb(self) -> float | None:
        if self.kv_token_bytes is None or not self.context_len:
            return None
        return self.kv_token_bytes * self.context_len / GB

    @property
    def kv_batch_gb(self) -> float | None:
        return None if self.kv_sequence_gb is None else self.kv_sequence_gb * self.batch

    @property
    def needed_gb(self) -> float | None:
        """Weights, adapters and one full-length sequence's KV cache."""
        if self.weights_gb is None:
            return None
        return self.weights_gb + self.adapters_gb + (self.kv_sequence_gb or 0.0)

    @property
    def batch_needed_gb(self) -> float | None:
        """Weights, adapters and a full batch's KV cache."""
        if self.weights_gb is None or self.kv_batch_gb is None:
            return None
        return self.weights_gb + self.adapters_gb + self.kv_batch_gb

    @property
    def fits(self) -> bool | None:
        """True/False when both sizes are known, None otherwise."""
        if self.needed_gb is None or not self.usable_gb:
            return None
        return self.needed_gb <= self.usable_gb

    @property
    def batch_fits(self) -> bool | None:
        if self.batch_needed_gb is None or not self.usable_gb:
            return None
        return self.batch_needed_gb <= self.usable_gb

    @property
    def concurrent_sequences(self) -> int | None:
        """Full-length sequences the KV cache holds at once (what vLLM can run together)."""
        if not self.fits or not self.kv_sequence_gb:
            return None
        return int((self.usable_gb - self.weights_gb - self.adapters_gb) // self.kv_sequence_gb)


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


def facts_from_config(config: dict) -> ModelFacts:
    """`ModelFacts` from a transformers `config.json` dict (a multimodal model's `text_config` when present)."""
    text = config.get("text_config", config)
    params = parameter_count(config)
    h, heads, vocab = text.get("hidden_size"), text.get("num_attention_heads"), text.get("vocab_size")
    dtype = str(text.get("torch_dtype") or config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    return ModelFacts(
        params=params,
        stored_bytes=None if params is None else params * DTYPE_BYTES.get(dtype, 2),
        embedding_params=vocab * h * (1 if text.get("tie_word_embeddings") else 2) if vocab and h else None,
        quantized="quantization_config" in config or "quantization_config" in text,
        layers=text.get("num_hidden_layers"),
        kv_heads=text.get("num_key_value_heads") or heads,
        head_dim=text.get("head_dim") or (h // heads if h and heads else None),
        hidden_size=h,
        intermediate_size=text.get("intermediate_size"),
        max_position=text.get("max_position_embeddings"),
    )  # fmt: skip


def weights_bytes(facts: ModelFacts, *, quantization: str | None = None, dtype: str = "auto") -> float | None:
    """Bytes of the weights on the GPUs (see the module docstring), or None when unknown."""
    if facts.params is None or facts.quantized:
        return facts.stored_bytes
    if quantization in QUANTIZED_BYTES:
        embeddings = min(facts.embedding_params or 0, facts.params)
        return embeddings * 2 + (facts.params - embeddings) * QUANTIZED_BYTES[quantization]
    return facts.params * (4 if dtype == "float32" else 2)


def kv_token_bytes(facts: ModelFacts, *, kv_cache_dtype: str = "auto", dtype: str = "auto") -> int | None:
    """KV cache bytes per token: 2 × layers × KV heads × head dim × KV dtype bytes, or None when unknown."""
    if not (facts.layers and facts.kv_heads and facts.head_dim):
        return None
    element = 1 if kv_cache_dtype == "fp8" else 4 if dtype == "float32" else 2
    return 2 * facts.layers * facts.kv_heads * facts.head_dim * element


def lora_bytes(facts: ModelFacts) -> int:
    """Bytes of vLLM's LoRA slots on the GPU (`LORA_SLOTS` at rank MAX_LORA_RANK over the 7 projections of
    each layer, 16 bits), 0 when the config does not say the sizes."""
    from llmhub.fleet.vllm_command import MAX_LORA_RANK

    h, i, layers = facts.hidden_size, facts.intermediate_size, facts.layers
    if not (h and i and layers and facts.kv_heads and facts.head_dim):
        return 0
    kv = facts.kv_heads * facts.head_dim
    inputs_and_outputs = (h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h)  # q, k, v, o, gate, up, down
    return MAX_LORA_RANK * inputs_and_outputs * layers * 2 * LORA_SLOTS


def _from_hub(repo: str, revision: str, token: str) -> ModelFacts | None:
    """The model's facts from the hub: config.json for its shape, safetensors metadata for the exact
    parameter count and stored size. None when neither can be read."""
    config = _config(repo, revision, token)
    counted = _safetensors_counts(repo, revision, token)
    if config is None and counted is None:
        return None
    facts = facts_from_config(config) if config is not None else ModelFacts()
    if counted is not None:
        facts = replace(facts, params=counted[0], stored_bytes=counted[1])
    return facts


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


def _safetensors_counts(repo: str, revision: str, token: str) -> tuple[int, int] | None:
    """(parameters, stored bytes) from the repo's safetensors metadata, or None."""
    from huggingface_hub import get_safetensors_metadata

    try:
        meta = get_safetensors_metadata(repo, revision=revision or None, token=token or None, timeout=3)
    except Exception:  # noqa: BLE001 - offline, private, no safetensors: config.json alone
        return None
    counts = meta.parameter_count
    return sum(counts.values()), sum(count * DTYPE_BYTES.get(dtype, 2) for dtype, count in counts.items())


def token_key(token: str) -> str:
    """'anonymous' for no token, else 16 hex digits of HMAC-SHA256(SECRET_KEY, token): names the token's
    cache entries without revealing it (also not to someone who reads the cache)."""
    if not token:
        return "anonymous"
    return hmac.new(settings.SECRET_KEY.encode(), token.encode(), hashlib.sha256).hexdigest()[:16]


def model_facts(repo: str, revision: str = "", token: str = "") -> ModelFacts | None:
    """What can be read of `repo` at `revision` (`ModelFacts`), or None when nothing can.

    Cached per repo, revision and Hugging Face token, an hour when found and 5 minutes when unknown: a
    private repo's existence and size are learned only with a token that can read it. The key holds a
    keyed hash of the token (`token_key`), never the token. All hub calls of one estimate share one deadline
    of HUB_DEADLINE (3) seconds; a hub that misses it is not asked again for UNREACHABLE_SECONDS (60), and
    with HF_HUB_OFFLINE it is never asked: only the local Hugging Face cache is read.
    """
    key = f"fit:weights:{token_key(token)}:{repo}@{revision or 'main'}"
    cached = cache.get(key)
    if isinstance(cached, dict):
        return ModelFacts(**cached)
    if cached == UNKNOWN:
        return None
    facts = None
    if settings.HF_HUB_OFFLINE or cache.get(UNREACHABLE_KEY):
        config = _config(repo, revision, token, local_only=True)
        facts = facts_from_config(config) if config is not None else None
    else:
        try:
            facts = _hub_calls.submit(_from_hub, repo, revision, token).result(timeout=HUB_DEADLINE)
        except FutureTimeout:  # the calls go on in their thread until their own timeouts; nobody waits
            log.warning("the model hub did not answer within %.0f s; sizes unknown for %d s", HUB_DEADLINE,
                        UNREACHABLE_SECONDS)  # fmt: skip
            cache.set(UNREACHABLE_KEY, True, UNREACHABLE_SECONDS)
    if facts is None or facts.stored_bytes is None:
        cache.set(key, UNKNOWN, UNKNOWN_CACHE_SECONDS)
        return None
    cache.set(key, asdict(facts), CACHE_SECONDS)
    return facts


def model_fit(
    *, repo: str, revision: str, token: str, gpu_memory_gb: int, num_gpus: int, engine=None, max_batch_size: int = 1,
    adapters: int = 0,
) -> Fit:  # fmt: skip
    """The fit of `repo` on `num_gpus` GPUs of `gpu_memory_gb` each (0: memory unknown), served with `engine`
    (`models.EngineOptions`; None: the defaults), `max_batch_size` sequences at once and `adapters` LoRA
    adapters."""
    available = gpu_memory_gb * num_gpus if gpu_memory_gb else None
    facts = model_facts(repo, revision, token)
    if facts is None:
        return Fit(weights_gb=None, available_gb=available, batch=max_batch_size)
    quantization, dtype = getattr(engine, "quantization", None), getattr(engine, "dtype", "auto") or "auto"
    kv_dtype = getattr(engine, "kv_cache_dtype", "auto")
    return Fit(
        weights_gb=weights_bytes(facts, quantization=quantization, dtype=dtype) / GB,
        available_gb=available,
        kv_token_bytes=kv_token_bytes(facts, kv_cache_dtype=kv_dtype, dtype=dtype),
        context_len=getattr(engine, "max_model_len", None) or facts.max_position,
        batch=max_batch_size,
        adapters_gb=lora_bytes(facts) / GB if adapters else 0.0,
        model_max_len=facts.max_position,
    )  # fmt: skip


def fit_parts(fit: Fit) -> str:
    """The estimate's parts in words, e.g. "16.1 GB of weights + 1.1 GB of KV cache for one 8,192-token
    sequence + 0.1 GB of LoRA slots"."""
    parts = [f"{fit.weights_gb:.1f} GB of weights"]
    if fit.kv_sequence_gb is not None:
        parts.append(f"{fit.kv_sequence_gb:.1f} GB of KV cache for one {fit.context_len:,}-token sequence")
    if fit.adapters_gb:
        parts.append(f"{fit.adapters_gb:.1f} GB of LoRA slots")
    return " + ".join(parts)
