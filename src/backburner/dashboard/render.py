"""Templates and the filters they use; the environment is built when the dashboard is mounted."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from importlib.resources import files
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup

TEMPLATES = str(files("backburner.dashboard") / "templates")
STATIC = str(files("backburner.dashboard") / "static")


def ago(t: datetime | None, now: datetime | None = None) -> str:
    if t is None:
        return ""
    s = ((now or datetime.now(UTC)) - t).total_seconds()
    if s < 0:
        s = -s
        fmt = "in {}"
    else:
        fmt = "{} ago"
    if s < 60:
        return fmt.format(f"{s:.0f} s")
    if s < 3600:
        return fmt.format(f"{s / 60:.0f} min")
    if s < 86400:
        return fmt.format(f"{s / 3600:.1f} h")
    return fmt.format(f"{s / 86400:.1f} d")


def when(t: datetime | None) -> str:
    return "" if t is None else t.strftime("%Y-%m-%d %H:%M:%S")


def num(n: int | float | None) -> str:
    return "" if n is None else f"{n:,}"


def span(a: datetime | None, b: datetime | None) -> str:
    """The time from ``a`` to ``b`` (or now), short."""
    if a is None:
        return ""
    s = ((b or datetime.now(UTC)) - a).total_seconds()
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 120:
        return f"{s:.1f} s"
    return f"{s / 60:.1f} min"


def pretty(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False, default=str)


def pct(part: int, whole: int) -> float:
    return 0.0 if whole <= 0 else min(100.0, 100.0 * part / whole)


def seconds(v: float | None) -> str:
    if v is None:
        return "\u2013"
    return f"{v * 1000:.0f} ms" if v < 1 else f"{v:.2f} s"


def state_class(state: str) -> str:
    """A CSS class for any status string: ok, bad, busy, wait or idle."""
    s = state.lower()
    if s in ("success", "completed", "delivered", "ok", "live", "enabled"):
        return "ok"
    if s in ("failed", "expired", "cancelled", "error", "revoked", "disabled"):
        return "bad"
    if s in ("in progress", "in_progress", "finalizing", "validating", "cancelling"):
        return "busy"
    if s in ("queued", "pending"):
        return "wait"
    return "idle"


def environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
        auto_reload=False,
    )
    env.filters.update(
        ago=ago, when=when, num=num, pretty=pretty, seconds=seconds, state_class=state_class
    )
    env.globals.update(span=span, pct=pct, Markup=Markup)
    return env
