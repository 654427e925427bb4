"""The client for vLLM's own HTTP endpoints (health, models, metrics, LoRA adapters), used by the worker.

Endpoints per vLLM's OpenAI-compatible server: `GET /health` answers 200 once the engine is
loaded; `GET /v1/models` lists the served model name; `GET /metrics` is Prometheus text. Every call
sends the instance's engine key as ``Authorization: Bearer <key>`` (vLLM's ``VLLM_API_KEY``; LLMHub's
guard in the engine refuses every path but /health without it).
"""

import httpx


def _headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def engine_healthy(base_url: str, *, key: str = "", timeout: float = 3.0) -> bool:
    """True when `GET {base_url}/health` answers 200 within `timeout` seconds."""
    try:
        return httpx.get(f"{base_url}/health", headers=_headers(key), timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def served_models(base_url: str, *, key: str = "", timeout: float = 3.0) -> list[str]:
    """Model ids from `GET {base_url}/v1/models` ([] when the engine does not answer or refuses the key)."""
    try:
        response = httpx.get(f"{base_url}/v1/models", headers=_headers(key), timeout=timeout)
        response.raise_for_status()
        return [m["id"] for m in response.json().get("data", [])]
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return []


def engine_load(base_url: str, *, key: str = "", timeout: float = 2.0) -> tuple[float, float] | None:
    """(requests running, requests waiting) from `GET {base_url}/metrics` (vLLM's Prometheus gauges
    `vllm:num_requests_running` and `vllm:num_requests_waiting`, summed over models), or None when the
    engine does not answer (or refuses the key)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        response = httpx.get(f"{base_url}/metrics", headers=_headers(key), timeout=timeout)
        response.raise_for_status()
    except httpx.HTTPError:
        return None
    running = waiting = 0.0
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == "vllm:num_requests_running":
                running += sample.value
            elif sample.name == "vllm:num_requests_waiting":
                waiting += sample.value
    return running, waiting


def lora_load(base_url: str, *, key: str, name: str, path: str, timeout: float = 30.0) -> bool:
    """Load a LoRA adapter into a running engine: `POST {base_url}/v1/load_lora_adapter` with
    ``{"lora_name": name, "lora_path": path}`` (`path`: a Hugging Face repo id or a local path). True when
    the engine answers 200 within `timeout` seconds. vLLM opens this endpoint only when the server runs
    with ``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` (vLLM's "LoRA Adapters" page,
    "Dynamically serving LoRA Adapters"); otherwise it answers 404 or 400: False, never an exception."""
    return _post(f"{base_url}/v1/load_lora_adapter", key, {"lora_name": name, "lora_path": path}, timeout)


def lora_unload(base_url: str, *, key: str, name: str, timeout: float = 30.0) -> bool:
    """Unload a LoRA adapter from a running engine: `POST {base_url}/v1/unload_lora_adapter` with
    ``{"lora_name": name}``. True on 200 within `timeout` seconds; False otherwise (see `lora_load`)."""
    return _post(f"{base_url}/v1/unload_lora_adapter", key, {"lora_name": name}, timeout)


def _post(url: str, key: str, body: dict, timeout: float) -> bool:
    if timeout <= 0:
        return False
    try:
        return httpx.post(url, headers=_headers(key), json=body, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False
