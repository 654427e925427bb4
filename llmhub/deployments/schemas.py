"""The deploy API's request and response bodies, declared once (pydantic): they validate requests, describe
the OpenAPI document (`GET /deploy/openapi.json`) and hold the serving-option rules the dashboard form uses too.

Shapes follow DeepInfra's deploy API (`model_name`, `gpu`, `num_gpus`, `max_batch_size`, `hf`, `settings`)
plus LLMHub's serving options (`task`, `engine`, `lora_adapters`, more `settings`). Field errors are keyed by
dotted body paths (`settings.min_instances`, `engine.quantization`, `lora_adapters.0.name`): `field_errors`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic import ValidationError as PydanticValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from .rules import (
    ADAPTER_NAME_RE,
    DTYPES,
    KV_CACHE_DTYPES,
    MAX_ADAPTERS,
    MAX_MODEL_LEN,
    MAX_RESPONSE_CACHE_SECONDS,
    QUANTIZATIONS,
    hf_repo_validator,
    model_name_validator,
)


def _json_number(error_type: str):
    """Refuse what JSON Schema's "integer"/"number" do not allow but pydantic's lax mode would: strings and
    booleans ("2", true). Whole floats (2.0) are integers in JSON Schema and are accepted."""

    def check(value):
        if isinstance(value, (str, bool)):
            raise PydanticCustomError(error_type, MESSAGES[error_type])
        return value

    return BeforeValidator(check)


def Int(ge: int, le: int):  # noqa: N802 - a type
    """A whole number in ge..le (JSON Schema's minimum/maximum in the document)."""
    return Annotated[int, Field(ge=ge, le=le), _json_number("int_type")]

Str = Annotated[str, Strict()]
Bool = Annotated[bool, Strict()]
Hours = Annotated[float, Field(gt=0, le=24 * 365), _json_number("float_type")]


RepoId = Annotated[
    Str,
    Field(max_length=200, pattern=hf_repo_validator.regex.pattern, examples=["Qwen/Qwen3-8B"]),
]


# --- Request bodies ---------------------------------------------------------------------------------------


class Body(BaseModel):
    """A request object: unknown fields are refused by name."""

    model_config = ConfigDict(extra="forbid", regex_engine="python-re")


class HfIn(Body):
    repo: RepoId
    revision: Annotated[Str, Field(max_length=100)] | None = Field(None, description="Branch, tag or commit.")
    token: Annotated[Str, Field(max_length=200)] | None = Field(
        None, description="For private or gated repos; stored encrypted, never shown back."
    )


class SettingsIn(Body):
    min_instances: Int(0, 64)
    max_instances: Int(1, 64)
    cooldown_seconds: Int(0, 86400) | None = Field(
        None, description="Idle seconds before scaling down (default 300)."
    )
    routing: Literal["prefix", "least_outstanding"] = Field(
        "prefix", description="prefix: requests sharing a prompt prefix go to the instance that holds it."
    )
    response_cache_seconds: Int(1, MAX_RESPONSE_CACHE_SECONDS) | None = Field(
        None, description="Deterministic answers (temperature 0) cached this long; null: off."
    )
    request_logging: Bool = Field(False, description="Keep prompts and responses with usage (off by default).")
    idle_alert_hours: Hours | None = Field(2.0, description="Alert after this long running idle; null: off.")
    idle_stop_hours: Hours | None = Field(None, description="Scale to zero after this long idle; null: never.")


class SpeculativeIn(Body):
    """Speculative decoding: n-gram prompt lookup (`method: ngram`) or a draft model (`model: <repo>`)."""

    method: Literal["ngram"] | None = None
    model: RepoId | None = None
    num_speculative_tokens: Int(1, 8)

    @model_validator(mode="after")
    def one_kind(self):
        if (self.method is None) == (self.model is None):
            raise PydanticCustomError(
                "speculative_kind", 'Give either "method": "ngram" or "model": "<draft model repo>", not both.'
            )
        return self


class EngineIn(Body):
    """How the engine serves the model; fixed once deployed."""

    quantization: Literal[QUANTIZATIONS] | None = None  # type: ignore[valid-type]
    dtype: Literal[DTYPES] = "auto"  # type: ignore[valid-type]
    max_model_len: Int(1, MAX_MODEL_LEN) | None = Field(
        None, description="Tokens per sequence (prompt + answer); null: the model's own maximum."
    )
    prefix_caching: Bool = True
    kv_cache_dtype: Literal[KV_CACHE_DTYPES] = "auto"  # type: ignore[valid-type]
    speculative: SpeculativeIn | None = None


class LoraAdapterIn(Body):
    name: Annotated[Str, Field(min_length=1, max_length=64, pattern=ADAPTER_NAME_RE)] = Field(
        description="Served as username/model-name:name."
    )
    repo: RepoId
    revision: Annotated[Str, Field(max_length=100)] | None = Field(
        None, description="Only the repo's default branch (null, \"\" or \"main\"): vLLM loads adapters by repo id."
    )

    @field_validator("revision")
    @classmethod
    def default_branch_only(cls, revision):
        """vLLM's ``--lora-modules`` and ``/v1/load_lora_adapter`` take a repo id or a path, never a revision: an
        adapter pinned to another revision would be served from the default branch without a word."""
        if revision not in (None, "", "main"):
            raise PydanticCustomError(
                "adapter_revision",
                "An adapter is served from its repo's default branch (vLLM loads adapters by repo id, without a "
                "revision), so '{revision}' cannot be pinned. Leave revision out, or publish that revision as a "
                "repo of its own.",
                {"revision": revision},
            )
        return revision


Adapters = Annotated[list[LoraAdapterIn], Field(max_length=MAX_ADAPTERS)]


class ServingIn(Body):
    """How the model is served: the task, engine options and LoRA adapters (the dashboard form checks these too)."""

    task: Literal["generate", "embed"] = Field("generate", description="embed: vLLM's pooling runner (embeddings).")
    engine: EngineIn = Field(default_factory=EngineIn)
    lora_adapters: Adapters = Field(default_factory=list)


class DeployCore(Body):
    """DeepInfra's fields of POST /deploy/llm."""

    model_name: Annotated[Str, Field(max_length=64, pattern=model_name_validator.regex.pattern)] = Field(
        description="Served as username/model-name."
    )
    gpu: Str = Field(description="A GPU type some host offers, e.g. H100-80GB.")
    num_gpus: Int(1, 8)
    max_batch_size: Int(1, 256)
    hf: HfIn
    settings: SettingsIn


class DeployIn(ServingIn, DeployCore):
    """POST /deploy/llm: DeepInfra's fields, then how the model is served."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model_name": "qwen3-8b", "gpu": "H100-80GB", "num_gpus": 1, "max_batch_size": 32,
                    "hf": {"repo": "Qwen/Qwen3-8B"},
                    "settings": {"min_instances": 0, "max_instances": 2, "cooldown_seconds": 300},
                    "engine": {"max_model_len": 8192, "speculative": {"method": "ngram", "num_speculative_tokens": 3}},
                    "lora_adapters": [{"name": "sql", "repo": "acme/qwen3-8b-sql-lora"}],
                }
            ]
        }
    )  # fmt: skip


def partial(model: type[BaseModel], name: str, nested: dict[str, type[BaseModel]] | None = None) -> type[BaseModel]:
    """`model` with every field optional (absent: left as it is; see `model_fields_set`); the same rules,
    so an explicit null is refused where the field is not nullable. `nested`: partial models of sections."""
    from pydantic import create_model

    fields: dict[str, Any] = {}
    for field_name, info in model.model_fields.items():
        annotation = (nested or {}).get(field_name, info.annotation)
        optional = FieldInfo.merge_field_infos(info, default=None, default_factory=None)
        fields[field_name] = (annotation, optional)
    return create_model(name, __base__=Body, __doc__=f"{model.__name__}'s fields, each optional.", **fields)


HfUpdate = partial(HfIn, "HfUpdate")
SettingsUpdate = partial(SettingsIn, "SettingsUpdate")
EngineUpdate = partial(EngineIn, "EngineUpdate")
DeployUpdate = partial(
    DeployIn, "DeployUpdate", {"hf": HfUpdate, "settings": SettingsUpdate, "engine": EngineUpdate}
)
DeployUpdate.model_config["json_schema_extra"] = {
    "examples": [{"settings": {"min_instances": 0, "max_instances": 3}, "lora_adapters": [{"name": "sql", "repo": "acme/sql-lora"}]}]
}
DeployUpdate.__doc__ = (
    "PUT /deploy/{deploy_id}: `settings` and `lora_adapters` may change (running instances keep running). "
    "The rest is fixed once deployed: `task` or an `engine` field given with a different value, or any of "
    "DeepInfra's other fields given, is a 400 naming it."
)
DeployUpdate.model_rebuild(force=True)


# --- Responses --------------------------------------------------------------------------------------------


class HfOut(BaseModel):
    repo: str
    revision: str | None


class SettingsOut(BaseModel):
    min_instances: int
    max_instances: int
    cooldown_seconds: int
    routing: Literal["prefix", "least_outstanding"]
    response_cache_seconds: int | None
    request_logging: bool
    idle_alert_hours: float | None
    idle_stop_hours: float | None


class SpeculativeOut(BaseModel):
    method: Literal["ngram"] | None = None
    model: str | None = None
    num_speculative_tokens: int


class EngineOut(BaseModel):
    quantization: str | None
    dtype: str
    max_model_len: int | None
    prefix_caching: bool
    kv_cache_dtype: str
    speculative: SpeculativeOut | None


class LoraAdapterOut(BaseModel):
    name: str
    repo: str
    revision: str | None


class InstancesOut(BaseModel):
    running: int
    pending: int


Timestamp = Annotated[str, WithJsonSchema({"type": "string", "format": "date-time"})]


class DeployOut(BaseModel):
    """The deploy object (DeepInfra's shape plus serving options). The Hugging Face token is never shown."""

    deploy_id: str
    model_name: str = Field(description="The served model name, username/model-name.")
    status: Literal["deploying", "running", "failed", "suspended", "deleting", "deleted"]
    fail_reason: str | None
    gpu: str
    num_gpus: int
    max_batch_size: int
    hf: HfOut
    task: Literal["generate", "embed"]
    engine: EngineOut
    lora_adapters: list[LoraAdapterOut]
    settings: SettingsOut
    instances: InstancesOut
    created_at: Timestamp
    updated_at: Timestamp


class DeployCreated(DeployOut):
    warnings: list[str] = Field(
        default_factory=list, description="Present when there is something to know, e.g. the model's size could not be read."
    )


class ErrorOut(BaseModel):
    detail: str = Field(description="What is wrong, in words a person can act on.")
    errors: dict[str, list[str]] | None = Field(None, description="Messages by dotted field path.")


# --- Errors -----------------------------------------------------------------------------------------------

MESSAGES = {
    "missing": "This field is required.",
    "extra_forbidden": "Unknown field.",
    "int_type": "Enter a whole number.",
    "int_parsing": "Enter a whole number.",
    "int_from_float": "Enter a whole number.",
    "float_type": "Enter a number.",
    "float_parsing": "Enter a number.",
    "bool_type": "Give true or false.",
    "string_type": "Give a string.",
    "model_type": "Must be an object.",
    "model_attributes_type": "Must be an object.",
    "dict_type": "Must be an object.",
    "list_type": "Must be a list.",
    "greater_than_equal": "Ensure this value is greater than or equal to {ge}.",
    "greater_than": "Ensure this value is greater than {gt}.",
    "less_than_equal": "Ensure this value is less than or equal to {le}.",
    "string_too_long": "Ensure this value has at most {max_length} characters.",
    "string_too_short": "This field may not be blank.",
    "too_long": "Give at most {max_length}.",
    "literal_error": "Choose one of {expected}.",
    "string_pattern_mismatch": "Does not match {pattern}.",
}
PATTERN_MESSAGES = {
    model_name_validator.regex.pattern: model_name_validator.message,
    hf_repo_validator.regex.pattern: hf_repo_validator.message,
    ADAPTER_NAME_RE: "Use lowercase letters, digits and '-'.",
}


def message(error: dict) -> str:
    """One pydantic error as a sentence a person can act on (Django's wording where the form has one)."""
    ctx = error.get("ctx") or {}
    if error["type"] == "string_pattern_mismatch" and ctx.get("pattern") in PATTERN_MESSAGES:
        return str(PATTERN_MESSAGES[ctx["pattern"]])
    template = MESSAGES.get(error["type"])
    if template is None:
        return error["msg"]
    try:
        return template.format(**ctx)
    except (KeyError, IndexError):
        return error["msg"]


def _missing_section(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The model of the section at `loc` (e.g. `settings`) when that whole section is missing."""
    for key in loc:
        info = model.model_fields.get(key) if isinstance(key, str) else None
        annotation = getattr(info, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def field_errors(exc: PydanticValidationError | list[dict], model: type[BaseModel], skip: int = 0) -> dict:
    """{dotted path: [messages]} from a pydantic error (`skip`: leading loc parts that are not the body's,
    e.g. ninja's ("body", "payload")). A missing section (`hf`, `settings`) names its required fields
    (`hf.repo`), as the form does."""
    errors: dict[str, list[str]] = {}
    for error in exc.errors() if isinstance(exc, PydanticValidationError) else exc:
        loc = tuple(error["loc"][skip:])
        paths = [".".join(map(str, loc))]
        if error["type"] == "missing" and (section := _missing_section(model, loc)) is not None:
            required = [name for name, info in section.model_fields.items() if info.is_required()]
            paths = [".".join(map(str, (*loc, name))) for name in required] or paths
        for path in paths:
            errors.setdefault(path, []).append(message(error))
    return errors

