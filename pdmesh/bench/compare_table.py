"""The terminal table of ``pdmesh bench compare``: every side measured (the pdmesh deployments, then
the peer servers) and the ratios between them, each with the side it favours."""

from __future__ import annotations

import math
from typing import Any

# (ratio name, metric key in the bench JSON, table label, higher is better)
RATIOS = (
    ("goodput", "request_goodput", "Goodput at the SLO (req/s)", True),
    ("request_throughput", "request_throughput", "Request throughput (req/s)", True),
    ("output_throughput", "output_throughput", "Output throughput (tok/s)", True),
    ("p99_ttft", "p99_ttft_ms", "P99 TTFT (ms)", False),
    ("p99_tpot", "p99_tpot_ms", "P99 TPOT (ms)", False),
    ("mean_ttft", "mean_ttft_ms", "Mean TTFT (ms)", False),
    ("mean_tpot", "mean_tpot_ms", "Mean TPOT (ms)", False),
)
SHORT = {"pd": "PD", "colocated": "col"}  # ratio columns' names of pdmesh's sides
TITLE = {"pd": "PD", "colocated": "colocated"}


def ratio(ours: float | None, theirs: float | None) -> float | None:
    """``ours / theirs``, or None when either is missing or ``theirs`` is 0."""
    if ours is None or theirs is None or theirs == 0 or math.isnan(ours) or math.isnan(theirs):
        return None
    return ours / theirs


def compute_ratios(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, float | None]:
    """``ours / theirs`` of every compared metric (keys of ``RATIOS``) from two bench serve JSON dicts."""
    return {name: ratio(ours.get(key), theirs.get(key)) for name, key, _, _ in RATIOS}


def sides(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(key, bench serve JSON) of every side the report holds: pdmesh's deployments, then the peers."""
    found = [(key, report[key]) for key in ("pd", "colocated") if key in report]
    return found + list(report.get("peers", {}).items())


def ratio_columns(report: dict[str, Any]) -> list[tuple[str, str, dict[str, float | None]]]:
    """(numerator, denominator, ratios) of every ratio column: PD/colocated, then pdmesh/each peer."""
    columns = [("PD", "col", report["ratios"])] if report.get("ratios") else []
    for peer, by_side in report.get("peer_ratios", {}).items():
        columns += [(SHORT[key], peer, ratios) for key, ratios in by_side.items()]
    return columns


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ratio_cell(r: float | None, ours: str, theirs: str, higher_better: bool) -> str:
    if r is None or r == 1:
        return _fmt(r)
    return f"{_fmt(r)} {ours if (r > 1) == higher_better else theirs}"


def format_comparison(report: dict[str, Any]) -> str:
    """The terminal table: each metric for every side, and the ratios (with the side each favours)."""
    measured, columns = sides(report), ratio_columns(report)
    widths = [max(18, len(side["deployment"]["label"]) + 2) for _, side in measured]
    head = f"{'Metric':<30}" + "".join(
        f"{side['deployment']['label']:>{w}}" for (_, side), w in zip(measured, widths, strict=True)
    )
    head += "".join(f"{f'{a}/{b}':>{max(14, len(a) + len(b) + 8)}}" for a, b, _ in columns)
    names = " vs ".join(TITLE.get(key, key) for key, _ in measured)
    workload = report["workload"]
    lines = [
        f" {names} ({'same host' if report.get('peers') else 'same cores'}) ".center(len(head), "="),
        f"workload: {workload['dataset']} in={workload['input_len']} out={workload['output_len']} "
        f"n={workload['num_prompts']} rate={workload['request_rate']} "
        f"SLO: {' '.join(f'{k}<={v:g}ms' for k, v in workload['goodput'].items()) or 'none'}",
        head,
        "-" * len(head),
    ]
    for name, key, label, higher_better in RATIOS:
        row = f"{label:<30}" + "".join(
            f"{_fmt(side.get(key)):>{w}}" for (_, side), w in zip(measured, widths, strict=True)
        )
        for a, b, ratios in columns:
            row += f"{_ratio_cell(ratios[name], a, b, higher_better):>{max(14, len(a) + len(b) + 8)}}"
        lines.append(row)
    lines += [_side_line(side) for _, side in measured]
    lines += _prediction_lines(report.get("prediction"))
    lines.append("=" * len(head))
    return "\n".join(lines)


def _side_line(side: dict[str, Any]) -> str:
    dep = side["deployment"]
    where = f"at {dep['url']}" if dep.get("url") else f"workers on CPUs {dep['worker_cpus'] or 'unpinned'}"
    good = side["good_completed"] if side["good_completed"] is not None else "-"
    return (
        f"{dep['label']}: {side['completed']} ok, {side['failed']} failed, {good} met the SLO, "
        f"{side['duration_s']:.1f} s, {where}"
    )


def _prediction_lines(prediction: dict[str, Any] | None) -> list[str]:
    if not prediction:
        return []
    lines = ["planner check (simulated from the profile vs measured):"]
    for name in ("pd", "colocated"):
        p = prediction[name]
        lines.append(
            f"  {name:<9} goodput predicted {p['predicted_goodput']:.3f} measured {p['measured_goodput']:.3f} "
            f"req/s (rel. error {_fmt(p['goodput_rel_error'] and p['goodput_rel_error'] * 100, 1)}%); "
            f"attainment {p['predicted_attainment']:.1%} vs {p['measured_attainment']:.1%}"
        )
    return lines
