"""The side-by-side PNG of ``pdmesh bench compare --plot``: goodput and throughput bars, and the CDFs
of TTFT and TPOT of every side (pdmesh's deployments, then the peers; matplotlib's Agg canvas, no
display; small files)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pdmesh.bench.compare_table import sides
from pdmesh.extras import require

COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown")


def _colored(report: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    return [(side, COLORS[i % len(COLORS)]) for i, (_, side) in enumerate(sides(report))]


def _bars(ax, report: dict[str, Any]) -> None:
    names = ("request_goodput", "request_throughput")
    x, colored = np.arange(len(names)), _colored(report)
    width = 0.8 / max(1, len(colored))
    for i, (side, color) in enumerate(colored):
        values = [side.get(n) or 0.0 for n in names]
        offset = (i - (len(colored) - 1) / 2) * width
        ax.bar(x + offset, values, width=width, color=color, label=side["deployment"]["label"])
    ax.set_xticks(x, ["goodput", "throughput"])
    ax.set_ylabel("req/s")
    ax.set_title("Goodput at the SLO and throughput")
    ax.legend(loc="lower right", fontsize=8)


def _cdf(ax, report: dict[str, Any], key: str, slo_key: str, title: str) -> None:
    for side, color in _colored(report):
        values = np.sort([v for v in side["per_request"][key] if v is not None])
        if len(values):
            label = side["deployment"]["label"]
            ax.step(
                values, np.arange(1, len(values) + 1) / len(values), where="post", color=color, label=label
            )
    limit = report["workload"]["goodput"].get(slo_key)
    if limit:
        ax.axvline(limit, color="tab:red", linestyle="--", label=f"SLO {limit:g} ms")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title)
    ax.set_xlabel("ms")
    ax.set_ylabel("fraction of requests")


def write_plot(report: dict[str, Any], path: str | Path) -> Path:
    """Writes the comparison's PNG to ``path`` (parents created); ``MissingExtra`` without matplotlib."""
    require("matplotlib", "bench", "the comparison's plot")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure = Figure(figsize=(12, 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    bars, ttft, tpot = figure.subplots(1, 3)
    _bars(bars, report)
    _cdf(ttft, report, "ttft_ms", "ttft", "TTFT CDF")
    _cdf(tpot, report, "tpot_ms", "tpot", "TPOT CDF")
    w = report["workload"]
    names = " vs ".join(side["deployment"]["label"] for side, _ in _colored(report))
    figure.suptitle(
        f"{names}: {w['dataset']} in={w['input_len']} out={w['output_len']} "
        f"rate={w['request_rate']} n={w['num_prompts']}",
        fontsize=10,
    )
    figure.savefig(path, format="png", dpi=80)
    return path
