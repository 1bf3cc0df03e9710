"""Line charts as inline SVG, drawn on the server: no chart library, nothing to load."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

WIDTH = 640
HEIGHT = 150
PAD_LEFT = 48
PAD_BOTTOM = 18
PAD_TOP = 8


@dataclass(frozen=True)
class Line:
    label: str
    values: Sequence[float | None]  # one per x step; None is a gap
    css: str  # the stroke's class (colours live in app.css)


def nice_max(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^k at or above ``value`` (an axis top)."""
    if value <= 0:
        return 1.0
    step = 1.0
    while step < value:
        step *= 10
    while step / 10 >= value:
        step /= 10
    for m in (0.1, 0.2, 0.25, 0.5, 1.0):
        if step * m >= value:
            return step * m
    return step


def fmt(value: float, unit: str) -> str:
    if unit == "s":
        return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"
    if value >= 1000:
        return f"{value / 1000:.1f}k"
    return f"{value:g}"


def line_chart(
    lines: Sequence[Line], *, unit: str = "", left: str = "", right: str = "", title: str = ""
) -> str:
    """An SVG chart of ``lines`` sharing one y axis from 0; ``left``/``right`` label the x ends."""
    n = max((len(line.values) for line in lines), default=0)
    top = nice_max(max((v for line in lines for v in line.values if v is not None), default=0.0))
    plot_w = WIDTH - PAD_LEFT - 4
    plot_h = HEIGHT - PAD_BOTTOM - PAD_TOP

    def x(i: int) -> float:
        return PAD_LEFT + (plot_w * i / max(n - 1, 1))

    def y(v: float) -> float:
        return PAD_TOP + plot_h * (1 - v / top)

    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img"'
        f' aria-label="{escape(title)}" preserveAspectRatio="none">',
    ]
    for frac in (0.0, 0.5, 1.0):
        gy = y(top * frac)
        parts.append(
            f'<line class="grid" x1="{PAD_LEFT}" x2="{WIDTH - 4}" y1="{gy:.1f}" y2="{gy:.1f}"/>'
            f'<text class="axis" x="{PAD_LEFT - 6}" y="{gy + 4:.1f}" text-anchor="end">'
            f"{escape(fmt(top * frac, unit))}</text>"
        )
    base = HEIGHT - 4
    parts.append(f'<text class="axis" x="{PAD_LEFT}" y="{base}">{escape(left)}</text>')
    parts.append(
        f'<text class="axis" x="{WIDTH - 4}" y="{base}" text-anchor="end">{escape(right)}</text>'
    )
    for line in lines:
        runs: list[list[str]] = [[]]
        for i, v in enumerate(line.values):
            if v is None:
                if runs[-1]:
                    runs.append([])
                continue
            runs[-1].append(f"{x(i):.1f},{y(v):.1f}")
        for run in runs:
            if len(run) == 1:
                cx, cy = run[0].split(",")
                parts.append(f'<circle class="{line.css}" cx="{cx}" cy="{cy}" r="2"/>')
            elif run:
                parts.append(f'<polyline class="{line.css}" points="{" ".join(run)}"/>')
    parts.append("</svg>")
    return "".join(parts)
