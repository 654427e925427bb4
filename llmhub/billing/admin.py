"""Operators' view of billing: GPU prices (scheduled, never retroactive), accounts, invoices, alerts."""

from django import forms
from django.contrib import admin
from django.utils import timezone

from . import prices
from .models import AlertDelivery, BillingAccount, GpuPrice, Invoice, InvoiceLine, SpendingAlert, StripeEvent


class GpuPriceForm(forms.ModelForm):
    class Meta:
        model = GpuPrice
        fields = ["gpu_type", "hourly_price", "effective_at"]

    def clean(self):
        cleaned = super().clean()
        effective_at = cleaned.get("effective_at")
        if effective_at and effective_at < timezone.now() - timezone.timedelta(seconds=60):
            self.add_error("effective_at", "A price cannot start in the past: what was billed stays billed.")
        if cleaned.get("hourly_price") is not None and cleaned["hourly_price"] < 0:
            self.add_error("hourly_price", "A price cannot be negative.")
        return cleaned


@admin.register(GpuPrice)
class GpuPriceAdmin(admin.ModelAdmin):
    """New prices only: one whose time has come is history (changing it would rewrite past bills)."""

    form = GpuPriceForm
    list_display = ("gpu_type", "hourly_price", "effective_at", "created_at")
    list_filter = ("gpu_type",)

    def get_changeform_initial_data(self, request):
        return {"effective_at": timezone.now()}

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
    list_display = ("user", "monthly_limit", "alert_thresholds", "suspended_at", "stripe_customer_id")
    search_fields = ("user__username", "stripe_customer_id")
    readonly_fields = ("stripe_customer_id", "suspended_at", "updated_at")
    raw_id_fields = ("user",)


class InvoiceLineInline(admin.TabularInline):
    model = InvoiceLine
    extra = 0
    can_delete = False
    fields = ("deployment_name", "gpu_type_name", "num_gpus", "gpu_seconds", "hourly_rate", "amount",
              "stripe_invoice_item_id")  # fmt: skip
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
