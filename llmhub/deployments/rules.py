"""Rules of a deployment shared by the deploy API (`schemas`) and the dashboard forms (`forms`): one place each.

Field shapes and ranges are declared here or in `schemas` (pydantic); rules that need the database (GPU type
offered, the largest host, the model's fit) live in `forms.DeploymentForm.clean`, and the GPU quota and
name uniqueness in `services`.
"""

from django.core.validators import RegexValidator

model_name_validator = RegexValidator(
    r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
    "Use letters, digits, '-', '_' or '.', starting with a letter or digit.",
)
hf_repo_validator = RegexValidator(
    r"^([A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*$",
    "Give a Hugging Face repo id such as 'Qwen/Qwen3-8B'.",
)

# Serving options (vLLM's names; see `fleet.vllm_command` for the command line each becomes).
QUANTIZATIONS = ("awq", "gptq", "fp8", "bitsandbytes")
DTYPES = ("auto", "bfloat16", "float16", "float32")
KV_CACHE_DTYPES = ("auto", "fp8")
MAX_MODEL_LEN = 1_048_576  # tokens; the model's own maximum is checked with its config (`forms`)
MAX_ADAPTERS = 8
ADAPTER_NAME_RE = r"^[a-z0-9-]+$"
MAX_RESPONSE_CACHE_SECONDS = 86400


def bounds_error(min_instances: int, max_instances: int) -> str | None:
    """The message when min instances exceed max instances, else None."""
    if min_instances > max_instances:
        return f"Min instances ({min_instances}) must not be more than max instances ({max_instances})."
    return None


def serving_errors(*, task: str, speculative: dict | None, adapter_names: list[str]) -> dict[str, list[str]]:
    """Rules across serving options, as {dotted body path: [messages]} (empty when all hold).

    vLLM's pooling runner (`task: embed`) serves neither LoRA adapters nor speculative decoding; adapter
    names are unique within a deployment (each is served as ``username/model-name:name``).
    """
    errors: dict[str, list[str]] = {}
    if task == "embed" and adapter_names:
        errors["lora_adapters"] = ["An embedding model (task: embed) cannot serve LoRA adapters."]
    if task == "embed" and speculative:
        errors["engine.speculative"] = ["An embedding model (task: embed) cannot use speculative decoding."]
    seen: set[str] = set()
    for i, name in enumerate(adapter_names):
        if name in seen:
            errors.setdefault(f"lora_adapters.{i}.name", []).append(f"Adapter name '{name}' is used twice.")
        seen.add(name)
    return errors
