"""Each existing GPU type's price becomes its first price-history row (in force from now on; before a
type's first price, that first price applies, so earlier uptime is billed at it)."""

from django.db import migrations
from django.utils import timezone


def forwards(apps, schema_editor):
    GpuType = apps.get_model("fleet", "GpuType")
    GpuPrice = apps.get_model("billing", "GpuPrice")
    now = timezone.now()
    for gpu_type in GpuType.objects.all():
        if not GpuPrice.objects.filter(gpu_type=gpu_type).exists():
            GpuPrice.objects.create(gpu_type=gpu_type, hourly_price=gpu_type.hourly_price, effective_at=now)


class Migration(migrations.Migration):
    dependencies = [("billing", "0001_initial")]
    operations = [migrations.RunPython(forwards, migrations.RunPython.noop)]
