"""Writes for the fleet: GPU types and hosts."""

from decimal import Decimal

from .models import GpuType, Host


def gpu_type_ensure(
    *, name: str, memory_gb: int = 0, hourly_price: Decimal = Decimal("0"), uses_devices: bool = True
) -> GpuType:
    """The GPU type `name`, created with these values when missing (an existing one is left as it is)."""
    gpu_type, _ = GpuType.objects.get_or_create(
        name=name, defaults={"memory_gb": memory_gb, "hourly_price": hourly_price, "uses_devices": uses_devices}
    )
    return gpu_type


def host_register(
    *, name: str, docker_url: str, address: str, gpu_type: GpuType, gpu_count: int, engine_image: str
) -> Host:
    """Create host `name` or update its engine URL, address, GPUs and engine image. Returns the host."""
    host, _ = Host.objects.update_or_create(
        name=name,
        defaults={
            "docker_url": docker_url,
            "address": address,
            "gpu_type": gpu_type,
            "gpu_count": gpu_count,
            "engine_image": engine_image,
        },
    )
    return host
