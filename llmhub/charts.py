"""Small server-rendered SVG charts for the dashboard (no JavaScript needed to read a number)."""

from __future__ import annotations

from dataclasses import dataclass

from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

PALETTE = ("#4f46e5", "#16a34a", "#d97706", "#dc2626")


@dataclass(frozen=True)
class Series:
    label: str
    values: list[float]


def _nice_max(value: float) -> float:
    """The smallest 1/2/5 × 10^k at or above `value` (1 for 0)."""
    if value <= 0:
        return 1.0
    magnitude = 10 ** (len(str(int(value))) - 1) if value >= 1 else 1.0
    for step in (1, 2, 5, 10):
        if value <= step * magnitude:
            return float(step * magnitude)
    return float(10 * magnitude)


def line_chart(
    series: list[Series], x_labels: list[str], *, title: str, unit: str = "", width: int = 560, height: int = 180
) -> SafeString:
    """An SVG line chart of `series` over `x_labels` (same length), y from 0, with a legend and title.

    Values are plotted as given (requests, tokens, ms); `unit` is appended to the y-axis maximum.
    """
    left, right, top, bottom = 44, 8, 24, 22
    plot_w, plot_h = width - left - right, height - top - bottom
    n = max(len(x_labels), 1)
    top_value = _nice_max(max((v for s in series for v in s.values), default=0))

    def x(i: int) -> float:
        return left + (plot_w * i / (n - 1) if n > 1 else plot_w / 2)

    def y(v: float) -> float:
        return top + plot_h - plot_h * v / top_value

    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
        f'<text x="{left}" y="14" class="chart-title">{escape(title)}</text>',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" class="axis"/>',
        f'<line x1="{left}" y1="{top}" x2="{left + plot_w}" y2="{top}" class="grid"/>',
        f'<text x="{left - 4}" y="{top + 4}" text-anchor="end" class="tick">{top_value:g}{escape(unit)}</text>',
        f'<text x="{left - 4}" y="{top + plot_h}" text-anchor="end" class="tick">0</text>',
    ]
    if x_labels:
        parts.append(f'<text x="{left}" y="{height - 4}" class="tick">{escape(x_labels[0])}</text>')
        parts.append(
            f'<text x="{left + plot_w}" y="{height - 4}" text-anchor="end" class="tick">{escape(x_labels[-1])}</text>'
        )
    for k, s in enumerate(series):
        color = PALETTE[k % len(PALETTE)]
        points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(s.values))
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{points}"/>')
        legend_x = left + plot_w - 110 * (len(series) - k)
        parts.append(f'<rect x="{legend_x}" y="6" width="10" height="10" fill="{color}"/>')
        parts.append(f'<text x="{legend_x + 14}" y="15" class="legend">{escape(s.label)}</text>')
    parts.append("</svg>")
    return mark_safe("".join(parts))
