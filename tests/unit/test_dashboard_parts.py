"""The dashboard's pure parts: the SVG charts, the last-hour series, the template filters."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from backburner.core.series import BOUNDS, MinuteSeries
from backburner.dashboard import charts
from backburner.dashboard.render import ago, pct, state_class


def test_nice_axis_tops() -> None:
    assert charts.nice_max(0) == 1.0
    assert charts.nice_max(7) == 10.0
    assert charts.nice_max(0.37) == 0.5
    assert charts.nice_max(120) == 200.0
    assert charts.nice_max(2400) == 2500.0


def test_chart_draws_lines_with_gaps_and_escapes_labels() -> None:
    svg = charts.line_chart(
        [charts.Line("a", [1.0, 2.0, None, 4.0, None, None, 3.0], "s-ok")],
        left="<old>",
        right="now",
        title='t"x',
    )
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert svg.count("<polyline") == 1  # 1,2 joined; 4 alone; 3 alone
    assert svg.count("<circle") == 2
    assert "&lt;old&gt;" in svg and "t&quot;x" in svg
    assert "style=" not in svg  # the pages' CSP allows no inline style


def test_minute_series_keeps_one_hour_and_its_quantiles() -> None:
    s = MinuteSeries()
    t0 = 1_800_000_000.0  # a minute boundary
    for i in range(100):
        s.observe(t0 + 1, 0.010 if i < 90 else 2.0, ok=i != 0)
    s.observe(t0 + 61, 0.5)
    points = s.points(t0 + 61)
    assert len(points) == 60
    before, last = points[-2], points[-1]
    assert (before.count, before.errors) == (100, 1)
    assert before.p50 is not None and 0.010 <= before.p50 < 0.013
    assert before.p95 is not None and 2.0 <= before.p95 < 2.6
    assert last.count == 1 and points[0].count == 0 and points[0].p50 is None
    # an hour later the old minutes are gone, not summed into new ones
    later = s.points(t0 + 3600 + 61)
    assert sum(p.count for p in later) == 0
    s.observe(t0 + 7200, 10_000.0)  # beyond the last bucket: counted in the open one
    assert s.points(t0 + 7200)[-1].p50 == BOUNDS[-1]


def test_filters() -> None:
    now = datetime(2026, 12, 4, tzinfo=UTC)
    assert ago(now - timedelta(seconds=30), now) == "30 s ago"
    assert ago(now + timedelta(hours=2), now) == "in 2.0 h"
    assert ago(None) == ""
    assert pct(5, 0) == 0.0 and pct(3, 2) == 100.0
    assert [state_class(s) for s in ("Success", "Failed", "In Progress", "Queued", "x")] == [
        "ok",
        "bad",
        "busy",
        "wait",
        "idle",
    ]
