from django.contrib import admin

from llmhub.admin_history import KeepsHistoryAdmin

from .models import Deployment, DeploymentEvent
from .services import deployment_delete


class DeploymentEventInline(admin.TabularInline):
    model = DeploymentEvent
    extra = 0
    readonly_fields = ("created_at", "kind", "message")
    can_delete = False


@admin.register(Deployment)
class DeploymentAdmin(KeepsHistoryAdmin):
    list_display = ("__str__", "status", "gpu_type", "num_gpus", "min_instances", "max_instances", "created_at")
    list_filter = ("status", "gpu_type")
    search_fields = ("model_name", "user__username", "hf_repo", "deploy_id")
    readonly_fields = ("deploy_id", "status", "created_at", "updated_at", "deleted_at")
    # Fixed after create: billing keeps what each instance was placed with, and the status belongs to the
    # reconciler, the spending limit (billing account actions) and deletion.
    fixed_after_create = ("gpu_type", "num_gpus", "model_name", "hf_repo")
    exclude = ("hf_token_encrypted",)
    inlines = [DeploymentEventInline]
    actions = ["delete_keeping_history"]

    def get_readonly_fields(self, request, obj=None):
        return self.readonly_fields + (self.fixed_after_create if obj is not None else ())

    def get_deleted_objects(self, objs, request):
        """Deleting keeps instances and events (history for invoices): only the deployments are listed."""
        return [str(obj) for obj in objs], {}, set(), []

    def delete_model(self, request, obj):
        """The trash icon's service: status `deleting`, containers stopped, history kept."""
        deployment_delete(deployment=obj)

    def delete_queryset(self, request, queryset):
        for deployment in queryset:
            deployment_delete(deployment=deployment)

    @admin.action(description="Delete (stop, keep history for invoices)", permissions=["delete"])
    def delete_keeping_history(self, request, queryset):
        self.delete_queryset(request, queryset)


@admin.register(DeploymentEvent)
class DeploymentEventAdmin(admin.ModelAdmin):
    list_display = ("created_at", "deployment", "kind", "message")
    list_filter = ("kind",)
    search_fields = ("deployment__model_name", "message")
