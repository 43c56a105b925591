"""Reports of a serving benchmark: the terminal table (vLLM's layout), the JSON file and the PNG plot.

The JSON holds every ``BenchMetrics`` field under its own name (``request_throughput``,
``mean_ttft_ms``, ``p99_e2el_ms``, ``completed``, ``failed``, ``errors``...), the run's parameters
(``base_url``, ``endpoint``, ``model``, ``dataset``, ``num_prompts``, ``request_rate``...), ``date``,
``timeline_output_throughput`` (output tokens/s in 1 s bins) and ``per_request`` (lengths and
latencies of the successful requests).

The plot uses matplotlib's Agg canvas directly (no pyplot, no display): histograms of TTFT, TPOT
and E2E latency, and output throughput over time.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from pdmesh.bench.host import host_info
from pdmesh.bench.metrics import throughput_timeline
from pdmesh.extras import require

if TYPE_CHECKING:
    from pdmesh.bench.serve import BenchResult

log = logging.getLogger(__name__)

WIDTH = 50
SECTIONS = (
    ("ttft", "TTFT", "Time to First Token"),
    ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
    ("itl", "ITL", "Inter-token Latency"),
    ("e2el", "E2EL", "End-to-end Latency"),
)
TABLE_STATS = (("mean", "Mean"), ("median", "Median"), ("p90", "P90"), ("p99", "P99"))
MAX_ERRORS_SHOWN = 5


def _line(label: str, value: object) -> str:
    if isinstance(value, float):
        value = f"{value:.2f}"
    return f"{label:<40} {value!s:<10}"


def _header(title: str, fill: str = "-") -> str:
    return f" {title} ".center(WIDTH, fill)


def _summary_lines(result: BenchResult) -> list[str]:
    m, c = result.metrics, result.config
    lines = [
        _line("Successful requests:", m.completed),
        _line("Failed requests:", m.failed),
        _line("Maximum request concurrency:", c.max_concurrency if c.max_concurrency else "unlimited"),
        _line("Request rate configured (RPS):", "inf" if c.request_rate == float("inf") else c.request_rate),
        _line("Benchmark duration (s):", m.duration_s),
        _line("Total input tokens:", m.total_input_tokens),
        _line("Total generated tokens:", m.total_output_tokens),
        _line("Request throughput (req/s):", m.request_throughput),
    ]
    if m.request_goodput is not None:
        lines.append(_line("Goodput SLOs (ms):", " ".join(f"{k}<={v:g}" for k, v in c.goodput.items())))
        lines.append(_line("Request goodput (req/s):", m.request_goodput))
    lines += [
        _line("Output token throughput (tok/s):", m.output_throughput),
        _line("Peak output token throughput (tok/s):", m.peak_output_throughput),
        _line("Total token throughput (tok/s):", m.total_token_throughput),
    ]
    return lines


def _error_lines(result: BenchResult) -> list[str]:
    counts = Counter((e["status"], e["message"]) for e in result.metrics.errors)
    if not counts:
        return []
    lines = [_header("Errors")]
    for (status, message), count in counts.most_common(MAX_ERRORS_SHOWN):
        lines.append(f"{count:>5} x [{status if status is not None else '-'}] {message[:200]}")
    if len(counts) > MAX_ERRORS_SHOWN:
        lines.append(f"      ... and {len(counts) - MAX_ERRORS_SHOWN} more kinds (see --json)")
    return lines


def format_table(result: BenchResult) -> str:
    """The results as vLLM prints them: the summary, then mean/median/p90/p99 of each latency in ms."""
    lines = [_header("Serving Benchmark Result", "="), *_summary_lines(result)]
    metrics = result.metrics.to_dict()
    for key, short, title in SECTIONS:
        lines.append(_header(title))
        for stat, label in TABLE_STATS:
            lines.append(_line(f"{label} {short} (ms):", metrics[f"{stat}_{key}_ms"]))
    lines += _error_lines(result)
    lines.append("=" * WIDTH)
    return "\n".join(lines)


def _per_request(result: BenchResult) -> dict[str, list]:
    ok = [out for out in result.outputs if out.success]
    return {
        "input_lens": [out.prompt_len for out in ok],
        "output_lens": [out.output_tokens for out in ok],
        "ttft_ms": [out.ttft * 1000.0 for out in ok],
        "tpot_ms": [None if out.tpot is None else out.tpot * 1000.0 for out in ok],
        "e2el_ms": [out.latency * 1000.0 for out in ok],
    }


def result_to_dict(result: BenchResult) -> dict:
    """Every metric, the errors and the run's parameters, with stable snake_case keys."""
    data = result.config.params()
    data["model"] = result.model
    data["date"] = result.started_at
    data.update(result.metrics.to_dict())
    data["timeline_output_throughput"] = throughput_timeline(result.outputs)
    data["per_request"] = _per_request(result)
    data.update(host_info())
    return data


def write_json(result: BenchResult, path: str | Path) -> Path:
    """Writes ``result_to_dict`` to ``path`` (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result_to_dict(result), indent=2) + "\n", encoding="utf-8")
    log.info("wrote %s", path)
    return path


def _histogram(ax, values_ms: list[float], title: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("ms")
    ax.set_ylabel("requests")
    if not values_ms:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        return
    ax.hist(values_ms, bins=min(50, max(5, len(values_ms) // 2)), color="tab:blue", alpha=0.8)
    mean = sum(values_ms) / len(values_ms)
    ax.axvline(mean, color="tab:red", linestyle="--", label=f"mean {mean:.1f} ms")
    ax.legend(loc="upper right")


def _timeline(ax, result: BenchResult) -> None:
    series = throughput_timeline(result.outputs)
    ax.set_title("Output throughput over time")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("output tokens/s")
    if not series:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        return
    ax.bar(range(len(series)), series, width=1.0, align="edge", color="tab:green", alpha=0.8)
    ax.axhline(result.metrics.output_throughput, color="tab:red", linestyle="--", label="run average")
    ax.legend(loc="upper right")


def write_plot(result: BenchResult, path: str | Path) -> Path:
    """Writes the latency histograms and the throughput timeline to ``path`` (PNG, Agg backend);
    ``MissingExtra`` without matplotlib."""
    require("matplotlib", "bench", "the benchmark's plot")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    per_request = _per_request(result)
    figure = Figure(figsize=(12, 8), layout="constrained")
    FigureCanvasAgg(figure)
    (ttft, tpot), (e2el, timeline) = figure.subplots(2, 2)
    _histogram(ttft, per_request["ttft_ms"], "Time to first token")
    _histogram(tpot, [v for v in per_request["tpot_ms"] if v is not None], "Time per output token")
    _histogram(e2el, per_request["e2el_ms"], "End-to-end latency")
    _timeline(timeline, result)
    m = result.metrics
    figure.suptitle(
        f"{result.model} @ {result.config.base_url}{result.config.endpoint}: "
        f"{m.completed} ok, {m.failed} failed, {m.output_throughput:.1f} output tok/s"
    )
    figure.savefig(path, format="png", dpi=100)
    log.info("wrote %s", path)
    return path
