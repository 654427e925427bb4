"""The billing ledger: which seconds of which instance have been invoiced, and which are still owed.

Every invoice line keeps the exact instance intervals it bills (`InvoiceInterval`; negative `seconds`
for a credit). What is owed is the metered usage (`metering.usage_pieces`, from the run intervals as
recorded now) minus what the invoices already billed, per instance, week and rate, as interval sets:

    owed = metered − billed      (positive pieces: bill them)
    over = billed − metered      (negative pieces: credit them)

so a start or a stop recorded after its week's invoice shows up here and goes on the next invoice as an
adjustment, and no second is billed twice (the idea of Zulip's ``invoiced_through`` and Stripe's invoice
items, at the resolution of an interval).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from llmhub.fleet.models import Instance

from .metering import Metered, usage_pieces
from .models import InvoiceInterval
from .periods import WEEK, seconds_between, week_start

Span = tuple[datetime, datetime]


@dataclass(frozen=True)
class Entry(Metered):
    """A stretch of one instance's time in one week at one rate that the invoices do not match yet:
    `sign` +1 to bill it, -1 to credit it."""

    instance_id: int
    deployment_id: int
    week: datetime  # Monday 00:00 UTC
    hourly_rate: Decimal  # USD per GPU-hour
    num_gpus: int
    gpu_type_id: int
    host_name: str
    start: datetime
    end: datetime
    sign: int

    @property
    def seconds(self) -> Decimal:
        return self.sign * seconds_between(self.start, self.end)


def normalize(spans: list[Span]) -> list[Span]:
    """`spans` sorted and merged where they touch or overlap."""
    out: list[Span] = []
    for s, e in sorted(x for x in spans if x[1] > x[0]):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def minus(spans: list[Span], holes: list[Span]) -> list[Span]:
    """The parts of `spans` outside `holes` (both normalized), normalized."""
    out = []
    for s, e in spans:
        for hs, he in holes:
            if he <= s or hs >= e:
                continue
            if hs > s:
                out.append((s, hs))
            s = max(s, he)
            if s >= e:
                break
        if s < e:
            out.append((s, e))
    return out


def week_starts(start: datetime, end: datetime) -> list[datetime]:
    """Monday 00:00 UTC of every week from `start`'s week up to `end`."""
    week, weeks = week_start(start), []
    while week < end:
        weeks.append(week)
        week += WEEK
    return weeks


def metered_by_key(*, user_id: int, end: datetime, now: datetime) -> dict[tuple, list]:
    """{(instance id, week, rate): [metering pieces]} of the user's usage before `end`, as recorded now."""
    first = (
        Instance.objects.filter(deployment__user_id=user_id, started_at__isnull=False)
        .order_by("started_at")
        .values_list("started_at", flat=True)
        .first()
    )
    if first is None or first >= end:
        return {}
    pieces = usage_pieces(start=first, end=end, now=now, user_ids=[user_id], boundaries=week_starts(first, end))
    out = defaultdict(list)
    for piece in pieces:
        out[(piece.instance_id, week_start(piece.start), piece.hourly_rate)].append(piece)
    return out


def billed_by_key(*, user_id: int) -> dict[tuple, tuple[list[Span], list[Span]]]:
    """{(instance id, week, rate): (billed spans, credited spans)} over all the user's invoices."""
    out: dict[tuple, tuple[list, list]] = defaultdict(lambda: ([], []))
    rows = InvoiceInterval.objects.filter(line__invoice__account__user_id=user_id).values_list(
        "instance_id", "line__week_start", "line__hourly_rate", "start", "end", "seconds"
    )
    for instance_id, week, rate, start, end, seconds in rows:
        out[(instance_id, week, rate)][0 if seconds >= 0 else 1].append((start, end))
    return out


def net_billed(billed: list[Span], credited: list[Span]) -> list[Span]:
    """The seconds the invoices bill in the end: billed minus credited."""
    return minus(normalize(billed), normalize(credited))


def ledger_entries(*, user_id: int, end: datetime, now: datetime) -> list[Entry]:
    """What the user's invoices still owe or over-bill for usage before `end` (an account's cut-off, a
    Monday 00:00 UTC), as of `now`: entries sorted by week, instance, start. Empty when the invoices
    match the run intervals exactly."""
    metered = metered_by_key(user_id=user_id, end=end, now=now)
    billed = billed_by_key(user_id=user_id)
    facts = {}
    for key, pieces in metered.items():
        p = pieces[0]
        facts[key] = (p.deployment_id, p.num_gpus, p.gpu_type_id, p.host_name)
    missing = [key for key in billed if key not in facts and key[1] < end]
    if missing:
        for instance in Instance.objects.filter(id__in={k[0] for k in missing}).select_related("host"):
            for key in missing:
                if key[0] == instance.id:
                    facts[key] = (
                        instance.deployment_id,
                        instance.num_gpus or instance.deployment.num_gpus,
                        instance.gpu_type_id or instance.deployment.gpu_type_id,
                        instance.host.name if instance.host else "",
                    )
    entries = []
    for key in set(metered) | {k for k in billed if k[1] < end}:
        instance_id, week, rate = key
        have = normalize([(p.start, p.end) for p in metered.get(key, [])])
        done = net_billed(*billed[key]) if key in billed else []
        deployment_id, num_gpus, gpu_type_id, host_name = facts[key]
        for sign, spans in ((1, minus(have, done)), (-1, minus(done, have))):
            entries.extend(
                Entry(instance_id, deployment_id, week, rate, num_gpus, gpu_type_id, host_name, s, e, sign)
                for s, e in spans
            )
    return sorted(entries, key=lambda x: (x.week, x.instance_id, x.start, x.sign))
