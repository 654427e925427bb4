"""Dashboard pages for deployments (server-rendered, django-htmx)."""

import json

from asgiref.sync import sync_to_async
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.http import JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from django_htmx.http import HttpResponseStopPolling

from llmhub.charts import Series, line_chart
from llmhub.fleet.selectors import instance_counts, instance_log_tail
from llmhub.gateway import services as gateway
from llmhub.gateway.routing import Caller
from llmhub.gateway.selectors import usage_series
from llmhub.gateway.services import GatewayError

from . import selectors, services
from .forms import AdaptersForm, DeploymentForm, ScaleForm, adapters_text
from .models import Deployment

# Statuses after which the live fragment stops polling (nothing more happens to the instances).
LIVE_FINAL = (Deployment.Status.FAILED, Deployment.Status.DELETED)


def scale_initial(deployment) -> dict:
    return {f: getattr(deployment, f) for f in ScaleForm.base_fields}


@login_required
@require_GET
def deployment_list(request):
    deployments = list(selectors.deployments_visible(request.user))
    counts = instance_counts([d.id for d in deployments])
    rows = [
        (d, counts[d.id], selectors.hourly_cost(d.gpu_type, d.num_gpus, counts[d.id]["running"])) for d in deployments
    ]
    return render(request, "deployments/list.html", {"rows": rows})


@login_required
@require_POST
def deployment_estimate(request):
    """The create form's live panel (model fit, hourly and monthly cost at min and max instances) and the
    errors of the fields filled in so far."""
    form = DeploymentForm(request.POST)
    form.is_valid()  # the estimate needs only some fields; the others may still be empty
    data = form.cleaned_data
    estimate = None
    if all(data.get(f) is not None for f in ("gpu", "num_gpus", "min_instances", "max_instances")):
        estimate = selectors.cost_estimate(data["gpu"], data["num_gpus"], data["min_instances"], data["max_instances"])
    if data.get("model_name") and selectors.model_name_taken(request.user, data["model_name"]):
        form.add_error("model_name", services.NAME_TAKEN.format(name=data["model_name"]))
    # Live validation: errors of the fields the user has filled in so far, swapped in out of band.
    live_fields = [form[name] for name in form.fields if request.POST.get(name, "") != ""]
    context = {
        "estimate": estimate, "gpu": data.get("gpu"), "fit": form.fit, "fit_error": form.errors.get("num_gpus") if form.fit and form.fit.fits is False else None,
        "live_fields": live_fields,
        "cost_blocked": any(f in form.errors and request.POST.get(f) for f in ("gpu", "num_gpus", "min_instances", "max_instances")),
    }  # fmt: skip
    return render(request, "deployments/create.html#estimate", context)


def usage_charts(deployment) -> list:
    """SVG charts of the last hour per minute: requests, tokens, latency p50/p95."""
    series = usage_series(deployment.id, minutes=60)
    labels = [t.strftime("%H:%M") for t in series["t"]]
    return [
        line_chart([Series("requests", series["requests"])], labels, title="Requests per minute"),
        line_chart(
            [Series("prompt", series["prompt_tokens"]), Series("completion", series["completion_tokens"])],
            labels,
            title="Tokens per minute",
        ),  # fmt: skip
        line_chart([Series("p50", series["p50"]), Series("p95", series["p95"])], labels, title="Latency", unit=" ms"),
    ]


@login_required
@require_http_methods(["GET", "POST"])
def deployment_create(request):
    form = DeploymentForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            deployment = services.deployment_create(user=request.user, **form.service_kwargs())
        except ValidationError as exc:
            for field, errors in exc.error_dict.items():
                for error in errors:
                    form.add_error(field, error)
        else:
            messages.success(request, f"Deploying {deployment.full_name}.")
            if form.fit_warning:
                messages.warning(request, form.fit_warning)
            return redirect("deployments:detail", deploy_id=deployment.deploy_id)
    return render(request, "deployments/create.html", {"form": form}, status=400 if form.errors else 200)


def live_context(deployment) -> dict:
    """What the live fragment shows: instance counts, the 20 newest instances, the 50 newest events."""
    return {
        "deployment": deployment,
        "counts": instance_counts([deployment.id])[deployment.id],
        "instances": deployment.instances.select_related("host").order_by("-id")[:20],
        "events": deployment.events.all()[:50],
    }


@login_required
@require_GET
def deployment_detail(request, deploy_id):
    deployment = selectors.deployment_get(request.user, deploy_id)
    context = {
        **live_context(deployment),
        "scale_form": ScaleForm(initial=scale_initial(deployment)),
        "adapters_form": adapters_form(deployment),
        "charts": usage_charts(deployment),
    }
    return render(request, "deployments/detail.html", context)


@login_required
@require_GET
def deployment_live(request, deploy_id):
    """The live fragment (instances, events), polled every few seconds; no chart SQL. HTTP 286 (htmx: stop
    polling) once the deployment is failed or deleted."""
    deployment = selectors.deployment_get(request.user, deploy_id, include_deleted=True)
    response = render(request, "deployments/detail.html#live", live_context(deployment))
    if deployment.status in LIVE_FINAL:
        return HttpResponseStopPolling(response.content)
    return response


@login_required
@require_GET
def deployment_charts(request, deploy_id):
    """The traffic charts fragment, refreshed on its own slower schedule (a minute, while the tab is visible)."""
    deployment = selectors.deployment_get(request.user, deploy_id)
    return render(
        request, "deployments/detail.html#charts", {"deployment": deployment, "charts": usage_charts(deployment)}
    )


@login_required
@require_POST
def deployment_scale(request, deploy_id):
    """The settings form (min/max instances, cooldown, routing, response cache, request logging, idle guard):
    re-rendered in place with errors or the new values."""
    deployment = selectors.deployment_get(request.user, deploy_id)
    form = ScaleForm(request.POST, initial=scale_initial(deployment))
    if form.is_valid():
        try:
            services.deployment_update(deployment=deployment, **form.cleaned_data)
        except ValidationError as exc:
            for field, errors in exc.error_dict.items():
                for error in errors:
                    form.add_error(field, error)
        else:
            messages.success(
                request,
                f"{deployment.full_name} now runs {deployment.min_instances}–{deployment.max_instances} instances.",
            )
            form = ScaleForm(initial=scale_initial(deployment))
    if not request.htmx:
        return redirect("deployments:detail", deploy_id=deploy_id)
    context = {"deployment": deployment, "scale_form": form}
    return render(request, "deployments/detail.html#scale-form", context, status=400 if form.errors else 200)


@login_required
@require_POST
def deployment_adapters(request, deploy_id):
    """The LoRA adapters form of the deployment page: re-rendered in place with errors or the new list."""
    deployment = selectors.deployment_get(request.user, deploy_id)
    form = AdaptersForm(request.POST, deployment=deployment)
    if form.is_valid():
        if services.deployment_adapters_set(deployment=deployment, lora_adapters=form.adapters):
            names = ", ".join(a.name for a in deployment.adapters) or "none"
            messages.success(request, f"LoRA adapters of {deployment.full_name}: {names}. Running instances load them.")
        form = adapters_form(deployment)
    if not request.htmx:
        return redirect("deployments:detail", deploy_id=deploy_id)
    context = {"deployment": deployment, "adapters_form": form}
    return render(request, "deployments/detail.html#adapters-form", context, status=400 if form.errors else 200)


def adapters_form(deployment) -> AdaptersForm:
    """The adapters form filled with the deployment's adapters."""
    return AdaptersForm(initial={"lora_adapters": adapters_text(deployment.adapters)}, deployment=deployment)


@login_required
@require_http_methods(["GET", "POST"])
def deployment_scale_to_zero(request, deploy_id):
    """One click from an idle alert: POST sets min instances to 0 and stops the instances (the deployment wakes
    on its next request); GET (the e-mail's link) shows the button. Owner only (404), CSRF-protected."""
    deployment = selectors.deployment_get(request.user, deploy_id)
    if request.method == "GET":
        return render(request, "deployments/scale_to_zero.html", {"deployment": deployment})
    if services.deployment_scale_to_zero(deployment=deployment, reason="by the owner"):
        messages.success(request, f"{deployment.full_name} scales to zero; its next request starts an instance.")
    else:
        messages.info(request, f"{deployment.full_name} is already at zero (or not running).")
    return redirect("deployments:detail", deploy_id=deploy_id)


@login_required
@require_GET
def model_page(request, username, model_name, tab="demo"):
    """`/<username>/<model_name>` (chat demo) and `/<username>/<model_name>/api` (code examples)."""
    deployment = selectors.model_get(request.user, username, model_name)
    counts = instance_counts([deployment.id])[deployment.id]
    return render(request, "models/page.html", {"deployment": deployment, "counts": counts, "tab": tab})


@login_required
@require_GET
def instance_logs(request, deploy_id, instance_id):
    """The log tail of one instance's container (an htmx fragment on the deployment page)."""
    deployment = selectors.deployment_get(request.user, deploy_id)
    instance = get_object_or_404(deployment.instances.select_related("host"), id=instance_id)
    context = {"instance": instance, "log": instance_log_tail(instance)}
    return render(request, "deployments/detail.html#instance-log", context)


@login_required
@require_GET
def deployment_status(request, deploy_id):
    """The status badge fragment; HTTP 286 (htmx: stop polling) once the status is settled (deleted too)."""
    deployment = selectors.deployment_get(request.user, deploy_id, include_deleted=True)
    counts = instance_counts([deployment.id])[deployment.id]
    response = render(request, "deployments/list.html#status-badge", {"deployment": deployment, "counts": counts})
    if deployment.is_settled:
        return HttpResponseStopPolling(response.content)
    return response


@login_required
@require_http_methods(["DELETE", "POST"])
def deployment_delete(request, deploy_id):
    """Trash icon: delete after confirm. htmx gets an empty 200 (row removed in place) + an OOB message."""
    deployment = selectors.deployment_get(request.user, deploy_id)
    services.deployment_delete(deployment=deployment)
    messages.success(request, f"Deleting {deployment.full_name}.")
    if request.htmx:
        return render(request, "base.html#messages-oob")
    return redirect("deployments:list")


@require_POST
async def deployment_chat(request, deploy_id):
    """The dashboard chat box: relay `{"messages": [...]}` to the deployment as a streamed chat completion."""
    user = await request.auser()
    if not user.is_authenticated:
        return JsonResponse({"error": {"message": "Sign in again."}}, status=401)
    try:
        deployment = await sync_to_async(selectors.deployment_get)(user, deploy_id)
        payload = json.loads(request.body or b"{}")
        messages_in = payload.get("messages")
        if not isinstance(messages_in, list) or not messages_in:
            raise GatewayError(400, "Send a non-empty list of messages.")
        body = {
            "model": deployment.full_name,
            "messages": messages_in,
            "stream": True,
            "max_tokens": min(int(payload.get("max_tokens", 128)), 4096),
        }
        caller = Caller(user_id=user.id, username=user.username, token_key=f"session-{user.id}")
        return await gateway.handle(caller, "chat/completions", json.dumps(body).encode())
    except (json.JSONDecodeError, ValueError, TypeError):
        return GatewayError(400, "The chat request is not valid JSON.").response()
    except GatewayError as exc:
        return exc.response()
