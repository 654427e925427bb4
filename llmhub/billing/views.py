"""Billing pages (usage, invoices, settings) and the Stripe webhook endpoint."""

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.db.models import Prefetch
from django.http import JsonResponse
from django.shortcuts import redirect, render
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from llmhub import charts

from . import invoices, limits, selectors, stripe
from .forms import BillingSettingsForm
from .models import InvoiceInterval


def _overview_context(request):
    overview = selectors.billing_overview(request.user)
    labels = [row.deployment.full_name + (" (deleted)" if row.deployment.status == "deleted" else "")
              for row in overview.deployments]  # fmt: skip
    return {
        "o": overview,
        "legend": [(label, charts.colour(i)) for i, label in enumerate(labels)],
        "cost_chart": charts.stacked_bars(
            title="Cost per day (USD)", days=overview.days, unit="USD", decimals=2,
            series=[(label, row.daily_cost) for label, row in zip(labels, overview.deployments)],
        ),
        "hours_chart": charts.stacked_bars(
            title="GPU-hours per day", days=overview.days, unit="GPU-hours", decimals=3,
            series=[(label, row.daily_gpu_hours) for label, row in zip(labels, overview.deployments)],
        ),
        "payment_collection": selectors.payment_collection_on(),
    }  # fmt: skip


@login_required
@require_GET
def overview(request):
    """This week and month so far, projected month-end cost, plots per deployment and day. The `live`
    partial is polled by htmx so the numbers move while instances run."""
    template = "billing/overview.html#live" if request.htmx else "billing/overview.html"
    return render(request, template, _overview_context(request))


@login_required
@require_http_methods(["GET", "POST"])
def billing_settings(request):
    account = limits.billing_account_get(user=request.user)
    initial = {
        "monthly_limit": account.monthly_limit,
        "alert_thresholds": ", ".join(str(t) for t in account.alert_thresholds),
        "alert_email": account.alert_email,
        "alert_webhook_url": account.alert_webhook_url,
    }
    form = BillingSettingsForm(request.POST or None, initial=initial)
    if request.method == "POST" and form.is_valid():
        try:
            result = limits.billing_settings_update(account=account, **form.cleaned_data)
        except ValidationError as exc:
            for name, errors in exc.error_dict.items():
                for error in errors:
                    form.add_error(name, error)
        else:
            if result.limit is None:
                messages.success(request, "Saved: no monthly spending limit.")
            else:
                messages.success(request, f"Saved: monthly spending limit {result.limit:,.2f} USD.")
            if result.resumed:
                messages.success(request, f"{result.resumed} suspended deployment(s) resumed at their previous scale.")
            if result.suspended:
                messages.error(
                    request,
                    f"This month's spend ({result.spent:,.2f} USD) already reaches the limit: "
                    f"{result.suspended} deployment(s) suspended.",
                )
            return redirect("billing:settings")
    context = {
        "form": form,
        "account": account,
        "overview": selectors.billing_overview(request.user),
        "alerts": account.alerts.prefetch_related("deliveries")[:20],
        "check_interval": f"{settings.BILLING_CHECK_INTERVAL:g}",
    }
    return render(request, "billing/settings.html", context, status=400 if form.errors else 200)


@login_required
@require_GET
def invoice_list(request):
    context = {
        "invoices": selectors.invoices_visible(request.user),
        "payment_collection": selectors.payment_collection_on(),
    }
    return render(request, "billing/invoices.html", context)


def _invoice_context(request, number):
    invoice = selectors.invoice_get(request.user, number)
    lines = invoice.lines.prefetch_related(
        Prefetch("intervals", queryset=InvoiceInterval.objects.order_by("start", "instance_id"))
    )
    return {
        "invoice": invoice,
        "lines": lines,
        "account": invoice.account,
        "payment_collection": selectors.payment_collection_on(),
    }


@login_required
@require_GET
def invoice_detail(request, number):
    """One invoice: its lines, and under each line the instance intervals it adds up."""
    return render(request, "billing/invoice.html", _invoice_context(request, number))


@login_required
@require_GET
def invoice_print(request, number):
    """The invoice as a print-ready page (A4; the browser's "Save as PDF" makes the PDF)."""
    return render(request, "billing/invoice_print.html", _invoice_context(request, number))


@csrf_exempt
@require_POST
def stripe_webhook(request):
    """Stripe's webhook: signature checked, each event processed once (replays change nothing)."""
    try:
        outcome = invoices.stripe_event_process(
            payload=request.body, signature=request.headers.get("Stripe-Signature", "")
        )
    except stripe.WebhookError as exc:
        return JsonResponse({"error": {"message": str(exc), "code": "invalid_webhook"}}, status=400)
    return JsonResponse({"received": True, "outcome": outcome})
