"""Discrete-event simulation of prefill, decode and colocated instances (DistServe-style).

Requests are spread round robin over instances, so one prefill instance sees Poisson arrivals at
``rate / n_prefill`` and one decode instance at ``rate / n_decode`` (Poisson thinning): the cost of a
simulation does not depend on the number of instances. Request lengths are sampled once per workload
(seeded) and arrivals are unit-rate exponential gaps scaled by the rate, so that simulations at
different rates share their random numbers (common random numbers make rate searches monotone).

* prefill: FCFS batches under ``max_prefill_batch_size`` and ``max_prefill_tokens``; a batch starts as
  soon as the instance is idle, with whatever has arrived. TTFT = queue + prefill + KV transfer.
* decode: continuous batching up to ``max_decode_batch_size``; each step costs the latency model's step
  latency for the current batch and mean context. TPOT = (finish - arrival at decode) / decode tokens,
  i.e. the mean step latency the request saw plus any wait for a batch slot.
* colocated: vLLM-style prefill priority; a prefill batch of arrived requests (within the free batch
  slots) runs before the next decode step, so prefills stall running decodes.

Decode steps between two events (an admission or a finish) are advanced in closed form, so a
simulation costs O(requests log requests) whatever the output lengths.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import asdict, dataclass

import numpy as np

from pdmesh.planner.model import LatencyModel
from pdmesh.planner.workload import SLO, LengthDist, Limits, Requests, Workload

__all__ = [
    "SLO",
    "LengthDist",
    "Limits",
    "Requests",
    "SimResult",
    "Workload",
    "keeps_up",
    "run_colocated",
    "run_decode",
    "run_prefill",
    "simulate_colocated",
    "simulate_pd",
]

WARMUP_FRACTION = 0.1  # the first requests see an empty system; they are left out of the statistics
STABLE_RATIO = 0.98  # an instance completing fewer of the requests arriving meanwhile is overloaded


@dataclass
class SimResult:
    """What a simulation predicts for the whole cluster at the offered rate."""

    mode: str  # "pd" or "colocated"
    n_prefill: int
    n_decode: int
    rate: float
    goodput: float  # req/s meeting both SLOs (rate * attainment)
    attainment: float
    ttft_attainment: float
    tpot_attainment: float
    throughput: float  # completed req/s
    stable: bool  # every instance keeps up with its arrivals (see ``keeps_up``)
    ttft_ms: dict[str, float]
    tpot_ms: dict[str, float]

    def to_dict(self) -> dict:
        return asdict(self)


def run_prefill(model: LatencyModel, arrivals: np.ndarray, inp: np.ndarray, limits: Limits) -> np.ndarray:
    """Finish time of each request's prefill on one FCFS batching instance."""
    arr, lens = arrivals.tolist(), inp.tolist()
    n, finish = len(arr), np.empty(len(arr))
    latency = model.prefill_latency
    t, i = 0.0, 0
    while i < n:
        t = max(t, arr[i])
        j, tokens, sum_sq = i, 0, 0
        while j < n and arr[j] <= t and j - i < limits.max_prefill_batch_size:
            length = lens[j]
            if j > i and tokens + length > limits.max_prefill_tokens:
                break
            tokens, sum_sq, j = tokens + length, sum_sq + length * length, j + 1
        t += latency(tokens, sum_sq)
        finish[i:j] = t
        i = j
    return finish


class _DecodeBatch:
    """A continuous decode batch advanced event to event (admissions and finishes)."""

    def __init__(self, model: LatencyModel, max_batch: int) -> None:
        self.model, self.max_batch = model, max_batch
        self.gamma = model.decode.gamma
        self.heap: list[tuple[int, int]] = []  # (step at which it finishes, request index)
        self.steps, self.ctx_sum, self.ctx_end = 0, 0.0, {}

    @property
    def size(self) -> int:
        return len(self.heap)

    def admit(self, idx: int, input_len: int, decode_tokens: int) -> None:
        heapq.heappush(self.heap, (self.steps + decode_tokens, idx))
        self.ctx_sum += input_len + 1
        self.ctx_end[idx] = input_len + 1 + decode_tokens

    def advance(self, t: float, until: float) -> tuple[float, list[int]]:
        """Runs steps from ``t`` up to the next finish or the first step boundary at or after ``until``.

        Returns the new time and the requests that finished there.
        """
        b = self.size
        d0 = self.model.decode_step_latency(b, self.ctx_sum / b)
        g = self.gamma * b  # each step adds one token to every sequence: latency grows by gamma*b
        m = self.heap[0][0] - self.steps
        if until > t:
            m = min(m, _steps_to_reach(until - t, d0, g))
        t += m * d0 + g * m * (m - 1) / 2
        self.steps += m
        self.ctx_sum += m * b
        done = []
        while self.heap and self.heap[0][0] == self.steps:
            _, idx = heapq.heappop(self.heap)
            self.ctx_sum -= self.ctx_end.pop(idx)
            done.append(idx)
        return t, done


def _steps_to_reach(delta: float, d0: float, g: float) -> int:
    """Smallest m >= 1 with m*d0 + g*m*(m-1)/2 >= delta."""
    if g <= 0:
        m = math.ceil(delta / d0)
    else:
        a, b = g / 2, d0 - g / 2
        m = math.ceil((-b + math.sqrt(b * b + 4 * a * delta)) / (2 * a))
    m = max(m, 1)
    while m > 1 and (m - 1) * d0 + g * (m - 1) * (m - 2) / 2 >= delta:
        m -= 1
    while m * d0 + g * m * (m - 1) / 2 < delta:
        m += 1
    return m


def run_decode(
    model: LatencyModel, arrivals: np.ndarray, inp: np.ndarray, out: np.ndarray, limits: Limits
) -> tuple[np.ndarray, np.ndarray]:
    """TPOT and finish time of each request on one continuous-batching decode instance."""
    arr, lens, dec = arrivals.tolist(), inp.tolist(), (out - 1).tolist()
    n = len(arr)
    tpot, finish = np.zeros(n), np.array(arrivals, dtype=float)
    batch, waiting = _DecodeBatch(model, limits.max_decode_batch_size), deque()
    t, i, done = 0.0, 0, 0
    while done < n:
        while i < n and arr[i] <= t:
            waiting.append(i)
            i += 1
        while waiting and batch.size < batch.max_batch:
            j = waiting.popleft()
            if dec[j] <= 0:
                finish[j], done = max(t, arr[j]), done + 1
            else:
                batch.admit(j, lens[j], dec[j])
        if batch.size == 0:
            if i < n:
                t = max(t, arr[i])
            continue
        until = arr[i] if i < n and batch.size < batch.max_batch else t
        t, finished = batch.advance(t, until)
        for j in finished:
            finish[j], tpot[j] = t, (t - arr[j]) / dec[j]
        done += len(finished)
    return tpot, finish


def run_colocated(
    model: LatencyModel, arrivals: np.ndarray, inp: np.ndarray, out: np.ndarray, limits: Limits
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TTFT, TPOT and finish time of each request on one instance that prefills with priority."""
    arr, lens, dec = arrivals.tolist(), inp.tolist(), (out - 1).tolist()
    n = len(arr)
    ttft, tpot, finish, first = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n)
    batch, waiting = _DecodeBatch(model, limits.max_decode_batch_size), deque()
    t, i, done = 0.0, 0, 0
    while done < n:
        while i < n and arr[i] <= t:
            waiting.append(i)
            i += 1
        free = batch.max_batch - batch.size
        if waiting and free > 0:
            chosen = _take_prefill_batch(waiting, lens, min(free, limits.max_prefill_batch_size), limits)
            t += model.prefill_latency(sum(lens[j] for j in chosen), sum(lens[j] ** 2 for j in chosen))
            for j in chosen:
                ttft[j], first[j] = t - arr[j], t
                if dec[j] <= 0:
                    finish[j], done = t, done + 1
                else:
                    batch.admit(j, lens[j], dec[j])
            continue
        if batch.size == 0:
            if i < n:
                t = max(t, arr[i])
            continue
        until = arr[i] if i < n and free > 0 else t
        t, finished = batch.advance(t, until)
        for j in finished:
            finish[j], tpot[j] = t, (t - first[j]) / dec[j]
        done += len(finished)
    return ttft, tpot, finish


def _take_prefill_batch(waiting: deque, lens: list[int], max_seqs: int, limits: Limits) -> list[int]:
    chosen, tokens = [], 0
    while waiting and len(chosen) < max_seqs:
        length = lens[waiting[0]]
        if chosen and tokens + length > limits.max_prefill_tokens:
            break
        chosen.append(waiting.popleft())
        tokens += length
    return chosen


def _stats_ms(values: np.ndarray) -> dict[str, float]:
    ms = values * 1000.0
    return {
        "mean": float(np.mean(ms)),
        "p90": float(np.percentile(ms, 90)),
        "p99": float(np.percentile(ms, 99)),
    }


def _throughput(arrivals: np.ndarray, finish: np.ndarray) -> float:
    span = float(np.max(finish) - np.min(arrivals))
    return len(finish) / span if span > 0 else float("inf")


def _measured(n: int) -> slice:
    return slice(int(n * WARMUP_FRACTION) if n >= 20 else 0, n)


def keeps_up(arrivals: np.ndarray, finish: np.ndarray, slack: int = 0) -> bool:
    """Whether an instance keeps up with its arrivals (is stable, not just fast enough for a short run).

    Between the end of the warm-up and the last arrival, the number of requests in the instance may
    grow by at most ``slack`` (a batch still filling up) plus ``1 - STABLE_RATIO`` of the arrivals: a
    finite run can meet a loose SLO even while its queue grows without bound.
    """
    m0 = _measured(len(arrivals)).start
    t0, t1 = float(arrivals[m0]), float(arrivals[-1])
    arrived = len(arrivals) - 1 - m0
    if t1 <= t0 or arrived <= 0:
        return True
    completed = int(np.count_nonzero((finish > t0) & (finish <= t1)))
    return arrived - completed <= (1 - STABLE_RATIO) * arrived + slack


def prefill_ttft(
    model: LatencyModel, reqs: Requests, rate: float, limits: Limits
) -> tuple[np.ndarray, np.ndarray]:
    """TTFT (s) of each request on one prefill instance at ``rate`` req/s, and the arrivals."""
    arr = reqs.arrivals(rate, "prefill")
    finish = run_prefill(model, arr, reqs.input_len, limits)
    return finish - arr + limits.kv_transfer_s_per_token * reqs.input_len, arr


def decode_tpot(
    model: LatencyModel, reqs: Requests, rate: float, limits: Limits
) -> tuple[np.ndarray, np.ndarray]:
    """TPOT (s) of each request on one decode instance at ``rate`` req/s, and the finish times."""
    arr = reqs.arrivals(rate, "decode")
    return run_decode(model, arr, reqs.input_len, reqs.output_len, limits)


def _result(
    mode: str, n_p: int, n_d: int, rate: float, slo: SLO, ttft, tpot, thr: float, stable: bool
) -> SimResult:
    ttft_ok, tpot_ok = ttft <= slo.ttft_ms / 1000.0, tpot <= slo.tpot_ms / 1000.0
    attainment = float(np.mean(ttft_ok & tpot_ok))
    return SimResult(
        mode=mode,
        n_prefill=n_p,
        n_decode=n_d,
        rate=rate,
        goodput=rate * attainment,
        attainment=attainment,
        ttft_attainment=float(np.mean(ttft_ok)),
        tpot_attainment=float(np.mean(tpot_ok)),
        throughput=min(thr, rate) if thr < float("inf") else rate,
        stable=stable,
        ttft_ms=_stats_ms(ttft),
        tpot_ms=_stats_ms(tpot),
    )


def simulate_pd(
    model: LatencyModel,
    workload: Workload,
    slo: SLO,
    limits: Limits,
    n_prefill: int,
    n_decode: int,
    requests: Requests | None = None,
) -> SimResult:
    """Predicts a disaggregated cluster of ``n_prefill`` prefill and ``n_decode`` decode instances."""
    if n_prefill < 1 or n_decode < 1:
        raise ValueError("PD needs at least one prefill and one decode instance")
    reqs = requests or Requests.sample(workload)
    ttft, arr_p = prefill_ttft(model, reqs, workload.rate / n_prefill, limits)
    finish_p = arr_p + ttft
    arr_d = reqs.arrivals(workload.rate / n_decode, "decode")
    tpot, finish_d = run_decode(model, arr_d, reqs.input_len, reqs.output_len, limits)
    m = _measured(len(ttft))
    thr = min(
        n_prefill * _throughput(arr_p[m], finish_p[m]),
        n_decode * _throughput(arr_d[m], finish_d[m]),
    )
    stable = keeps_up(arr_p, finish_p, limits.max_prefill_batch_size) and keeps_up(
        arr_d, finish_d, limits.max_decode_batch_size
    )
    return _result("pd", n_prefill, n_decode, workload.rate, slo, ttft[m], tpot[m], thr, stable)


def simulate_colocated(
    model: LatencyModel,
    workload: Workload,
    slo: SLO,
    limits: Limits,
    n_instances: int,
    requests: Requests | None = None,
) -> SimResult:
    """Predicts ``n_instances`` colocated (mixed prefill+decode) instances."""
    if n_instances < 1:
        raise ValueError("colocated serving needs at least one instance")
    reqs = requests or Requests.sample(workload)
    arr = reqs.arrivals(workload.rate / n_instances, "prefill")
    ttft, tpot, finish = run_colocated(model, arr, reqs.input_len, reqs.output_len, limits)
    m = _measured(len(ttft))
    thr = n_instances * _throughput(arr[m], finish[m])
    stable = keeps_up(arr, finish, limits.max_decode_batch_size)
    return _result("colocated", n_instances, 0, workload.rate, slo, ttft[m], tpot[m], thr, stable)
