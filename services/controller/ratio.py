"""The P:D ratio: parsing the target, measuring demand and deciding how many prefill instances to run.

Pure logic with an injectable clock (no I/O): ``RatioPolicy.decide`` says how many of the
prefill/decode instances should be prefill, moving at most one instance per decision, never below one
of each, and not again within the cooldown.

Auto mode weighs demand in "instances' worth of work":

* prefill: (prompt tokens/s + queued prefill tokens / ``queue_horizon_s``) / capacity per instance;
* decode: the larger of KV use (1 - free/total blocks, averaged over decode instances) times the
  decode instances, and the running batch over the batch one decode instance handles well.

The desired prefill count is the prefill share of the total, rounded, one step at a time, with a
dead band so that a split that is nearly right stays put.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pdmesh.membership import InstanceInfoData, Role

AUTO = "auto"
OFF = "off"


@dataclass(frozen=True)
class RatioTarget:
    """``mode`` is "fixed", "auto" or "off"; ``prefill:decode`` are set in fixed mode."""

    mode: str
    prefill: int = 0
    decode: int = 0

    def __str__(self) -> str:
        return f"{self.prefill}:{self.decode}" if self.mode == "fixed" else self.mode


def parse_ratio(text: str) -> RatioTarget:
    """``"2:1"``, ``"auto"`` or ``"off"``; raises ValueError with a one-line reason otherwise."""
    value = text.strip().lower()
    if value in (AUTO, OFF):
        return RatioTarget(value)
    parts = value.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"bad ratio {text!r}: want P:D (e.g. 2:1), 'auto' or 'off'")
    prefill, decode = (int(p) for p in parts)
    if prefill < 1 or decode < 1:
        raise ValueError(f"bad ratio {text!r}: both sides must be at least 1")
    return RatioTarget("fixed", prefill, decode)


@dataclass(frozen=True)
class Demand:
    """Measured demand over the last window."""

    prompt_tokens_per_s: float = 0.0
    queued_prefill_tokens: int = 0
    kv_usage: float = 0.0  # mean over decode instances, 0..1
    decode_running: float = 0.0  # sequences running on decode instances, summed (averaged over time)

    def describe(self, capacity: Capacity | None = None, prefill: int = 0, decode: int = 0) -> str:
        """One line for logs, ``ctl list`` and test failures; with a capacity, the loads in instances."""
        text = (
            f"prompt {self.prompt_tokens_per_s:.1f} tok/s, queued {self.queued_prefill_tokens} tok, "
            f"KV use {self.kv_usage:.2f}, decode batch {self.decode_running:.2f}"
        )
        if capacity is not None:
            p_load, d_load = demand_split(self, prefill, decode, capacity)
            text += f" -> prefill load {p_load:.2f}, decode load {d_load:.2f} instances"
        return text


@dataclass(frozen=True)
class Capacity:
    """What one instance handles (from configuration or a profile)."""

    prefill_tokens_per_s: float
    decode_batch: int
    queue_horizon_s: float = 2.0  # queued prompt tokens count as demand spread over this long
    idle_floor: float = 0.05  # below this much total demand (in instances) the split holds
    dead_band: float = 0.6  # |ideal - current| must exceed this to move


def clamp_prefill(desired: int, total: int) -> int:
    """At least one prefill and one decode instance (when there are two or more in all)."""
    if total < 2:
        return max(0, min(desired, total))
    return max(1, min(desired, total - 1))


def fixed_prefill(target: RatioTarget, total: int) -> int:
    """The prefill count closest to ``P:D`` over ``total`` instances, within the floor."""
    share = target.prefill / (target.prefill + target.decode)
    return clamp_prefill(math.floor(total * share + 0.5), total)


def demand_split(demand: Demand, prefill: int, decode: int, cap: Capacity) -> tuple[float, float]:
    """(prefill load, decode load) in instances' worth of work."""
    prefill_load = (
        demand.prompt_tokens_per_s + demand.queued_prefill_tokens / cap.queue_horizon_s
    ) / cap.prefill_tokens_per_s
    decode_load = max(demand.kv_usage * decode, demand.decode_running / cap.decode_batch)
    return prefill_load, decode_load


def auto_prefill(demand: Demand, prefill: int, decode: int, cap: Capacity) -> int:
    """The next prefill count under auto: one step towards the demand's split, or ``prefill``."""
    total = prefill + decode
    p_load, d_load = demand_split(demand, prefill, decode, cap)
    if p_load + d_load < cap.idle_floor:
        return prefill
    ideal = total * p_load / (p_load + d_load)
    if abs(ideal - prefill) <= cap.dead_band:
        return prefill
    step = 1 if ideal > prefill else -1
    return clamp_prefill(prefill + step, total)


class RatioPolicy:
    """Decides the prefill count to aim for now; holds during the cooldown after a flip."""

    def __init__(self, capacity: Capacity, cooldown_s: float) -> None:
        self.capacity = capacity
        self.cooldown_s = cooldown_s
        self._last_flip: float | None = None

    def record_flip(self, now: float) -> None:
        self._last_flip = now

    def cooling_down(self, now: float) -> bool:
        return self._last_flip is not None and now - self._last_flip < self.cooldown_s

    def decide(self, target: RatioTarget, prefill: int, decode: int, demand: Demand, now: float) -> int:
        """The desired prefill count (``prefill`` itself means: leave the roles as they are)."""
        total = prefill + decode
        if target.mode == OFF or total < 2 or self.cooling_down(now):
            return prefill
        if target.mode == "fixed":
            wanted = fixed_prefill(target, total)
            return prefill + (1 if wanted > prefill else -1) if wanted != prefill else prefill
        return auto_prefill(demand, prefill, decode, self.capacity)


class Ewma:
    """An exponential moving average over time: a sample ``window_s`` old weighs 1/e of a new one."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.value: float | None = None

    def update(self, sample: float, dt_s: float) -> float:
        if self.value is None:
            self.value = sample
        else:
            self.value += (1 - math.exp(-max(0.0, dt_s) / self.window_s)) * (sample - self.value)
        return self.value


class DemandMeter:
    """Turns heartbeat loads into ``Demand``, each figure averaged over about ``window_s``.

    Prompt tokens/s come from the deltas of the instances' prompt-token counters; KV use and the
    running decode batch are samples of the latest heartbeats. All three are averaged over time, so
    that one heartbeat caught between two requests does not flip a role. Instances whose load is
    unknown (not measured, or not heard since a takeover) are left out of every figure.
    """

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._totals: dict[str, int] = {}
        self._last_t: float | None = None
        self._rate = Ewma(window_s)
        self._kv_usage = Ewma(window_s)
        self._running = Ewma(window_s)
        self.last = Demand()

    @property
    def measured(self) -> bool:
        """Whether ``last`` holds a measurement yet."""
        return self._last_t is not None

    def measure(self, instances: list[InstanceInfoData], now: float) -> Demand:
        """Demand averaged up to ``now`` (the first call sees no prompt rate)."""
        known = [i for i in instances if not i.load.unknown]
        delta = 0
        for info in known:
            total = info.load.prompt_tokens_total
            delta += max(0, total - self._totals.get(info.instance_id, total))
            self._totals[info.instance_id] = total
        present = {i.instance_id for i in instances}
        self._totals = {k: v for k, v in self._totals.items() if k in present}
        dt = now - self._last_t if self._last_t is not None else 0.0
        self._last_t = now
        decode = [i for i in known if i.role == Role.DECODE]
        usage = [1 - i.load.free_blocks / i.load.total_blocks for i in decode if i.load.total_blocks > 0]
        if dt > 0:
            self._rate.update(delta / dt, dt)
        self._kv_usage.update(sum(usage) / len(usage) if usage else 0.0, dt)
        self._running.update(sum(i.load.running for i in decode), dt)
        self.last = Demand(
            prompt_tokens_per_s=self._rate.value or 0.0,
            queued_prefill_tokens=sum(i.load.queued_prefill_tokens for i in known if i.role == Role.PREFILL),
            kv_usage=self._kv_usage.value or 0.0,
            decode_running=self._running.value or 0.0,
        )
        return self.last
