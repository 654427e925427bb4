"""Operators' view of billing: GPU prices (scheduled, never retroactive), accounts, invoices, alerts."""

from django import forms
from django.contrib import admin, messages
from django.db import models
from django.template.response import TemplateResponse
from django.urls import path
from django.utils import timezone

from . import limits, prices
from .audit import billing_audit
from .models import (
    AlertDelivery,
    BillingAccount,
    BillingFailure,
    GpuPrice,
    Invoice,
    InvoiceLine,
    SpendingAlert,
    StripeEvent,
)


class GpuPriceForm(forms.ModelForm):
    effective_at = forms.DateTimeField(required=False, help_text="UTC; empty: now. Never earlier than now.")

    class Meta:
        model = GpuPrice
        fields = ["gpu_type", "hourly_price", "effective_at"]

    def clean(self):
        cleaned = super().clean()
        now = timezone.now()
        if cleaned.get("effective_at") is None and "effective_at" not in self.errors:
            cleaned["effective_at"] = now
        elif cleaned["effective_at"] < now:
            self.add_error("effective_at", "A price cannot start in the past: what was billed stays billed.")
        if cleaned.get("hourly_price") is not None and cleaned["hourly_price"] < 0:
            self.add_error("hourly_price", "A price cannot be negative.")
        return cleaned


@admin.register(GpuPrice)
class GpuPriceAdmin(admin.ModelAdmin):
    """The price schedule: prices in force and scheduled, per GPU type. New prices only: one whose time
    has come is history (changing it would rewrite past bills)."""

    form = GpuPriceForm
    list_display = ("gpu_type", "hourly_price", "effective_at", "schedule", "created_at")
    list_filter = ("gpu_type",)

    @admin.display(description="Schedule")
    def schedule(self, obj):
        now = timezone.now()
        if obj.effective_at > now:
            return "scheduled"
        later = GpuPrice.objects.filter(gpu_type_id=obj.gpu_type_id, effective_at__gt=obj.effective_at)
        return "history" if later.filter(effective_at__lte=now).exists() else "in force"

    def has_change_permission(self, request, obj=None):
        if obj is not None and obj.effective_at <= timezone.now():
            return False
        return super().has_change_permission(request, obj)

    def has_delete_permission(self, request, obj=None):
        if obj is not None and obj.effective_at <= timezone.now():
            return False
        return super().has_delete_permission(request, obj)

    def save_model(self, request, obj, form, change):
        super().save_model(request, obj, form, change)
        prices.gpu_prices_sync()  # a price effective now shows in cost estimates at once


@admin.register(BillingAccount)
class BillingAccountAdmin(admin.ModelAdmin):
    """Suspension has one owner: the billing service. Actions call it; the status is not editable."""

    list_display = ("user", "monthly_limit", "alert_thresholds", "suspended_at", "operator_hold", "stripe_customer_id")
    search_fields = ("user__username", "stripe_customer_id")
    readonly_fields = ("stripe_customer_id", "suspended_at", "operator_hold", "updated_at")
    raw_id_fields = ("user",)
    actions = ["hold", "release"]
    formfield_overrides = {models.URLField: {"assume_scheme": "https"}}  # a webhook URL without a scheme

    @admin.action(description="Suspend the account's deployments (operator hold)")
    def hold(self, request, queryset):
        done = sum(limits.account_hold(account=account, hold=True).suspended for account in queryset)
        messages.success(request, f"{done} deployments suspended.")

    @admin.action(description="Release the operator hold (the spending limit decides)")
    def release(self, request, queryset):
        done = sum(limits.account_hold(account=account, hold=False).resumed for account in queryset)
        messages.success(request, f"{done} deployments resumed.")

    def get_urls(self):
        audit = path("audit/", self.admin_site.admin_view(self.audit_view), name="billing_audit")
        return [audit, *super().get_urls()]

    def audit_view(self, request):
        """Metered usage from the run intervals vs invoices, per account and week (`manage.py billing_audit`)."""
        context = {**self.admin_site.each_context(request), "title": "Billing audit", "differences": billing_audit()}
        return TemplateResponse(request, "admin/billing/audit.html", context)


@admin.register(BillingFailure)
class BillingFailureAdmin(admin.ModelAdmin):
    list_display = ("created_at", "job", "account", "error")
    list_filter = ("job",)
    readonly_fields = ("created_at", "job", "account", "error")

    def has_add_permission(self, request):
        return False


class InvoiceLineInline(admin.TabularInline):
    model = InvoiceLine
    extra = 0
    can_delete = False
    fields = ("week_start", "is_adjustment", "instance", "deployment_name", "gpu_type_name", "num_gpus",
              "gpu_seconds", "hourly_rate", "amount", "stripe_invoice_item_id")  # fmt: skip
    readonly_fields = fields

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(Invoice)
class InvoiceAdmin(admin.ModelAdmin):
    list_display = ("number", "account", "period_start", "total", "status", "stripe_status", "created_at")
    list_filter = ("status", "stripe_status")
    search_fields = ("number", "account__user__username", "stripe_invoice_id")
    readonly_fields = ("account", "number", "period_start", "period_end", "total", "created_at", "stripe_invoice_id",
                       "stripe_status", "stripe_hosted_url", "stripe_error", "paid_at", "status")  # fmt: skip
    inlines = [InvoiceLineInline]

    def has_add_permission(self, request):
        return False


class AlertDeliveryInline(admin.TabularInline):
    model = AlertDelivery
    extra = 0
    can_delete = False
    readonly_fields = ("channel", "target", "status", "attempts", "next_attempt_at", "sent_at", "last_error")
    fields = readonly_fields


@admin.register(SpendingAlert)
class SpendingAlertAdmin(admin.ModelAdmin):
    list_display = ("account", "month", "threshold", "limit", "spent", "superseded", "created_at")
    list_filter = ("threshold",)
    readonly_fields = ("account", "month", "threshold", "limit", "spent", "superseded", "created_at")
    inlines = [AlertDeliveryInline]


@admin.register(StripeEvent)
class StripeEventAdmin(admin.ModelAdmin):
    list_display = ("event_id", "type", "invoice", "outcome", "received_at")
    readonly_fields = ("event_id", "type", "invoice", "outcome", "received_at")
