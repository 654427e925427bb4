"""Writes for GPU prices: the append-only price history of each GPU type (USD per GPU-hour) and the one
rounding of money.

Every price row is history: billing reads the rate in force at each moment from `metering.PriceBook`.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from llmhub.fleet.models import GpuType

from .metering import PriceBook
from .models import CENT, GpuPrice


def money(value: Decimal) -> Decimal:
    """`value` USD rounded half-up to cents (the one rounding, per invoice line)."""
    return value.quantize(CENT, rounding=ROUND_HALF_UP)


def gpu_price_record_current(*, gpu_type: GpuType, now: datetime | None = None) -> GpuPrice | None:
    """Make `gpu_type.hourly_price` (USD per GPU-hour) the price from `now` on, unless it already is.

    Called when a GPU type is saved (admin edit, `gpu_type_ensure`), so editing the price never changes
    what was billed before. Returns the new price row, or None when nothing changed.
    """
    now = now or timezone.now()
    in_force = PriceBook([gpu_type.id]).rate_at(gpu_type.id, now) if gpu_type.prices.exists() else None
    if in_force is not None and in_force == gpu_type.hourly_price:
        return None
    try:
        with transaction.atomic():
            return GpuPrice.objects.create(gpu_type=gpu_type, hourly_price=gpu_type.hourly_price, effective_at=now)
    except IntegrityError:  # two saves in the same microsecond: the first one stands
        return None


def gpu_price_schedule(
    *, gpu_type: GpuType, hourly_price: Decimal, effective_at: datetime, now: datetime | None = None
) -> GpuPrice:
    """Schedule a price (USD per GPU-hour) for `gpu_type` from `effective_at` on.

    Raises ValidationError when `effective_at` is in the past (prices never apply retroactively), the
    price is negative, or another price of the type starts at the same moment.
    """
    now = now or timezone.now()
    if effective_at < now - timedelta(seconds=60):
        raise ValidationError({"effective_at": "A price cannot start in the past: what was billed stays billed."})
    if hourly_price < 0:
        raise ValidationError({"hourly_price": "A price cannot be negative."})
    if GpuPrice.objects.filter(gpu_type=gpu_type, effective_at=effective_at).exists():
        raise ValidationError({"effective_at": "This GPU type already has a price starting at that moment."})
    price = GpuPrice.objects.create(gpu_type=gpu_type, hourly_price=hourly_price, effective_at=effective_at)
    gpu_prices_sync(now=now)
    return price


def gpu_prices_sync(*, now: datetime | None = None) -> int:
    """Copy the price in force now into `GpuType.hourly_price` (which cost estimates read) for every type
    whose scheduled price has come into force. Returns the number of types changed."""
    now = now or timezone.now()
    types = list(GpuType.objects.filter(prices__isnull=False).distinct())
    book = PriceBook(t.id for t in types)
    changed = 0
    for gpu_type in types:
        rate = book.rate_at(gpu_type.id, now)
        # A queryset update: no post_save, so no new price row for a price that is already history.
        changed += GpuType.objects.filter(id=gpu_type.id).exclude(hourly_price=rate).update(hourly_price=rate)
    return changed
