"""A GPU type's `hourly_price` edited anywhere (admin, `gpu_type_ensure`) becomes a price effective now."""

from django.db.models.signals import post_save
from django.dispatch import receiver

from llmhub.fleet.models import GpuType


@receiver(post_save, sender=GpuType, dispatch_uid="billing-gpu-price-history")
def record_price_change(sender, instance: GpuType, raw: bool = False, **kwargs) -> None:
    if raw:
        return
    from .prices import gpu_price_record_current

    gpu_price_record_current(gpu_type=instance)
