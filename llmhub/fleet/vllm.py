"""The client for vLLM's own HTTP endpoints (health, models), used by the worker.

Endpoints per vLLM's OpenAI-compatible server: `GET /health` answers 200 once the engine is
loaded; `GET /v1/models` lists the served model name.
"""

import httpx


def engine_healthy(base_url: str, *, timeout: float = 3.0) -> bool:
    """True when `GET {base_url}/health` answers 200 within `timeout` seconds."""
    try:
        return httpx.get(f"{base_url}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def served_models(base_url: str, *, timeout: float = 3.0) -> list[str]:
    """Model ids from `GET {base_url}/v1/models` ([] when the engine does not answer)."""
    try:
        response = httpx.get(f"{base_url}/v1/models", timeout=timeout)
        response.raise_for_status()
        return [m["id"] for m in response.json().get("data", [])]
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return []
