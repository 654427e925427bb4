from django.contrib import admin

from .models import GpuType, Host, Instance


@admin.register(GpuType)
class GpuTypeAdmin(admin.ModelAdmin):
    list_display = ("name", "memory_gb", "hourly_price", "uses_devices")


@admin.register(Host)
class HostAdmin(admin.ModelAdmin):
    list_display = ("name", "state", "gpu_type", "gpu_count", "address", "docker_url", "heartbeat_at")
    list_filter = ("state", "gpu_type")
    search_fields = ("name", "address")


@admin.register(Instance)
class InstanceAdmin(admin.ModelAdmin):
    list_display = ("id", "deployment", "host", "gpu_indexes", "state", "port", "started_at", "stopped_at")
    list_filter = ("state", "host")
    search_fields = ("deployment__model_name", "container_id")
    raw_id_fields = ("deployment",)
