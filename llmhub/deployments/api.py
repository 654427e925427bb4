"""Deploy API in DeepInfra's shape (Bearer API token auth): /deploy/llm, /deploy/list, /deploy/<deploy_id>.

Request and response bodies are declared once in `schemas` (django-ninja + pydantic): they validate
requests and describe the OpenAPI 3 document at `GET /deploy/openapi.json` (no token needed), shown at
`/deploy/docs` (Swagger UI from django-ninja's own static files, no CDN). Rules that need the database (GPU
type offered, largest host, the model's fit) are the dashboard form's (`forms.DeploymentForm`); the quota
and the name are the services'.

Errors are JSON a person can act on: ``{"detail": "...", "errors": {"settings.min_instances": ["..."]}}``
with dotted field paths as in the request body; malformed JSON says where (line and column).
"""

import json

from django.core.exceptions import ValidationError
from django.http import Http404, HttpRequest, JsonResponse
from ninja import NinjaAPI
from ninja.errors import AuthenticationError, HttpError
from ninja.errors import ValidationError as NinjaValidationError
from ninja.security import HttpBearer

from llmhub.accounts.selectors import bearer_secret
from llmhub.accounts.services import api_token_authenticate
from llmhub.fleet.selectors import instance_counts

from . import selectors, services
from .forms import DeploymentForm
from .models import Deployment, LoraAdapter
from .rules import serving_errors
from .schemas import DeployCreated, DeployIn, DeployOut, DeployUpdate, ErrorOut, field_errors

UNAUTHENTICATED = "Missing or invalid API token: send 'Authorization: Bearer <token>'."

# Form field → request body path, for errors of the form's rules.
FIELD_PATHS = {
    "hf_repo": "hf.repo", "hf_revision": "hf.revision", "hf_token": "hf.token",
    **{f: f"settings.{f}" for f in ("min_instances", "max_instances", "cooldown_seconds", *services.SETTINGS)},
    **DeploymentForm.ENGINE_FIELDS,
}  # fmt: skip


class ApiError(Exception):
    """An error answered as ``{"detail": ..., "errors": {path: [messages]}}`` with `status`."""

    def __init__(self, status: int, detail: str, errors: dict[str, list[str]] | None = None):
        super().__init__(detail)
        self.status, self.detail, self.errors = status, detail, errors

    def response(self) -> JsonResponse:
        body = {"detail": self.detail}
        if self.errors:
            body["errors"] = self.errors
        return JsonResponse(body, status=self.status)


class ApiToken(HttpBearer):
    """`Authorization: Bearer <API token>` (llmhub.accounts); anything else is a 401."""

    def __call__(self, request: HttpRequest):
        return api_token_authenticate(bearer_secret(request.headers.get("Authorization")))

    def authenticate(self, request, token):  # pragma: no cover - __call__ reads the header itself
        return api_token_authenticate(token)


api = NinjaAPI(
    title="LLMHub deploy API",
    version="1",
    description="Dedicated LLM deployments in DeepInfra's deploy API shape. Authenticate with "
    "`Authorization: Bearer <API token>` (tokens: the dashboard's Tokens page).",
    auth=ApiToken(),
    urls_namespace="deploy-api",
    openapi_url="/openapi.json",
    docs_url="/docs",
)
ERRORS = {400: ErrorOut, 401: ErrorOut, 404: ErrorOut}


def invalid(errors: dict[str, list[str]]) -> ApiError:
    """A 400 with each message under its body path; `detail` sums them up."""
    return ApiError(400, "; ".join(f"{path}: {' '.join(msgs)}" for path, msgs in errors.items()), errors)


def form_errors(error_dict: dict) -> dict[str, list[str]]:
    """Form or service errors ({field: [ValidationError | str]}) keyed by body path (`settings.min_instances`)."""
    out: dict[str, list[str]] = {}
    for field, errors in error_dict.items():
        messages = [m for e in errors for m in (e.messages if isinstance(e, ValidationError) else [str(e)])]
        out.setdefault(FIELD_PATHS.get(field, field), []).extend(messages)
    return out


@api.exception_handler(Exception)
def _unexpected(request, exc):
    """Anything else goes on to Django (its middleware, e.g. a database outage's 503, and its 500 handling),
    also with DEBUG on, where django-ninja would answer a traceback itself."""
    raise exc


@api.exception_handler(ApiError)
def _api_error(request, exc: ApiError):
    return exc.response()


@api.exception_handler(AuthenticationError)
def _unauthenticated(request, exc):
    return ApiError(401, UNAUTHENTICATED).response()


@api.exception_handler(Http404)
def _not_found(request, exc):
    return ApiError(404, "No such deployment.").response()


@api.exception_handler(NinjaValidationError)
def _invalid_body(request, exc: NinjaValidationError):
    body_errors = [e for e in exc.errors if tuple(e["loc"][:1]) == ("body",)]
    errors = field_errors(body_errors, DeployIn, skip=2)
    if not errors:  # not the body: a path parameter
        return ApiError(400, "Invalid request.", {".".join(map(str, e["loc"][1:])): [e["msg"]] for e in exc.errors})
    if set(errors) == {""}:
        return ApiError(400, "The request body must be a JSON object.").response()
    unknown = [path for path, msgs in errors.items() if "Unknown field." in msgs]
    if unknown:
        return ApiError(400, f"Unknown field(s): {', '.join(unknown)}.", errors).response()
    return invalid(errors).response()


@api.exception_handler(HttpError)
def _http_error(request, exc: HttpError):
    cause = exc.__cause__
    if isinstance(cause, json.JSONDecodeError):  # the body parser's (ninja wraps it)
        return ApiError(400, f"Malformed JSON at line {cause.lineno} column {cause.colno}: {cause.msg}.").response()
    if isinstance(cause, UnicodeDecodeError):
        return ApiError(400, "The request body is not UTF-8 text.").response()
    return ApiError(exc.status_code, str(exc)).response()


def deploy_json(deployment: Deployment, counts: dict[str, int]) -> dict:
    """The deploy object (`schemas.DeployOut`). The Hugging Face token is never included."""
    engine = deployment.engine
    return {
        "deploy_id": deployment.deploy_id,
        "model_name": deployment.full_name,
        "status": deployment.status,
        "fail_reason": deployment.fail_reason or None,
        "gpu": deployment.gpu_type.name,
        "num_gpus": deployment.num_gpus,
        "max_batch_size": deployment.max_batch_size,
        "hf": {"repo": deployment.hf_repo, "revision": deployment.hf_revision or None},
        "task": deployment.task,
        "engine": {
            "quantization": engine.quantization, "dtype": engine.dtype, "max_model_len": engine.max_model_len,
            "prefix_caching": engine.prefix_caching, "kv_cache_dtype": engine.kv_cache_dtype,
            "speculative": engine.speculative and {"method": None, "model": None, **engine.speculative},
        },  # fmt: skip
        "lora_adapters": [
            {"name": a.name, "repo": a.repo, "revision": a.revision or None} for a in deployment.adapters
        ],
        "settings": {
            "min_instances": deployment.min_instances,
            "max_instances": deployment.max_instances,
            "cooldown_seconds": deployment.cooldown_seconds,
            **{name: getattr(deployment, name) for name in services.SETTINGS},
        },
        "instances": counts,
        "created_at": deployment.created_at.isoformat(),
        "updated_at": deployment.updated_at.isoformat(),
    }


def _one(deployment: Deployment) -> dict:
    return deploy_json(deployment, instance_counts([deployment.id])[deployment.id])


def _adapters(payload) -> tuple[LoraAdapter, ...]:
    return tuple(LoraAdapter(a.name, a.repo, a.revision or "") for a in payload.lora_adapters)


def _form_data(payload: DeployIn) -> dict:
    """The validated body as the dashboard form's data, so the form's rules (GPU type offered, largest host,
    fit) are the API's too."""
    engine, settings, speculative = payload.engine, payload.settings, payload.engine.speculative
    blank = lambda value: "" if value is None else value  # noqa: E731
    data = {
        "model_name": payload.model_name, "gpu": payload.gpu, "num_gpus": payload.num_gpus,
        "max_batch_size": payload.max_batch_size, "hf_repo": payload.hf.repo,
        "hf_revision": blank(payload.hf.revision), "hf_token": blank(payload.hf.token),
        **{name: blank(getattr(settings, name)) for name in ("min_instances", "max_instances", "cooldown_seconds")},
        **{name: blank(getattr(settings, name)) for name in services.SETTINGS},
        "task": payload.task, "quantization": blank(engine.quantization), "dtype": engine.dtype,
        "max_model_len": blank(engine.max_model_len), "prefix_caching": engine.prefix_caching,
        "kv_cache_dtype": engine.kv_cache_dtype,
        "lora_adapters": "\n".join(f"{a.name} {a.repo} {a.revision or ''}" for a in payload.lora_adapters),
    }  # fmt: skip
    if speculative is not None:
        data["speculative"] = "ngram" if speculative.method else "draft"
        data["speculative_model"] = blank(speculative.model)
        data["num_speculative_tokens"] = speculative.num_speculative_tokens
    return data


@api.post("/llm", response={200: DeployCreated, **ERRORS}, summary="Create a deployment", exclude_unset=True)
def deploy_create(request, payload: DeployIn):
    """Create a deployment (status `deploying`); 200 with the deploy object and any `warnings`."""
    speculative = payload.engine.speculative
    errors = serving_errors(
        task=payload.task,
        speculative=speculative.model_dump(exclude_none=True) if speculative else None,
        adapter_names=[a.name for a in payload.lora_adapters],
    )
    if errors:
        raise invalid(errors)
    form = DeploymentForm(_form_data(payload))
    if not form.is_valid():
        raise invalid(form_errors(form.errors.as_data()))
    try:
        deployment = services.deployment_create(user=request.auth, **form.service_kwargs())
    except ValidationError as exc:
        raise invalid(form_errors(exc.error_dict)) from exc
    body = _one(deployment)
    if form.fit_warning:
        body["warnings"] = [form.fit_warning]
    return body


@api.get("/list", response={200: list[DeployOut], **ERRORS}, summary="List deployments")
def deploy_list(request):
    """The user's deployments that are not deleted, newest first."""
    deployments = list(selectors.deployments_visible(request.auth))
    counts = instance_counts([d.id for d in deployments])
    return [deploy_json(d, counts[d.id]) for d in deployments]


@api.get("/{deploy_id}", response={200: DeployOut, **ERRORS}, summary="Get a deployment")
def deploy_get(request, deploy_id: str):
    """The deploy object; another user's deployment is a 404."""
    return _one(selectors.deployment_get(request.auth, deploy_id))


@api.put("/{deploy_id}", response={200: DeployOut, **ERRORS}, summary="Change settings or adapters")
def deploy_update(request, deploy_id: str, payload: DeployUpdate):
    """Change `settings` and `lora_adapters` without restarting running instances (adapters are applied to
    them); every other field is fixed once deployed (a 400 naming it). 200 with the deploy object."""
    deployment = selectors.deployment_get(request.auth, deploy_id)
    fixed = _fixed_changes(deployment, payload)
    if fixed:
        raise ApiError(
            400,
            "Only settings and lora_adapters can change once deployed; "
            f"{', '.join(fixed)} are fixed. Create a new deployment to change them.",
            {path: ["Fixed once deployed."] for path in fixed},
        )
    given = payload.settings.model_dump(exclude_unset=True) if payload.settings is not None else {}
    current = {name: getattr(deployment, name) for name in ("min_instances", "max_instances", "cooldown_seconds")}
    current.update({name: getattr(deployment, name) for name in services.SETTINGS})
    if "lora_adapters" in payload.model_fields_set:
        errors = serving_errors(
            task=deployment.task, speculative=deployment.engine.speculative,
            adapter_names=[a.name for a in payload.lora_adapters or []],
        )  # fmt: skip
        if errors:
            raise invalid(errors)
    adapters = _adapters(payload) if payload.lora_adapters is not None else None
    try:
        services.deployment_update(deployment=deployment, **{**current, **given}, lora_adapters=adapters)
    except ValidationError as exc:
        raise invalid(form_errors(exc.error_dict)) from exc
    return _one(deployment)


def _fixed_changes(deployment: Deployment, payload) -> list[str]:
    """Body paths of fixed fields in a PUT: any DeepInfra field given besides `settings`; `task` and each
    `engine.<field>` when it differs from the deployment's."""
    given = payload.model_fields_set
    fixed = sorted(given & {"model_name", "gpu", "num_gpus", "max_batch_size"})
    if "hf" in given and payload.hf is not None:
        fixed += [f"hf.{name}" for name in sorted(payload.hf.model_fields_set)] or ["hf"]
    if "task" in given and payload.task != deployment.task:
        fixed.append("task")
    if "engine" in given and payload.engine is not None:
        engine = deployment.engine
        for name in sorted(payload.engine.model_fields_set):
            value = getattr(payload.engine, name)
            if name == "speculative" and value is not None:
                value = value.model_dump(exclude_none=True)
            if value != getattr(engine, name):
                fixed.append(f"engine.{name}")
    return fixed


@api.delete("/{deploy_id}", response={200: DeployOut, **ERRORS}, summary="Delete a deployment")
def deploy_delete(request, deploy_id: str):
    """Start deleting the deployment (status `deleting`); 200 with the deploy object."""
    deployment = selectors.deployment_get(request.auth, deploy_id)
    services.deployment_delete(deployment=deployment)
    return _one(deployment)

