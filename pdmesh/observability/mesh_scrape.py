"""The mesh-wide ``/metrics``: the coordinator's own series plus every worker's and the controller's,
scraped concurrently and merged into one valid Prometheus text exposition (one scrape target is enough,
as with MindIE-MS's coordinator).

Merging is by metric family: each family's HELP and TYPE appear once, with the samples of every target
under it. Worker series carry ``pdmesh_instance`` already; a scraped sample without that label (say a
worker's ``process_cpu_seconds_total``) gets ``pdmesh_instance="<target>"``, so that the same series
from two processes never collide. A target that does not answer within the timeout is left out and
counted in ``pdmesh_coordinator_scrape_failures_total{target}``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

import httpx
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from pdmesh.observability.coordinator_metrics import SCRAPE_FAILURES

log = logging.getLogger(__name__)

INSTANCE_LABEL = "pdmesh_instance"
SCRAPE_TIMEOUT_S = 2.0  # a scraper's own timeout is usually 10 s: the slowest target must not eat it


class _Families:
    """A one-off collector handing ``generate_latest`` the merged families."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> list[Metric]:
        return self._families


def merge(own: str, scraped: Iterable[tuple[str, str]]) -> str:
    """The ``own`` exposition plus each ``(target, exposition text)``'s, merged by family, as
    Prometheus text. Both sides are parsed from text, so that a counter's ``_created`` series is its
    own family on each (as the text format has it).

    Raises ValueError for text that does not parse (``fetch`` checks scraped text first).
    """
    merged: dict[str, Metric] = {}
    for target, text in [(None, own), *scraped]:
        for family in text_string_to_metric_families(text):
            _add(merged, family, target)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(merged.values()))
    return generate_latest(registry).decode()


def _add(merged: dict[str, Metric], family: Metric, target: str | None) -> None:
    into = merged.get(family.name)
    if into is None:
        into = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
    elif into.type != family.type:
        log.warning(
            "metric %s is a %s at %s, a %s elsewhere; left out", family.name, family.type, target, into.type
        )
        return
    for sample in family.samples:
        if target is not None and INSTANCE_LABEL not in sample.labels:
            sample = sample._replace(labels={**sample.labels, INSTANCE_LABEL: target})
        into.samples.append(sample)


async def fetch(client: httpx.AsyncClient, target: str, address: str) -> tuple[str, str] | None:
    """One target's exposition, checked to parse; None (and a failure counted) when it cannot be had."""
    try:
        response = await client.get(f"http://{address}/metrics")
        response.raise_for_status()
        text = response.text
        for _ in text_string_to_metric_families(text):
            pass
        return target, text
    except (httpx.HTTPError, ValueError) as exc:
        log.info("could not scrape %s at %s: %s", target, address, exc or type(exc).__name__)
        SCRAPE_FAILURES.labels(target).inc()
        return None


async def scrape_mesh(targets: dict[str, str], timeout_s: float = SCRAPE_TIMEOUT_S) -> str:
    """This process's series and every ``{target name: host:port}`` target's, merged."""
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        answers = await asyncio.gather(*(fetch(client, name, addr) for name, addr in targets.items()))
    return merge(generate_latest(REGISTRY).decode(), [a for a in answers if a is not None])
