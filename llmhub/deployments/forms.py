"""Validation of a new deployment, shared by the dashboard form and the deploy API."""

from django import forms
from pydantic import ValidationError as PydanticValidationError

from llmhub.fleet.selectors import gpu_types_offered, largest_host_gpus

from .fit import Fit, fit_parts, model_fit
from .models import Deployment, EngineOptions, LoraAdapter
from .rules import (
    DTYPES,
    KV_CACHE_DTYPES,
    QUANTIZATIONS,
    bounds_error,
    hf_repo_validator,
    model_name_validator,
    serving_errors,
)  # fmt: skip
from .schemas import DeployIn, ServingIn, SettingsIn, SettingsUpdate, field_errors

__all__ = ["AdaptersForm", "DeploymentForm", "ScaleForm", "bounds_error", "hf_repo_validator", "model_name_validator"]


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


def add_schema_errors(form: forms.Form, errors: dict[str, list[str]], fields: dict[str, str]) -> None:
    """Put {dotted body path: [messages]} (the deploy API's rules, `schemas`) on the form's fields: a path's
    field is `fields[path]` or its longest known prefix; list items are named ("Adapter 2: ...")."""
    for path, messages in errors.items():
        prefix = path
        while prefix and prefix not in fields:
            prefix = prefix.rpartition(".")[0]
        field = fields.get(prefix)
        if field is None or field not in form.fields:
            field = None
        rest = path[len(prefix) + 1 :] if prefix else path
        note = ""
        if rest:
            index, _, sub = rest.partition(".")
            note = f"Adapter {int(index) + 1}{f' ({sub})' if sub else ''}: " if index.isdigit() else f"{rest}: "
        for text in messages:
            form.add_error(field, note + text)


class ScaleForm(forms.Form):
    """The settings of a deployment its owner may change at any time: scale, routing, response cache,
    request logging, idle guard. Rules of the newer settings are the deploy API's (`schemas.SettingsIn`)."""

    SCHEMA_FIELDS = ("routing", "response_cache_seconds", "request_logging", "idle_alert_hours", "idle_stop_hours")
    # Fields a post may leave out (a client of an older page): absent keeps the initial value, while an empty
    # value means off. Checkboxes are not among them (an unchecked box sends nothing).
    DEFAULTED = ("routing", "response_cache_seconds", "idle_alert_hours", "idle_stop_hours")

    def __init__(self, data=None, *args, **kwargs):
        if data is not None:
            data = data.copy()
            initial = kwargs.get("initial") or {}
            for name in self.DEFAULTED:
                if name not in data:
                    value = initial.get(name, self.base_fields[name].initial)
                    data[name] = "" if value is None else value
        super().__init__(data, *args, **kwargs)

    min_instances = forms.IntegerField(
        min_value=0, max_value=64, initial=1, help_text="Kept running even when idle (0: scale to zero)."
    )
    max_instances = forms.IntegerField(min_value=1, max_value=64, initial=1, help_text="Upper bound under load.")
    cooldown_seconds = forms.IntegerField(
        label="Cooldown (s)", min_value=0, max_value=86400, required=False, initial=300,
        help_text="Idle seconds before scaling down (and to zero when min is 0).",
    )  # fmt: skip
    routing = forms.ChoiceField(
        choices=Deployment.Routing.choices, initial=Deployment.Routing.PREFIX,
        help_text="prefix: requests sharing a prompt prefix go to the instance that holds its KV cache.",
    )  # fmt: skip
    response_cache_seconds = forms.IntegerField(
        label="Response cache (s)", required=False,
        help_text="Identical deterministic requests (temperature 0) answered from a cache this long. Empty: off.",
    )  # fmt: skip
    request_logging = forms.BooleanField(
        required=False, initial=False,
        help_text="Off by default. When on, prompts and responses are kept with their token usage (for "
        "LLMHUB_REQUEST_LOG_DAYS, 7 days by default), visible only to you on this page.",
    )  # fmt: skip
    idle_alert_hours = forms.FloatField(
        label="Idle alert (hours)", required=False, initial=2,
        help_text="Alert when instances run this long without a request. Empty: no alert.",
    )  # fmt: skip
    idle_stop_hours = forms.FloatField(
        label="Idle stop (hours)", required=False,
        help_text="Scale to zero after this long without a request. Empty: never.",
    )  # fmt: skip

    def clean(self):
        cleaned = super().clean()
        low, high = cleaned.get("min_instances"), cleaned.get("max_instances")
        if low is not None and high is not None and (error := bounds_error(low, high)):
            self.add_error("min_instances", error)
        given = {f: cleaned[f] for f in self.SCHEMA_FIELDS if f in cleaned}
        try:
            SettingsUpdate.model_validate(given)
        except PydanticValidationError as exc:
            add_schema_errors(self, field_errors(exc, SettingsIn), {f: f for f in self.SCHEMA_FIELDS})
        return cleaned

    def settings_kwargs(self) -> dict:
        """The cleaned settings as keyword arguments of `services.deployment_update` (after `is_valid()`)."""
        return {f: self.cleaned_data.get(f) for f in self.base_fields if f in ScaleForm.base_fields}


class AdaptersField(forms.CharField):
    """LoRA adapters as text, one per line ``name repo [revision]``; cleaned to [{"name", "repo", "revision"}]
    (the deploy API's `lora_adapters` items, checked with its rules by the form)."""

    widget = forms.Textarea(attrs={"rows": 3})

    def __init__(self, **kwargs):
        kwargs.setdefault("label", "LoRA adapters")
        kwargs.setdefault(
            "help_text", "One per line: name repo [revision]. Served as username/model-name:name (at most 8)."
        )
        super().__init__(required=False, **kwargs)

    def clean(self, value) -> list[dict]:
        adapters = []
        for number, line in enumerate((super().clean(value) or "").splitlines(), start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) not in (2, 3):
                raise forms.ValidationError(f"Line {number}: give 'name repo' or 'name repo revision'.")
            adapters.append({"name": parts[0], "repo": parts[1], "revision": parts[2] if len(parts) == 3 else None})
        return adapters


def adapters_text(adapters) -> str:
    """LoRA adapters (`LoraAdapter`s) as the form's text, one ``name repo [revision]`` a line."""
    return "\n".join(" ".join(filter(None, (a.name, a.repo, a.revision))) for a in adapters)


class AdaptersForm(forms.Form):
    """The LoRA adapters of a running deployment (its page): the deploy API's rules for `lora_adapters`.
    `deployment` gives the task (an embedding model serves no adapters)."""

    lora_adapters = AdaptersField()

    def __init__(self, *args, deployment: Deployment, **kwargs):
        super().__init__(*args, **kwargs)
        self.deployment = deployment
        self.adapters: tuple[LoraAdapter, ...] = ()

    def clean(self):
        cleaned = super().clean()
        if "lora_adapters" not in cleaned:
            return cleaned
        try:
            serving = ServingIn.model_validate(
                {"task": self.deployment.task, "lora_adapters": cleaned["lora_adapters"]}
            )
        except PydanticValidationError as exc:
            add_schema_errors(self, field_errors(exc, DeployIn), {"lora_adapters": "lora_adapters"})
            return cleaned
        names = [a.name for a in serving.lora_adapters]
        add_schema_errors(
            self, serving_errors(task=self.deployment.task, speculative=None, adapter_names=names),
            {"lora_adapters": "lora_adapters"},
        )  # fmt: skip
        self.adapters = tuple(LoraAdapter(a.name, a.repo, a.revision or "") for a in serving.lora_adapters)
        return cleaned


class DeploymentForm(ScaleForm):
    field_order = [
        "model_name", "gpu", "num_gpus", "max_batch_size", "hf_repo", "hf_revision",
        "min_instances", "max_instances", "cooldown_seconds", "hf_token",
    ]  # fmt: skip
    # The "Engine options" section of the create page (collapsed, defaults filled in): form field → body path.
    DEFAULTED = ScaleForm.DEFAULTED + (
        "task", "quantization", "dtype", "max_model_len", "prefix_caching", "kv_cache_dtype", "speculative",
        "speculative_model", "num_speculative_tokens", "lora_adapters",
    )  # fmt: skip
    ENGINE_FIELDS = {
        "task": "task", "quantization": "engine.quantization", "dtype": "engine.dtype",
        "max_model_len": "engine.max_model_len", "prefix_caching": "engine.prefix_caching",
        "kv_cache_dtype": "engine.kv_cache_dtype", "speculative": "engine.speculative.method",
        "speculative_model": "engine.speculative.model",
        "num_speculative_tokens": "engine.speculative.num_speculative_tokens", "lora_adapters": "lora_adapters",
    }  # fmt: skip

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

    task = forms.ChoiceField(
        choices=[("generate", "generate (chat and completions)"), ("embed", "embed (embeddings)")], initial="generate"
    )
    quantization = forms.ChoiceField(
        choices=[("", "none")] + [(q, q) for q in QUANTIZATIONS], required=False,
        help_text="Only for checkpoints made for it (e.g. an AWQ repo for awq); fp8 and bitsandbytes quantize on load.",
    )  # fmt: skip
    dtype = forms.ChoiceField(choices=[(d, d) for d in DTYPES], initial="auto")
    max_model_len = forms.IntegerField(
        label="Max model length", required=False, min_value=1,
        help_text="Tokens per sequence (prompt and answer). Empty: the model's own maximum.",
    )  # fmt: skip
    prefix_caching = forms.BooleanField(
        required=False, initial=True, widget=forms.Select(choices=[(True, "on"), (False, "off")]),
        help_text="Reuse the KV cache of prompts that share a prefix.",
    )  # fmt: skip
    kv_cache_dtype = forms.ChoiceField(
        label="KV cache dtype", choices=[(d, d) for d in KV_CACHE_DTYPES], initial="auto"
    )
    speculative = forms.ChoiceField(
        label="Speculative decoding", required=False,
        choices=[("", "off"), ("ngram", "n-gram (prompt lookup)"), ("draft", "draft model")],
    )  # fmt: skip
    speculative_model = forms.CharField(label="Draft model repo", required=False, max_length=200)
    num_speculative_tokens = forms.IntegerField(label="Speculative tokens", required=False, initial=3)

    lora_adapters = AdaptersField()

    fit: Fit | None = None
    engine: EngineOptions = EngineOptions()
    adapters: tuple[LoraAdapter, ...] = ()

    def main_fields(self) -> list:
        """The bound fields shown first on the create page (all but the engine options)."""
        return [self[name] for name in self.fields if name not in self.ENGINE_FIELDS]

    def engine_fields(self) -> list:
        """The bound fields of the collapsed "Engine options" section."""
        return [self[name] for name in self.fields if name in self.ENGINE_FIELDS]

    @property
    def engine_errors(self) -> bool:
        """Whether an engine option has an error (the section is then shown open)."""
        return self.is_bound and any(name in self.errors for name in self.ENGINE_FIELDS)

    def _clean_serving(self, cleaned: dict) -> None:
        """Task, engine options and adapters by the deploy API's rules (`schemas`, `rules.serving_errors`);
        sets `self.engine` and `self.adapters`."""
        kind = cleaned.get("speculative")
        speculative = None
        if kind:
            speculative = {"num_speculative_tokens": cleaned.get("num_speculative_tokens")}
            speculative["method" if kind == "ngram" else "model"] = (
                "ngram" if kind == "ngram" else cleaned.get("speculative_model")
            )
        body = {
            "task": cleaned.get("task") or "generate",
            "engine": {
                "quantization": cleaned.get("quantization") or None, "dtype": cleaned.get("dtype") or "auto",
                "max_model_len": cleaned.get("max_model_len"), "prefix_caching": bool(cleaned.get("prefix_caching")),
                "kv_cache_dtype": cleaned.get("kv_cache_dtype") or "auto", "speculative": speculative,
            },
            "lora_adapters": cleaned.get("lora_adapters") or [],
        }  # fmt: skip
        paths = {path: field for field, path in self.ENGINE_FIELDS.items()}
        paths["engine.speculative"] = "speculative"
        try:
            serving = ServingIn.model_validate(body)
        except PydanticValidationError as exc:
            add_schema_errors(self, field_errors(exc, DeployIn), paths)
            return
        task, engine, adapters = serving.task, serving.engine, serving.lora_adapters
        errors = serving_errors(
            task=task, speculative=body["engine"]["speculative"], adapter_names=[a.name for a in adapters]
        )
        add_schema_errors(self, errors, paths)
        spec = engine.speculative.model_dump(exclude_none=True) if engine.speculative else None
        self.engine = EngineOptions(**{**engine.model_dump(), "speculative": spec})
        self.adapters = tuple(LoraAdapter(a.name, a.repo, a.revision or "") for a in adapters)

    def clean(self):
        cleaned = super().clean()
        self._clean_serving(cleaned)
        gpu, num_gpus, repo = cleaned.get("gpu"), cleaned.get("num_gpus"), cleaned.get("hf_repo")
        if gpu is not None and num_gpus and (largest := largest_host_gpus(gpu)) is not None and num_gpus > largest:
            self.add_error(
                "num_gpus",
                f"No {gpu.name} host has {num_gpus} GPUs: the largest has {largest}, so an instance can use at "
                f"most {largest} {gpu.name} GPUs. Use {largest} or fewer, or another GPU type.",
            )
            return cleaned
        if gpu is not None and num_gpus and repo:
            self._check_fit(cleaned, repo, gpu, num_gpus)
        return cleaned

    def _check_fit(self, cleaned: dict, repo: str, gpu, num_gpus: int) -> None:
        """The model's memory on the GPUs with the chosen engine options, batch and adapters (`fit`): an error
        when one full-length sequence does not fit (vLLM would not start) or the context length is past the
        model's own; `fit_warning` when a full batch does not fit."""
        self.fit = fit = model_fit(
            repo=repo, revision=cleaned.get("hf_revision", ""), token=cleaned.get("hf_token", ""),
            gpu_memory_gb=gpu.memory_gb, num_gpus=num_gpus, engine=self.engine,
            max_batch_size=cleaned.get("max_batch_size") or 1, adapters=len(self.adapters),
        )  # fmt: skip
        asked = self.engine.max_model_len
        if asked and fit.model_max_len and asked > fit.model_max_len:
            self.add_error("max_model_len", f"{repo} handles at most {fit.model_max_len:,} tokens per sequence (its "
                           f"max_position_embeddings); ask for {fit.model_max_len:,} or fewer.")  # fmt: skip
            return
        if fit.fits is False:
            self.add_error(
                "num_gpus",
                f"{repo} needs about {fit.needed_gb:.1f} GB on the GPUs ({fit_parts(fit)}) but {num_gpus} × "
                f"{gpu.name} have {fit.usable_gb:.1f} GB for vLLM (90 % of {fit.available_gb:.0f} GB). Use more "
                "GPUs or a GPU type with more memory, a shorter engine max_model_len, or quantization.",
            )  # fmt: skip

    @property
    def fit_warning(self) -> str | None:
        """A note when the model's size could not be read, or when a full batch does not fit (the deployment
        is accepted either way)."""
        fit = self.fit
        if fit is not None and fit.weights_gb is None:
            return (
                f"The size of {self.cleaned_data['hf_repo']} could not be read (no config.json or safetensors "
                "metadata reachable), so LLMHub could not check that it fits the GPUs."
            )
        if fit is not None and fit.fits and fit.batch_fits is False:
            return (
                f"A full batch of {fit.batch} sequences of {fit.context_len:,} tokens needs {fit.kv_batch_gb:.1f} GB "
                f"of KV cache: {fit.batch_needed_gb:.1f} GB in all with the weights, more than the "
                f"{fit.usable_gb:.1f} GB vLLM has, so it will run about {fit.concurrent_sequences} such sequences "
                "at once and queue the rest. Lower max_batch_size or max_model_len, store the KV cache in fp8 "
                "(kv_cache_dtype), quantize the weights (quantization) to leave more room for it, or use more GPUs."
            )  # fmt: skip
        return None

    def service_kwargs(self) -> dict:
        """The cleaned data as keyword arguments of `services.deployment_create` (after `is_valid()`)."""
        data = {f: self.cleaned_data.get(f) for f in self.base_fields if f not in self.ENGINE_FIELDS}
        data["gpu_type"] = data.pop("gpu")
        data.update(task=self.cleaned_data.get("task") or "generate", engine=self.engine, lora_adapters=self.adapters)
        return data
