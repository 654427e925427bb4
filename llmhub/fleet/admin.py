"""The operators' fleet console: GPU types, hosts (with cordon / drain / uncordon), instances, image pulls."""

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.core.exceptions import ValidationError
from django.template.response import TemplateResponse

from llmhub import crypto
from llmhub.accounts.models import User
from llmhub.admin_history import KeepsHistoryAdmin

from . import engine, services
from .models import GpuType, Host, ImagePull, Instance
from .selectors import hosts_with_gpus_used


@admin.register(GpuType)
class GpuTypeAdmin(admin.ModelAdmin):
    list_display = ("name", "memory_gb", "host_memory_gb_per_gpu", "hourly_price", "uses_devices")


class HostForm(forms.ModelForm):
    """Host fields plus the TLS client key, write-only: stored encrypted, never shown again."""

    tls_client_key = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 3, "autocomplete": "off"}),
        help_text="PEM of the client key (tcp:// engines). Stored encrypted and never shown; leave empty to keep the current one.",
    )
    gpu_count = forms.IntegerField(
        required=False,
        min_value=1,
        help_text="Leave empty to read it from the engine (GPUs it advertises with --node-generic-resource).",
    )

    class Meta:
        model = Host
        fields = (
            "name",
            "docker_url",
            "tls_ca_cert",
            "tls_client_cert",
            "address",
            "bind_address",
            "gpu_type",
            "gpu_count",
            "engine_image",
        )

    def clean(self):
        """Register the host through `services.host_register` (the one place its rules live) and show
        its ValidationError as field errors. The client key is write-only: empty keeps the stored one."""
        cleaned = super().clean()
        if self.errors:
            return cleaned
        key = cleaned.get("tls_client_key", "").strip() or crypto.decrypt(self.instance.tls_client_key_encrypted)
        ca, cert = cleaned.get("tls_ca_cert", ""), cleaned.get("tls_client_cert", "")
        try:
            host = services.host_register(
                host=self.instance, name=cleaned["name"], docker_url=cleaned["docker_url"],
                address=cleaned["address"], bind_address=cleaned.get("bind_address", ""),
                gpu_type=cleaned["gpu_type"], gpu_count=cleaned.get("gpu_count"),
                engine_image=cleaned["engine_image"],
                tls=engine.TlsCredentials(ca_cert=ca, client_cert=cert, client_key=key) if ca or cert or key else None,
            )  # fmt: skip
        except ValidationError as exc:
            self.add_error(None, exc)
            return cleaned
        self.instance = host
        cleaned.update({field: getattr(host, field) for field in HostForm.Meta.fields})
        return cleaned


@admin.register(Host)
class HostAdmin(admin.ModelAdmin):
    form = HostForm
    list_display = (
        "name", "state", "gpu_type", "gpus", "address", "bind_address", "docker_url", "heartbeat_at", "last_error",
    )  # fmt: skip
    list_filter = ("state", "gpu_type")
    search_fields = ("name", "address")
    readonly_fields = ("state", "resume_state", "engine_id", "heartbeat_at", "last_error", "created_at")
    actions = ("cordon", "drain", "uncordon", "prune_cache")

    def get_queryset(self, request):
        return hosts_with_gpus_used(super().get_queryset(request).select_related("gpu_type"))

    @admin.display(description="GPUs used")
    def gpus(self, host):
        return f"{host.gpus_used or 0} / {host.gpu_count}"

    def _transition(self, request, queryset, action, verb):
        changed = 0
        for host in queryset:
            try:
                changed += action(host=host)
            except ValidationError as exc:
                self.message_user(request, " ".join(exc.messages), messages.ERROR)
        self.message_user(request, f"{changed} host(s) {verb}.", messages.SUCCESS if changed else messages.WARNING)

    @admin.action(description="Cordon: take no new instances")
    def cordon(self, request, queryset):
        self._transition(request, queryset, services.host_cordon, "cordoned")

    @admin.action(description="Drain: move instances to other hosts, then cordon")
    def drain(self, request, queryset):
        self._transition(request, queryset, services.host_drain, "draining")

    @admin.action(description="Uncordon: take new instances again")
    def uncordon(self, request, queryset):
        self._transition(request, queryset, services.host_uncordon, "ready")

    @admin.action(description="Prune a user's model cache")
    def prune_cache(self, request, queryset):
        """Ask which user (an intermediate page), then remove that user's cache volume on each selected host."""
        form = PruneCacheForm(request.POST if "apply" in request.POST else None)
        if not form.is_valid():
            context = {**self.admin_site.each_context(request), "form": form, "hosts": queryset,
                       "title": "Prune a user's model cache", "opts": self.model._meta,
                       "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME}  # fmt: skip
            return TemplateResponse(request, "admin/fleet/host/prune_cache.html", context)
        user = form.cleaned_data["user"]
        for host in queryset:
            try:
                removed = services.owner_cache_prune(host=host, user=user)
            except ValidationError as exc:
                self.message_user(request, " ".join(exc.messages), messages.ERROR)
                continue
            verb = "pruned" if removed else "had no cache to prune"
            self.message_user(request, f"{host.name}: {user.username}'s model cache {verb}.", messages.SUCCESS)
        return None


class PruneCacheForm(forms.Form):
    user = forms.ModelChoiceField(queryset=User.objects.order_by("username"), to_field_name="username",
                                  help_text="Whose Hugging Face cache to remove on the selected hosts.")  # fmt: skip


@admin.register(Instance)
class InstanceAdmin(KeepsHistoryAdmin):
    list_display = ("id", "deployment", "host", "gpu_indexes", "state", "port", "restarts", "started_at", "stopped_at")
    list_filter = ("state", "host")
    search_fields = ("deployment__model_name", "container_id")
    raw_id_fields = ("deployment",)
    readonly_fields = ("gpu_type", "num_gpus", "started_at", "stopped_at")  # billable facts and run interval

    def has_history(self, obj) -> bool:
        """An instance that ran is billable history: never deleted."""
        return obj.started_at is not None


@admin.register(ImagePull)
class ImagePullAdmin(admin.ModelAdmin):
    list_display = ("image", "host", "state", "progress", "attempt", "started_at", "updated_at")
    list_filter = ("state", "host")
    readonly_fields = ("host", "image", "state", "attempt", "progress", "error", "started_at", "updated_at")
