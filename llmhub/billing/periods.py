"""Billing periods, all in UTC: weeks run Monday 00:00 to Monday 00:00, months are calendar months."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

WEEK = timedelta(days=7)


def week_start(moment: datetime) -> datetime:
    """Monday 00:00 UTC of the week holding `moment` (an aware datetime)."""
    day = moment.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return day - timedelta(days=day.weekday())


def month_start(moment: datetime) -> datetime:
    """The first day of `moment`'s month, 00:00 UTC."""
    return moment.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def next_month(start: datetime) -> datetime:
    """The first day of the month after the one starting at `start`, 00:00 UTC."""
    return (start.replace(day=28) + timedelta(days=4)).replace(day=1)


def day_starts(start: datetime, end: datetime) -> list[datetime]:
    """00:00 UTC of every day from `start`'s day up to (excluding) `end`."""
    day = start.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    days = []
    while day < end:
        days.append(day)
        day += timedelta(days=1)
    return days


def seconds_between(start: datetime, end: datetime) -> Decimal:
    """Exact seconds from `start` to `end` (microsecond resolution) as a Decimal; 0 when end ≤ start."""
    delta = end - start
    if delta <= timedelta(0):
        return Decimal(0)
    return Decimal(delta.days * 86400 + delta.seconds) + Decimal(delta.microseconds) / Decimal(1_000_000)
