"""Validation of a new deployment, shared by the dashboard form and the deploy API."""

from django import forms
from django.core.validators import RegexValidator

from llmhub.fleet.selectors import gpu_types_offered, largest_host_gpus

from .fit import Fit, model_fit

model_name_validator = RegexValidator(
    r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
    "Use letters, digits, '-', '_' or '.', starting with a letter or digit.",
)
hf_repo_validator = RegexValidator(
    r"^([A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*$",
    "Give a Hugging Face repo id such as 'Qwen/Qwen3-8B'.",
)


class GpuTypeField(forms.ModelChoiceField):
    """A GPU type by name, limited to the types some host offers."""

    def __init__(self, **kwargs):
        super().__init__(queryset=gpu_types_offered(), to_field_name="name", **kwargs)

    def to_python(self, value):
        try:
            return super().to_python(value)
        except forms.ValidationError as exc:
            offered = ", ".join(self.queryset.values_list("name", flat=True)) or "none yet"
            raise forms.ValidationError(
                f"GPU type '{value}' is not offered by any host. Offered: {offered}.", code="invalid_choice"
            ) from exc


def bounds_error(min_instances: int, max_instances: int) -> str | None:
    """The message when min instances exceed max instances, else None."""
    if min_instances > max_instances:
        return f"Min instances ({min_instances}) must not be more than max instances ({max_instances})."
    return None


class ScaleForm(forms.Form):
    """Min and max instances: the part of a deployment its owner may change once it is deployed."""

    min_instances = forms.IntegerField(
        min_value=0, max_value=64, initial=1, help_text="Kept running even when idle (0: scale to zero)."
    )
    max_instances = forms.IntegerField(min_value=1, max_value=64, initial=1, help_text="Upper bound under load.")
    cooldown_seconds = forms.IntegerField(
        label="Cooldown (s)", min_value=0, max_value=86400, required=False, initial=300,
        help_text="Idle seconds before scaling down (and to zero when min is 0).",
    )  # fmt: skip

    def clean(self):
        cleaned = super().clean()
        low, high = cleaned.get("min_instances"), cleaned.get("max_instances")
        if low is not None and high is not None and (error := bounds_error(low, high)):
            self.add_error("min_instances", error)
        return cleaned


class DeploymentForm(ScaleForm):
    field_order = [
        "model_name", "gpu", "num_gpus", "max_batch_size", "hf_repo", "hf_revision",
        "min_instances", "max_instances", "cooldown_seconds", "hf_token",
    ]  # fmt: skip

    model_name = forms.CharField(
        max_length=64, validators=[model_name_validator], help_text="Served as username/model-name."
    )
    gpu = GpuTypeField(label="GPU type", empty_label=None)
    num_gpus = forms.IntegerField(label="Number of GPUs", min_value=1, max_value=8, initial=1)
    max_batch_size = forms.IntegerField(
        min_value=1, max_value=256, initial=32, help_text="Concurrent sequences per instance."
    )
    hf_repo = forms.CharField(label="Hugging Face repo", max_length=200, validators=[hf_repo_validator])
    hf_revision = forms.CharField(
        label="Revision", max_length=100, required=False, help_text="Branch, tag or commit (default: main)."
    )
    hf_token = forms.CharField(
        label="Hugging Face token",
        max_length=200,
        required=False,
        widget=forms.PasswordInput(render_value=False),
        help_text="For private or gated repos. Stored encrypted, never shown again.",
    )

    fit: Fit | None = None

    def clean(self):
        cleaned = super().clean()
        gpu, num_gpus, repo = cleaned.get("gpu"), cleaned.get("num_gpus"), cleaned.get("hf_repo")
        if gpu is not None and num_gpus and (largest := largest_host_gpus(gpu)) is not None and num_gpus > largest:
            self.add_error(
                "num_gpus",
                f"No {gpu.name} host has {num_gpus} GPUs: the largest has {largest}, so an instance can use at "
                f"most {largest} {gpu.name} GPUs. Use {largest} or fewer, or another GPU type.",
            )
            return cleaned
        if gpu is not None and num_gpus and repo:
            self.fit = model_fit(
                repo=repo, revision=cleaned.get("hf_revision", ""), token=cleaned.get("hf_token", ""),
                gpu_memory_gb=gpu.memory_gb, num_gpus=num_gpus,
            )  # fmt: skip
            if self.fit.fits is False:
                self.add_error(
                    "num_gpus",
                    f"{repo} needs about {self.fit.needed_gb:.0f} GB ({self.fit.weights_gb:.0f} GB of weights and "
                    f"room for the KV cache) but {num_gpus} × {gpu.name} have {self.fit.available_gb:.0f} GB. "
                    "Use more GPUs or a GPU type with more memory.",
                )
        return cleaned

    @property
    def fit_warning(self) -> str | None:
        """A note when the model's size could not be read (the deployment is accepted anyway)."""
        if self.fit is not None and self.fit.weights_gb is None:
            return (
                f"The size of {self.cleaned_data['hf_repo']} could not be read (no config.json or safetensors "
                "metadata reachable), so LLMHub could not check that it fits the GPUs."
            )
        return None

    def service_kwargs(self) -> dict:
        """The cleaned data as keyword arguments of `services.deployment_create` (after `is_valid()`)."""
        data = dict(self.cleaned_data)
        data["gpu_type"] = data.pop("gpu")
        return data
