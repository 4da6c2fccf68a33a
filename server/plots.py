"""Charts for the admin dashboard, drawn on the server with matplotlib and
inlined into the page as SVG (no JavaScript, no image requests).

Only matplotlib's object API is used (``Figure``, never ``pyplot``): pyplot
keeps global figure state, and handlers run in a thread pool.

Each plotted series is a ``<g id="series-NAME">`` element in the SVG, e.g.
``series-loss`` or ``series-rewards-margins``, so tests and styles can find it.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any

import matplotlib

matplotlib.use("Agg")

from markupsafe import Markup  # noqa: E402  (after choosing the backend)
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from store.leaderboard import HistoryPoint, version_order  # noqa: E402

COLORS = ["#2f6feb", "#d9480f", "#2b8a3e", "#862e9c"]
UP_COLOR, DOWN_COLOR = "#2b8a3e", "#c62828"
_STYLE = {
    "svg.fonttype": "none",  # text stays text: smaller, selectable, searchable
    "svg.hashsalt": "tuneloop",  # stable ids: the same data gives the same SVG
    "font.size": 9,
    "font.family": "sans-serif",
    "axes.spines.top": False,
    "axes.spines.right": False,
}


@dataclass(frozen=True)
class StepChart:
    """One chart of per-step training metrics: a title and the log keys it draws."""

    slug: str
    title: str
    keys: tuple[str, ...]
    ylabel: str


# The ORPO trainer's step logs (TRL ``ORPOTrainer``): keys of ``TrainingRun.metrics["steps"][i]``.
ORPO_CHARTS = (
    StepChart("loss", "ORPO loss", ("loss", "nll_loss"), "loss"),
    StepChart("log-odds", "Log odds ratio", ("log_odds_ratio",), "log odds ratio"),
    StepChart("accuracy", "Reward accuracy", ("rewards/accuracies",), "share of pairs"),
    StepChart("margin", "Reward margin (chosen − rejected)", ("rewards/margins",), "margin"),
)


def _slug(key: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", key.lower()).strip("-")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _svg(figure: Figure, svg_id: str, title: str) -> Markup:
    """The figure as an inline ``<svg>`` element (no XML prolog), labelled for screen readers."""
    buffer = io.StringIO()
    with matplotlib.rc_context({**_STYLE, "svg.id": svg_id}):
        figure.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = _without_inline_css(buffer.getvalue())
    text = text[text.index("<svg") :]
    text = text.replace("<svg ", f'<svg role="img" aria-label="{_escape_attr(title)}" ', 1)
    return Markup(text)


def _escape_attr(text: str) -> str:
    return text.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")


_STYLE_ATTRIBUTE = re.compile(r'\sstyle="([^"]*)"')
_STYLE_ELEMENT = re.compile(r"<style[^>]*>\s*\*\s*\{([^}]*)\}\s*</style>")


def _without_inline_css(svg: str) -> str:
    """The pages' Content-Security-Policy refuses inline CSS, so matplotlib's
    declarations become SVG presentation attributes, which are markup:
    ``style="fill: #fff"`` -> ``fill="#fff"``; its ``<style>*{...}</style>``
    defaults move to the root ``<svg>`` (the properties it sets are inherited)."""

    def attributes(declarations: str) -> str:
        pairs = (part.split(":", 1) for part in declarations.split(";") if ":" in part)
        return "".join(f' {name.strip()}="{_escape_attr(value.strip())}"' for name, value in pairs)

    defaults = _STYLE_ELEMENT.search(svg)
    svg = _STYLE_ATTRIBUTE.sub(lambda match: attributes(match.group(1)), _STYLE_ELEMENT.sub("", svg))
    if defaults:
        svg = svg.replace("<svg ", f"<svg{attributes(defaults.group(1))} ", 1)
    return svg


def _figure() -> Figure:
    with matplotlib.rc_context(_STYLE):
        figure = Figure(figsize=(6.0, 2.8), dpi=100)
        figure.subplots()
    return figure


SMOOTH_FROM = 20  # steps from which a chart adds a moving average


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values (shorter at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def step_chart(chart: StepChart, steps: Sequence[Mapping[str, Any]], svg_id: str | None = None) -> Markup | None:
    """A line chart of ``chart.keys`` over the steps (x: ``step``), or None when
    no step has any of those keys. Non-numeric and non-finite values are skipped."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for index, entry in enumerate(steps, start=1):
        x = _number(entry.get("step")) or float(index)
        for key in chart.keys:
            y = _number(entry.get(key))
            if y is not None:
                xs, ys = series.setdefault(key, ([], []))
                xs.append(x)
                ys.append(y)
    if not series:
        return None
    with matplotlib.rc_context(_STYLE):
        figure = _figure()
        axes = figure.axes[0]
        for color, (key, (xs, ys)) in zip(COLORS, series.items(), strict=False):
            noisy = len(xs) >= SMOOTH_FROM
            axes.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, linewidth=1.0 if noisy else 1.6,
                      alpha=0.35 if noisy else 1.0, color=color, label=None if noisy else key,
                      gid=f"series-{_slug(key)}")
            if noisy:  # per-step values of small batches jump around: show the trend over them
                axes.plot(xs, moving_average(ys, max(3, len(ys) // 10)), linewidth=2.0, color=color,
                          label=f"{key} (moving average)", gid=f"trend-{_slug(key)}")
        axes.set_title(chart.title, loc="left", fontsize=10)
        axes.set_xlabel("step")
        axes.set_ylabel(chart.ylabel)
        axes.grid(True, alpha=0.3)
        if len(series) > 1 or any(len(xs) >= SMOOTH_FROM for xs, _ in series.values()):
            axes.legend(frameon=False, fontsize=8)
        if chart.slug == "accuracy":
            axes.set_ylim(-0.05, 1.05)
        axes.xaxis.get_major_locator().set_params(integer=True)
    return _svg(figure, svg_id or f"chart-{chart.slug}", chart.title)


def training_charts(steps: Sequence[Mapping[str, Any]]) -> list[tuple[StepChart, Markup]]:
    """Every ORPO chart that has data, in :data:`ORPO_CHARTS` order."""
    charts = []
    for chart in ORPO_CHARTS:
        svg = step_chart(chart, steps)
        if svg is not None:
            charts.append((chart, svg))
    return charts


def daily_feedback_chart(days: Sequence[date], up: Sequence[int], down: Sequence[int]) -> Markup | None:
    """Stacked bars of thumbs up and down per day, or None when there are no days."""
    if not days:
        return None
    with matplotlib.rc_context(_STYLE):
        figure = _figure()
        axes = figure.axes[0]
        positions = list(range(len(days)))
        axes.bar(positions, up, color=UP_COLOR, label="up", gid="series-up")
        axes.bar(positions, down, bottom=up, color=DOWN_COLOR, label="down", gid="series-down")
        every = max(1, math.ceil(len(days) / 6))
        ticks = positions[::-1][::every][::-1]  # always label the last day
        axes.set_xticks(ticks, [days[i].strftime("%b %d") for i in ticks])
        axes.set_ylabel("ratings")
        axes.yaxis.get_major_locator().set_params(integer=True)
        axes.grid(True, axis="y", alpha=0.3)
        axes.legend(frameon=False, fontsize=8)
    return _svg(figure, "chart-feedback-daily", "Thumbs up and down per day")


def leaderboard_chart(history: Sequence[HistoryPoint], anchor_score: float) -> Markup | None:
    """Each version's leaderboard score as the votes accumulate (one refit per
    point, ``store.leaderboard.score_history``), or None without points. The x
    axis is the time of each point's last vote (the vote count where a time is
    missing or all points share one); a version's line starts at its first
    cross-version vote."""
    if not history:
        return None
    # a date axis around a single moment spans years: count votes instead
    dated = all(point.at is not None for point in history) and len({point.at for point in history}) > 1
    versions = sorted({v for point in history for v in point.scores}, key=version_order)
    palette = matplotlib.colormaps["tab10"]
    with matplotlib.rc_context(_STYLE):
        figure = _figure()
        axes = figure.axes[0]
        axes.axhline(anchor_score, color="#999999", linewidth=0.8, linestyle="--")
        for i, version in enumerate(versions):
            points = [p for p in history if version in p.scores]
            xs = [p.at if dated else p.votes for p in points]
            axes.plot(xs, [p.scores[version] for p in points], marker="o", markersize=3, linewidth=1.6,
                      color=palette(i % 10), label=version, gid=f"series-{_slug(version)}")
        axes.set_title("Score as the votes accumulate", loc="left", fontsize=10)
        axes.set_ylabel("score (Elo scale)")
        if dated:
            locator = AutoDateLocator()
            axes.xaxis.set_major_locator(locator)
            axes.xaxis.set_major_formatter(ConciseDateFormatter(locator))
        else:
            axes.set_xlabel("votes counted")
            axes.set_xlim(0, history[-1].votes * 1.05)
            axes.xaxis.get_major_locator().set_params(integer=True)
        axes.grid(True, alpha=0.3)
        axes.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _svg(figure, "chart-leaderboard", "Leaderboard score of each version as the votes accumulate")
