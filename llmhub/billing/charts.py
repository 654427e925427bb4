"""Server-rendered SVG plots (no JavaScript): stacked bars per day, one colour per deployment."""

from __future__ import annotations

import math
from datetime import datetime
from decimal import Decimal

from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

PALETTE = ["#4f46e5", "#0891b2", "#16a34a", "#d97706", "#db2777", "#7c3aed", "#dc2626", "#0d9488", "#65a30d", "#9333ea"]
WIDTH, HEIGHT = 1100, 260
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 16, 34


def colour(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def _nice_step(maximum: float, ticks: int = 4) -> float:
    raw = maximum / ticks
    magnitude = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 2.5, 5, 10):
        if raw <= factor * magnitude:
            return factor * magnitude
    return 10 * magnitude


def stacked_bars(
    *, title: str, days: list[datetime], series: list[tuple[str, list[Decimal]]], unit: str, decimals: int
) -> SafeString:
    """An SVG bar per day stacking each series' value (series = [(label, one value per day)]); the y axis
    is in `unit` (e.g. "USD", "GPU-hours") and each bar segment has a tooltip with its exact value."""
    totals = [sum((values[i] for _, values in series), Decimal(0)) for i in range(len(days))]
    top = float(max(totals, default=0)) or 1.0
    step = _nice_step(top)
    top = step * math.ceil(top / step)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    slot = plot_w / max(len(days), 1)
    bar_w = max(slot * 0.7, 2)

    def y(value: float) -> float:
        return TOP + plot_h - plot_h * value / top

    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}" '
        f'xmlns="http://www.w3.org/2000/svg"><title>{escape(title)}</title>'
    ]
    tick = 0.0
    while tick <= top + 1e-9:
        ty = y(tick)
        parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{ty:.1f}" y2="{ty:.1f}" class="grid"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{ty + 4:.1f}" text-anchor="end" class="tick">{tick:g}</text>')
        tick += step
    parts.append(
        f'<text x="14" y="{TOP + plot_h / 2:.0f}" transform="rotate(-90 14 {TOP + plot_h / 2:.0f})" '
        f'text-anchor="middle" class="axis">{escape(unit)}</text>'
    )
    for i, day in enumerate(days):
        x = LEFT + i * slot + (slot - bar_w) / 2
        base = 0.0
        for s, (label, values) in enumerate(series):
            value = float(values[i])
            if value <= 0:
                continue
            y0, y1 = y(base), y(base + value)
            parts.append(
                f'<rect x="{x:.1f}" y="{y1:.1f}" width="{bar_w:.1f}" height="{max(y0 - y1, 0.5):.1f}" '
                f'fill="{colour(s)}"><title>{escape(label)}, {day:%b %d}: {value:,.{decimals}f} {escape(unit)}'
                f"</title></rect>"
            )
            base += value
        if len(days) <= 16 or i % 2 == 0:
            parts.append(
                f'<text x="{x + bar_w / 2:.1f}" y="{HEIGHT - BOTTOM + 16}" text-anchor="middle" class="tick">'
                f"{day.day}</text>"
            )
    parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(0):.1f}" y2="{y(0):.1f}" class="baseline"/></svg>')
    return mark_safe("".join(parts))  # every interpolated text is escaped above
