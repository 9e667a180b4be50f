"""Small charts drawn on the server as inline SVG: the status page needs no script, font or
file from anywhere, and reads the same with no network at all.

Values are escaped; sizes are in CSS pixels and the drawings scale to the page's width.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

Point = tuple[float, float]  # (unix time, value)


@dataclass(frozen=True)
class Mark:
    """One event on a timeline: when, what (a tooltip), and its kind (a CSS class)."""

    at: float  # unix time
    label: str
    kind: str = ""


def _time(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%m-%d %H:%M")


def line_chart(
    points: Sequence[Point],
    *,
    forecast: Sequence[Point] = (),
    limit: float | None = None,
    label: Callable[[float], str] = lambda value: f"{value:,.0f}",
    title: str = "",
    width: int = 640,
    height: int = 160,
) -> str:
    """A line over time (solid), its forecast (dashed) and a limit (a red rule)."""
    if not points:
        return '<p class="empty">no data yet</p>'
    every = [*points, *forecast]
    t0, t1 = min(t for t, _ in every), max(t for t, _ in every)
    values = [v for _, v in every] + ([limit] if limit is not None else [])
    top = max(values) * 1.05 or 1.0
    left, bottom, right, upper = 60, height - 20, width - 8, 8
    span = (t1 - t0) or 1.0

    def x(t: float) -> float:
        return left + (right - left) * (t - t0) / span

    def y(v: float) -> float:
        return bottom - (bottom - upper) * v / top

    def path(series: Sequence[Point]) -> str:
        return " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in series)

    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{html.escape(title)}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{html.escape(title)}</title>",
        f'<line class="axis" x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}"/>',
        f'<text class="tick" x="{left - 4}" y="{upper + 10}" text-anchor="end">'
        f"{html.escape(label(top))}</text>",
        f'<text class="tick" x="{left - 4}" y="{bottom}" text-anchor="end">0</text>',
        f'<text class="tick" x="{left}" y="{height - 4}">{_time(t0)}</text>',
        f'<text class="tick" x="{right}" y="{height - 4}" text-anchor="end">{_time(t1)}</text>',
        f'<polyline class="series" points="{path(points)}"/>',
    ]
    if forecast:
        joined = [points[-1], *forecast]
        parts.append(f'<polyline class="forecast" points="{path(joined)}"/>')
    if limit is not None:
        parts.append(
            f'<line class="limit" x1="{left}" y1="{y(limit):.1f}" x2="{right}" '
            f'y2="{y(limit):.1f}"><title>{html.escape(label(limit))}</title></line>'
        )
    for t, v in points[-1:]:
        parts.append(
            f'<circle class="dot" cx="{x(t):.1f}" cy="{y(v):.1f}" r="3">'
            f"<title>{html.escape(_time(t))}: {html.escape(label(v))}</title></circle>"
        )
    parts.append("</svg>")
    return "".join(parts)


def timeline(
    marks: Sequence[Mark],
    *,
    start: float,
    end: float,
    title: str = "",
    width: int = 640,
    height: int = 56,
) -> str:
    """Events on a line from ``start`` to ``end`` (backups, say), one dot each."""
    left, right, middle = 8, width - 8, height / 2 - 6
    span = (end - start) or 1.0
    parts = [
        f'<svg class="chart timeline" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{html.escape(title)}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{html.escape(title)}</title>",
        f'<line class="axis" x1="{left}" y1="{middle}" x2="{right}" y2="{middle}"/>',
        f'<text class="tick" x="{left}" y="{height - 4}">{_time(start)}</text>',
        f'<text class="tick" x="{right}" y="{height - 4}" text-anchor="end">{_time(end)}</text>',
    ]
    for mark in marks:
        if not start <= mark.at <= end:
            continue
        cx = left + (right - left) * (mark.at - start) / span
        parts.append(
            f'<circle class="mark {html.escape(mark.kind)}" cx="{cx:.1f}" cy="{middle}" r="5">'
            f"<title>{html.escape(mark.label)}</title></circle>"
        )
    parts.append("</svg>")
    return "".join(parts)
