"""Server-rendered SVG charts (no JavaScript needed to read a number): the one chart module.

Two kinds: `line_chart` (the deployment page's traffic per minute) and `stacked_bars` (the billing
usage page's cost and GPU-hours per day, one segment per deployment). Both use one palette
(`colour`), one y scale (`nice_scale`: gridlines at 1, 2, 2.5 or 5 × 10^k) and the same CSS classes
(static/css/app.css: `.chart` with `.grid`, `.baseline`, `.tick`, `.chart-title`, `.chart-legend`,
`.chart-unit`). Every interpolated text is escaped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

PALETTE = ("#4f46e5", "#0891b2", "#16a34a", "#d97706", "#db2777", "#7c3aed", "#dc2626", "#0d9488", "#65a30d", "#9333ea")


@dataclass(frozen=True)
class Series:
    label: str
    values: list[float]


def colour(index: int) -> str:
    """The colour of the `index`-th series (the palette repeats after ten)."""
    return PALETTE[index % len(PALETTE)]


def nice_scale(maximum: float, ticks: int = 4) -> tuple[float, float]:
    """The y axis for values in [0, `maximum`]: (top, step), `step` being 1, 2, 2.5 or 5 × 10^k so that
    about `ticks` gridlines reach `maximum`, `top` the first multiple of `step` at or above it.
    A maximum of 0 (no data) gives (1, 0.25)."""
    if maximum <= 0:
        return 1.0, 1.0 / ticks
    raw = maximum / ticks
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next((f * magnitude for f in (1, 2, 2.5, 5) if raw <= f * magnitude), 10 * magnitude)
    return step * math.ceil(maximum / step - 1e-9), step


def _tick(value: float) -> str:
    return f"{value:,.0f}" if value >= 1000 else f"{value:g}"


def _y_axis(parts: list[str], *, top: float, step: float, y, left: float, right: float) -> None:
    """Dashed gridlines with their values at each step from 0 to `top`, and the solid baseline at 0."""
    k = 1
    while k * step <= top + 1e-9:
        ty = y(k * step)
        parts.append(f'<line x1="{left}" x2="{right}" y1="{ty:.1f}" y2="{ty:.1f}" class="grid"/>')
        parts.append(f'<text x="{left - 6}" y="{ty + 4:.1f}" text-anchor="end" class="tick">{_tick(k * step)}</text>')
        k += 1
    parts.append(f'<line x1="{left}" x2="{right}" y1="{y(0):.1f}" y2="{y(0):.1f}" class="baseline"/>')
    parts.append(f'<text x="{left - 6}" y="{y(0) + 4:.1f}" text-anchor="end" class="tick">0</text>')


def line_chart(
    series: list[Series], x_labels: list[str], *, title: str, unit: str = "", width: int = 560, height: int = 200
) -> SafeString:
    """An SVG line chart of `series` over `x_labels` (one value per label), y from 0, with title and legend.

    Values are plotted as given (requests, tokens, ms); `unit` (e.g. " ms") follows the tick values.
    """
    left, right, top, bottom = 52, 10, 30, 22
    plot_w, plot_h = width - left - right, height - top - bottom
    n = max(len(x_labels), 1)
    top_value, step = nice_scale(max((v for s in series for v in s.values), default=0))

    def x(i: int) -> float:
        return left + (plot_w * i / (n - 1) if n > 1 else plot_w / 2)

    def y(v: float) -> float:
        return top + plot_h - plot_h * v / top_value

    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}" '
        f'xmlns="http://www.w3.org/2000/svg"><title>{escape(title)}</title>',
        f'<text x="{left}" y="16" class="chart-title">{escape(title)}'
        + (f' <tspan class="chart-unit">({escape(unit.strip())})</tspan>' if unit.strip() else "")
        + "</text>",
    ]
    _y_axis(parts, top=top_value, step=step, y=y, left=left, right=left + plot_w)
    if x_labels:
        parts.append(f'<text x="{left}" y="{height - 6}" class="tick">{escape(x_labels[0])}</text>')
        parts.append(
            f'<text x="{left + plot_w}" y="{height - 6}" text-anchor="end" class="tick">{escape(x_labels[-1])}</text>'
        )
    legend_x = left + plot_w
    for k, s in reversed(list(enumerate(series))):
        legend_x -= 14 + 7 * len(s.label) + 14
        points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(s.values))
        parts.append(f'<polyline fill="none" stroke="{colour(k)}" stroke-width="2" points="{points}"/>')
        parts.append(f'<rect x="{legend_x}" y="7" width="10" height="10" rx="2" fill="{colour(k)}"/>')
        parts.append(f'<text x="{legend_x + 14}" y="16" class="chart-legend">{escape(s.label)}</text>')
    parts.append("</svg>")
    return mark_safe("".join(parts))


def stacked_bars(
    *, title: str, days: list[datetime], series: list[tuple[str, list[Decimal]]], unit: str, decimals: int
) -> SafeString:
    """An SVG bar per day stacking each series' value (series = [(label, one value per day)]); the y axis
    is in `unit` (e.g. "USD", "GPU-hours") and each bar segment has a tooltip with its exact value,
    `decimals` places. Series `k` has `colour(k)` (the page's legend uses the same)."""
    width, height = 1100, 260
    left, right, top, bottom = 64, 16, 16, 34
    totals = [sum((values[i] for _, values in series), Decimal(0)) for i in range(len(days))]
    top_value, step = nice_scale(float(max(totals, default=0)))
    plot_w, plot_h = width - left - right, height - top - bottom
    slot = plot_w / max(len(days), 1)
    bar_w = max(slot * 0.7, 2)

    def y(value: float) -> float:
        return top + plot_h - plot_h * value / top_value

    parts = [
        f'<svg class="chart wide" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}" '
        f'xmlns="http://www.w3.org/2000/svg"><title>{escape(title)}</title>'
    ]
    _y_axis(parts, top=top_value, step=step, y=y, left=left, right=width - right)
    parts.append(
        f'<text x="14" y="{top + plot_h / 2:.0f}" transform="rotate(-90 14 {top + plot_h / 2:.0f})" '
        f'text-anchor="middle" class="chart-unit">{escape(unit)}</text>'
    )
    for i, day in enumerate(days):
        x = left + i * slot + (slot - bar_w) / 2
        base = 0.0
        for k, (label, values) in enumerate(series):
            value = float(values[i])
            if value <= 0:
                continue
            y0, y1 = y(base), y(base + value)
            parts.append(
                f'<rect x="{x:.1f}" y="{y1:.1f}" width="{bar_w:.1f}" height="{max(y0 - y1, 0.5):.1f}" '
                f'fill="{colour(k)}"><title>{escape(label)}, {day:%b %d}: {value:,.{decimals}f} {escape(unit)}'
                f"</title></rect>"
            )
            base += value
        if len(days) <= 16 or i % 2 == 0:
            parts.append(
                f'<text x="{x + bar_w / 2:.1f}" y="{height - bottom + 16}" text-anchor="middle" class="tick">'
                f"{day.day}</text>"
            )
    parts.append("</svg>")
    return mark_safe("".join(parts))
