"""The one chart module: one scale, one palette, escaped text, for line charts and stacked bars."""

from datetime import datetime
from decimal import Decimal

import pytest

from llmhub import charts


@pytest.mark.parametrize(
    "maximum, scale",
    [(0, (1.0, 0.25)), (35.7, (40.0, 10.0)), (8000, (8000.0, 2000.0)), (107, (150.0, 50.0)), (0.9, (1.0, 0.25)),
     (10, (10.0, 2.5)), (0.03, (0.03, 0.01))],
)  # fmt: skip
def test_nice_scale_reaches_the_maximum_in_about_four_round_steps(maximum, scale):
    top, step = charts.nice_scale(maximum)

    assert (top, step) == pytest.approx(scale)
    assert top >= maximum and top / step <= 5


def test_line_charts_and_stacked_bars_share_the_palette_and_the_gridlines():
    line = charts.line_chart([charts.Series("p50", [1, 30]), charts.Series("p95", [2, 35.7])], ["07:00", "07:01"],
                             title="Latency", unit=" ms")  # fmt: skip
    bars = charts.stacked_bars(
        title="Cost", days=[datetime(2026, 3, 2), datetime(2026, 3, 3)], unit="USD", decimals=2,
        series=[("a", [Decimal(20), Decimal(0)]), ("b", [Decimal(15.7), Decimal(1)])],
    )  # fmt: skip

    for svg in (line, bars):
        assert charts.colour(0) in svg and charts.colour(1) in svg
        assert ">40</text>" in svg and ">30</text>" in svg and 'class="grid"' in svg  # both: 0..40 by 10


def test_chart_texts_are_escaped():
    svg = charts.line_chart([charts.Series("<script>", [1])], ["<b>"], title="a&b")
    bars = charts.stacked_bars(title="<t>", days=[datetime(2026, 3, 2)], series=[("<i>", [Decimal(1)])],
                               unit="<u>", decimals=0)  # fmt: skip

    assert "<script>" not in svg and "&lt;script&gt;" in svg and "a&amp;b" in svg and "<b>" not in svg
    assert "<i>" not in bars and "<u>" not in bars and "&lt;t&gt;" in bars
