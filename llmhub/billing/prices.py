"""Writes for GPU prices: the append-only price history of each GPU type (USD per GPU-hour) and the one
rounding of money.

Every price row is history: billing reads the rate in force at each moment from `metering.PriceBook`.
"""

from __future__ import annotations

from datetime import datetime
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


def gpu_price_record_current(
    *, gpu_type: GpuType, previous: Decimal | None = None, now: datetime | None = None
) -> GpuPrice | None:
    """Make `gpu_type.hourly_price` (USD per GPU-hour) the price from `now` on when the save changed it.

    Called when a GPU type is saved (admin edit, `gpu_type_ensure`) with `previous`, the price stored
    before the save (None: a new type). A save that leaves the price as it was (e.g. an edit of another
    field while a scheduled price has come into force but the periodic sync has not copied it yet) never
    adds a price: it syncs instead, so a scheduled price cannot be undone. A changed price applies from
    now, never before, and scheduled later prices still apply from their time. Returns the new price row,
    or None when nothing changed.
    """
    now = now or timezone.now()
    has_history = gpu_type.prices.exists()
    if has_history and (previous is None or previous == gpu_type.hourly_price):
        gpu_prices_sync(now=now)
        return None
    in_force = PriceBook([gpu_type.id]).rate_at(gpu_type.id, now) if has_history else None
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

    Raises ValidationError when `effective_at` is before `now`, even by a second (prices never apply
    retroactively: what ran was billed at the price then), the price is negative, or another price of the
    type starts at the same moment.
    """
    now = now or timezone.now()
    if effective_at < now:
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
