"""Deploy API in DeepInfra's shape (Bearer API token auth): /deploy/llm, /deploy/list, /deploy/<deploy_id>.

Errors are JSON a person can act on: ``{"detail": "...", "errors": {"settings.min_instances": ["..."]}}``
with field paths as in the request body.
"""

import functools
import json

from django.core.exceptions import ValidationError
from django.http import Http404, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from llmhub.accounts.selectors import bearer_secret
from llmhub.accounts.services import api_token_authenticate
from llmhub.fleet.selectors import instance_counts

from . import selectors, services
from .forms import DeploymentForm, ScaleForm
from .models import Deployment

# Request body shape: JSON path → form field.
BODY_FIELDS = {
    "model_name": "model_name",
    "gpu": "gpu",
    "num_gpus": "num_gpus",
    "max_batch_size": "max_batch_size",
    "hf.repo": "hf_repo",
    "hf.revision": "hf_revision",
    "hf.token": "hf_token",
    "settings.min_instances": "min_instances",
    "settings.max_instances": "max_instances",
    "settings.cooldown_seconds": "cooldown_seconds",
}
FIELD_PATHS = {field: path for path, field in BODY_FIELDS.items()}
NESTED = {"hf", "settings"}


class ApiError(Exception):
    def __init__(self, status: int, detail: str, errors: dict[str, list[str]] | None = None):
        super().__init__(detail)
        self.status, self.detail, self.errors = status, detail, errors

    def response(self) -> JsonResponse:
        body = {"detail": self.detail}
        if self.errors:
            body["errors"] = self.errors
        return JsonResponse(body, status=self.status)


def deploy_api(view):
    """Authenticate the Bearer token (401 otherwise); turn ApiError and Http404 into JSON errors."""

    @functools.wraps(view)
    def wrapper(request, *args, **kwargs):
        user = api_token_authenticate(bearer_secret(request.headers.get("Authorization")))
        try:
            if user is None:
                raise ApiError(401, "Missing or invalid API token: send 'Authorization: Bearer <token>'.")
            return view(request, user, *args, **kwargs)
        except ApiError as exc:
            return exc.response()
        except Http404:
            return ApiError(404, "No such deployment.").response()

    return csrf_exempt(wrapper)


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object. Raises ApiError(400) that says where the JSON is broken."""
    try:
        body = json.loads(raw or b"")
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"Malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}.") from exc
    except UnicodeDecodeError as exc:
        raise ApiError(400, "The request body is not UTF-8 text.") from exc
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return body


def flatten_body(body: dict) -> dict:
    """Map the nested DeepInfra body to form data. Raises ApiError(400) naming unknown or misshapen fields."""
    data, unknown = {}, []
    for key, value in body.items():
        if key in NESTED:
            if not isinstance(value, dict):
                raise ApiError(400, f"'{key}' must be a JSON object.", {key: ["Must be an object."]})
            for sub, subvalue in value.items():
                path = f"{key}.{sub}"
                if path in BODY_FIELDS:
                    data[BODY_FIELDS[path]] = subvalue
                else:
                    unknown.append(path)
        elif key in BODY_FIELDS:
            data[BODY_FIELDS[key]] = value
        else:
            unknown.append(key)
    if unknown:
        raise ApiError(400, f"Unknown field(s): {', '.join(unknown)}.", {path: ["Unknown field."] for path in unknown})
    for field, value in data.items():
        if isinstance(value, (dict, list, bool)):
            raise ApiError(400, f"'{FIELD_PATHS[field]}' has the wrong type.", {FIELD_PATHS[field]: ["Wrong type."]})
    return {k: ("" if v is None else v) for k, v in data.items()}


def field_errors(error_dict: dict) -> dict[str, list[str]]:
    """Form/service errors keyed by body path (``settings.min_instances``), messages as text."""
    out = {}
    for field, errors in error_dict.items():
        messages = [m for e in errors for m in (e.messages if isinstance(e, ValidationError) else [str(e)])]
        out[FIELD_PATHS.get(field, field)] = messages
    return out


def invalid(error_dict: dict) -> ApiError:
    """A 400 ApiError from form or service errors, each message under its body path."""
    errors = field_errors(error_dict)
    return ApiError(400, "; ".join(f"{path}: {' '.join(msgs)}" for path, msgs in errors.items()), errors)


def deploy_json(deployment: Deployment, counts: dict[str, int]) -> dict:
    """The deploy object (DeepInfra shape). The Hugging Face token is never included."""
    return {
        "deploy_id": deployment.deploy_id,
        "model_name": deployment.full_name,
        "status": deployment.status,
        "fail_reason": deployment.fail_reason or None,
        "gpu": deployment.gpu_type.name,
        "num_gpus": deployment.num_gpus,
        "max_batch_size": deployment.max_batch_size,
        "hf": {"repo": deployment.hf_repo, "revision": deployment.hf_revision or None},
        "settings": {
            "min_instances": deployment.min_instances,
            "max_instances": deployment.max_instances,
            "cooldown_seconds": deployment.cooldown_seconds,
        },
        "instances": counts,
        "created_at": deployment.created_at.isoformat(),
        "updated_at": deployment.updated_at.isoformat(),
    }


def _one(deployment: Deployment) -> dict:
    return deploy_json(deployment, instance_counts([deployment.id])[deployment.id])


@require_POST
@deploy_api
def deploy_create(request, user):
    """POST /deploy/llm: create a deployment; 200 with the deploy object."""
    form = DeploymentForm(flatten_body(parse_json(request.body)))
    if not form.is_valid():
        raise invalid(form.errors.as_data())
    try:
        deployment = services.deployment_create(user=user, **form.service_kwargs())
    except ValidationError as exc:
        raise invalid(exc.error_dict) from exc
    body = _one(deployment)
    if form.fit_warning:
        body["warnings"] = [form.fit_warning]
    return JsonResponse(body)


@require_GET
@deploy_api
def deploy_list(request, user):
    """GET /deploy/list: the user's deployments that are not deleted, newest first."""
    deployments = list(selectors.deployments_visible(user))
    counts = instance_counts([d.id for d in deployments])
    return JsonResponse([deploy_json(d, counts[d.id]) for d in deployments], safe=False)


@require_http_methods(["GET", "PUT", "DELETE"])
@deploy_api
def deploy_detail(request, user, deploy_id):
    """GET /deploy/<deploy_id>: the deploy object. PUT: change `settings` (min/max instances) without
    restarting running instances. DELETE: start deleting it. Each answers 200 with the object."""
    deployment = selectors.deployment_get(user, deploy_id)
    if request.method == "PUT":
        _scale(deployment, parse_json(request.body))
    elif request.method == "DELETE":
        services.deployment_delete(deployment=deployment)
    return JsonResponse(_one(deployment))


def _scale(deployment: Deployment, body: dict) -> None:
    data = flatten_body(body)
    fixed = sorted(FIELD_PATHS[f] for f in data if f not in ScaleForm.base_fields)
    if fixed:
        raise ApiError(
            400,
            f"Only settings (min_instances, max_instances, cooldown_seconds) can change once deployed; "
            f"{', '.join(fixed)} are fixed. Create a new deployment to change them.",
            {path: ["Fixed once deployed."] for path in fixed},
        )
    form = ScaleForm(
        {
            "min_instances": data.get("min_instances", deployment.min_instances),
            "max_instances": data.get("max_instances", deployment.max_instances),
            "cooldown_seconds": data.get("cooldown_seconds", deployment.cooldown_seconds),
        }
    )
    if not form.is_valid():
        raise invalid(form.errors.as_data())
    try:
        services.deployment_scale(deployment=deployment, **form.cleaned_data)
    except ValidationError as exc:
        raise invalid(exc.error_dict) from exc
