"""The side-by-side PNG of ``pdmesh bench compare --plot``: goodput and throughput bars, and the CDFs
of TTFT and TPOT of both deployments (matplotlib's Agg canvas, no display; small files)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pdmesh.extras import require

SIDES = (("pd", "tab:blue"), ("colocated", "tab:orange"))


def _bars(ax, report: dict[str, Any]) -> None:
    names = ("request_goodput", "request_throughput")
    x = np.arange(len(names))
    for offset, (side, color) in zip((-0.2, 0.2), SIDES, strict=True):
        values = [report[side].get(n) or 0.0 for n in names]
        ax.bar(x + offset, values, width=0.4, color=color, label=report[side]["deployment"]["label"])
    ax.set_xticks(x, ["goodput", "throughput"])
    ax.set_ylabel("req/s")
    ax.set_title("Goodput at the SLO and throughput")
    ax.legend(loc="lower right", fontsize=8)


def _cdf(ax, report: dict[str, Any], key: str, slo_key: str, title: str) -> None:
    for side, color in SIDES:
        values = np.sort([v for v in report[side]["per_request"][key] if v is not None])
        if len(values):
            label = report[side]["deployment"]["label"]
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
    figure.suptitle(
        f"PD vs colocated: {w['dataset']} in={w['input_len']} out={w['output_len']} "
        f"rate={w['request_rate']} n={w['num_prompts']}",
        fontsize=10,
    )
    figure.savefig(path, format="png", dpi=80)
    return path
