from django.contrib import admin

from .models import Deployment, DeploymentEvent


class DeploymentEventInline(admin.TabularInline):
    model = DeploymentEvent
    extra = 0
    readonly_fields = ("created_at", "kind", "message")
    can_delete = False


@admin.register(Deployment)
class DeploymentAdmin(admin.ModelAdmin):
    list_display = ("__str__", "status", "gpu_type", "num_gpus", "min_instances", "max_instances", "created_at")
    list_filter = ("status", "gpu_type")
    search_fields = ("model_name", "user__username", "hf_repo", "deploy_id")
    readonly_fields = ("deploy_id", "created_at", "updated_at", "deleted_at")
    exclude = ("hf_token_encrypted",)
    inlines = [DeploymentEventInline]


@admin.register(DeploymentEvent)
class DeploymentEventAdmin(admin.ModelAdmin):
    list_display = ("created_at", "deployment", "kind", "message")
    list_filter = ("kind",)
    search_fields = ("deployment__model_name", "message")
