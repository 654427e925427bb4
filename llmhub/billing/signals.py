"""A GPU type's `hourly_price` edited anywhere (admin, `gpu_type_ensure`) becomes a price effective now;
a save that does not change it adds no price (see `prices.gpu_price_record_current`)."""

from django.db.models.signals import post_save, pre_save
from django.dispatch import receiver

from llmhub.fleet.models import GpuType


@receiver(pre_save, sender=GpuType, dispatch_uid="billing-gpu-price-before")
def remember_price(sender, instance: GpuType, raw: bool = False, **kwargs) -> None:
    stored = (
        GpuType.objects.filter(pk=instance.pk).values_list("hourly_price", flat=True).first() if instance.pk else None
    )
    instance._billing_previous_price = stored


@receiver(post_save, sender=GpuType, dispatch_uid="billing-gpu-price-history")
def record_price_change(sender, instance: GpuType, raw: bool = False, **kwargs) -> None:
    if raw:
        return
    from .prices import gpu_price_record_current

    gpu_price_record_current(gpu_type=instance, previous=getattr(instance, "_billing_previous_price", None))
