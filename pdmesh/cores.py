"""How ``pdmesh up`` shares one host's cores between its workers.

Workers left unpinned each start as many intra-op threads as the host has cores, so a prefill and a
decode worker on one machine run twice as many threads as cores. A thread team then waits at every
parallel region for members the scheduler has parked behind the other worker's threads; measured on
2 cores, a prefill's products ran several times slower while the decode worker was busy (docs/
benchmarks.md). So by default each worker gets cores of its own and as many threads as cores:

- every rank of every worker gets ``cores // ranks`` cores of its own (a worker of tp x dp ranks gets
  that many shares, and its ranks split them); cores left over go to prefill (or mixed) workers
  first, one each in turn;
- a prefill worker also runs on the decode workers' cores: a decode step is short and bound by
  memory bandwidth, so a decode worker leaves most of its cores' cycles idle, and a prompt then
  prefills on every core (on 2 cores: a 512-token prompt in about 190 ms instead of 320 ms), while
  the decode worker's own threads keep its cores whenever it steps (docs/benchmarks.md);
- with fewer cores than single-rank workers, each worker gets one core, in turn (some share; a
  thread each keeps the sharing cheap); with fewer cores than ranks of a parallel worker, nothing is
  pinned.

The result is one taskset-style CPU list per worker (``StackSpec.worker_cpus``).
"""

from __future__ import annotations

import os


def host_cpus() -> list[int]:
    """The CPUs this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def split_cores(roles: list[str], ranks: list[int], cpus: list[int]) -> list[str] | None:
    """One CPU list per worker (``roles[i]`` running ``ranks[i]`` ranks) over ``cpus``; None: unpinned."""
    if not roles:
        return []
    if len(ranks) != len(roles) or any(r < 1 for r in ranks):
        raise ValueError("one rank count >= 1 per worker")
    total_ranks = sum(ranks)
    if total_ranks > len(cpus):
        if any(r > 1 for r in ranks) or not cpus:
            return None
        return [str(cpus[i % len(cpus)]) for i in range(len(roles))]
    per_rank = len(cpus) // total_ranks
    counts = [per_rank * r for r in ranks]
    spare = len(cpus) - sum(counts)
    order = [i for i, role in enumerate(roles) if role != "decode"] or list(range(len(roles)))
    for k in range(spare):
        counts[order[k % len(order)]] += 1
    own, start = [], 0
    for count in counts:
        own.append(cpus[start : start + count])
        start += count
    decode_cpus = [c for role, mine in zip(roles, own, strict=True) if role == "decode" for c in mine]
    lists = []
    for role, mine in zip(roles, own, strict=True):
        lists.append(_cpu_list(sorted(set(mine) | set(decode_cpus)) if role == "prefill" else mine))
    return lists


def _cpu_list(cpus: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    parts, i = [], 0
    while i < len(cpus):
        j = i
        while j + 1 < len(cpus) and cpus[j + 1] == cpus[j] + 1:
            j += 1
        parts.append(str(cpus[i]) if i == j else f"{cpus[i]}-{cpus[j]}")
        i = j + 1
    return ",".join(parts)
