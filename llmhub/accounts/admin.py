from django.contrib import admin
from django.contrib.auth.admin import UserAdmin as BaseUserAdmin

from llmhub.admin_history import KeepsHistoryAdmin

from .models import ApiToken, User


@admin.register(User)
class UserAdmin(KeepsHistoryAdmin, BaseUserAdmin):
    list_display = ("username", "email", "gpu_quota", "is_active", "is_staff", "date_joined")
    list_editable = ("gpu_quota",)
    fieldsets = BaseUserAdmin.fieldsets + (
        ("Quota and limits", {
            "fields": ("gpu_quota", "rate_limit_per_minute", "max_held_requests", "max_api_tokens"),
            "description": "Empty limits follow the installation's settings (README, “Limits per user”); "
            "0 means no limit.",
        }),
    )  # fmt: skip

    def has_history(self, obj) -> bool:
        """A user whose instances ran has billable history: deactivate them instead."""
        return obj.deployments.filter(instances__started_at__isnull=False).exists()


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ("name", "user", "prefix", "created_at", "last_used_at", "revoked_at")
    list_filter = ("revoked_at",)
    search_fields = ("name", "user__username", "prefix")
    readonly_fields = ("prefix", "key_hash", "created_at", "last_used_at")
