"""EPLB on a running instance: the load window of every MoE layer, and the online rebalance.

Every MoE layer counts its replica's (token, expert) pairs (``moe.count_load``); ``end_step`` closes
a step's counts into a sliding window of the last ``state.eplb_window`` steps. ``rebalance`` runs on
every rank at the same point between two steps (the leader sends ``{"op": "rebalance"}`` down the
control channel, in order with the steps): one all-reduce sums the windows over the ranks, so every
rank computes the same new placement per layer (``eplb.balance``), then the expert weights a rank
lacks travel from a rank that holds them in one ``all_to_all_single`` per weight. A replica's
weights are bit-identical copies, so tokens before and after are the same.
"""

from __future__ import annotations

import logging
from collections import deque

import torch
from torch import nn

from pdmesh.parallel import comm
from pdmesh.parallel.eplb import ReplicaPlacement, balance, imbalance, rank_loads
from pdmesh.parallel.state import ParallelState

log = logging.getLogger(__name__)


def moe_layers(model: nn.Module) -> list[nn.Module]:
    """The model's expert-parallel MoE layers (``RoutedExperts`` with a placement), in order."""
    from pdmesh.models.moe import RoutedExperts

    return [m for m in model.modules() if isinstance(m, RoutedExperts) and m.placement is not None]


def end_step(model: nn.Module, state: ParallelState) -> None:
    """Moves each layer's step counts into its window (the last ``state.eplb_window`` steps).

    The window's sum and the running total are replaced, never changed in place, so a metrics
    scrape on another thread reads whole tensors."""
    for layer in moe_layers(model):
        step = getattr(layer, "load_counts", None)
        if step is None:
            continue
        layer.load_counts = None
        window = getattr(layer, "load_window", None)
        if window is None or window.maxlen != state.eplb_window:
            window = layer.load_window = deque(maxlen=state.eplb_window)
            layer.window_sum = torch.zeros_like(step)
        dropped = window[0] if len(window) == window.maxlen else 0
        window.append(step)
        layer.window_sum = layer.window_sum + step - dropped
        total = getattr(layer, "total_counts", None)
        layer.total_counts = step if total is None else total + step


def clear_window(model: nn.Module) -> None:
    """Forgets the counts of the steps so far (a new measurement starts; the totals stay)."""
    for layer in moe_layers(model):
        layer.load_window = None
        layer.load_counts = None
        layer.window_sum = None


def window_loads(model: nn.Module) -> list[list[int]]:
    """This rank's window: ``[layer][expert]`` pairs counted over the last steps."""
    out = []
    for layer in moe_layers(model):
        window_sum = getattr(layer, "window_sum", None)
        out.append([0] * layer.num_experts if window_sum is None else window_sum.tolist())
    return out


def expert_stats(model: nn.Module) -> list[dict]:
    """Per MoE layer, as this rank counted (the leader at dp 1: every token; at dp > 1 its replica's):
    the window's pairs per expert, the total since start, each ep rank's window load and the
    imbalance (max / mean) under the layer's placement. Safe from another thread."""
    out = []
    for layer in moe_layers(model):
        placement = layer.placement
        window_sum = getattr(layer, "window_sum", None)
        window = [0] * layer.num_experts if window_sum is None else window_sum.tolist()
        total = getattr(layer, "total_counts", None)
        out.append(
            {
                "window": window,
                "total": [0] * layer.num_experts if total is None else total.tolist(),
                "rank_loads": rank_loads(placement, window),
                "imbalance": imbalance(placement, window),
                "replicas": [len(placement.physical_of(e)) for e in range(layer.num_experts)],
            }
        )
    return out


@torch.inference_mode()  # as the steps run: the new weights are inference tensors like the old
def rebalance(model: nn.Module, state: ParallelState) -> dict:
    """Every rank at once: new placements from the instance's window, weights moved to match.
    Returns the mean over layers of the ep ranks' imbalance (max/mean) before and after."""
    layers = moe_layers(model)
    if not layers:
        return {"layers": 0, "changed_layers": 0, "imbalance_before": 1.0, "imbalance_after": 1.0}
    device = layers[0].gate_up.weight.device  # nccl/hccl reduce device tensors only
    loads = torch.tensor(window_loads(model), dtype=torch.float64, device=device)
    loads = comm.all_reduce_world(loads).tolist()
    before, after, changed = [], [], 0
    for layer, layer_loads in zip(layers, loads, strict=True):
        old = layer.placement
        new = balance(layer_loads, state.layout.moe_ep, old.num_physical - old.num_experts, previous=old)
        before.append(imbalance(old, layer_loads))
        after.append(imbalance(new, layer_loads))
        if new.table != old.table:
            changed += 1
            for tensor in _per_slot(layer, old.slots):
                tensor.data = _moved(tensor.data, old, new, state)
            layer.placement = new
            layer._placement_tensors = None
    report = {
        "layers": len(layers),
        "changed_layers": changed,
        "imbalance_before": sum(before) / len(before),
        "imbalance_after": sum(after) / len(after),
    }
    log.info("EPLB rebalance: %s", report)
    return report


def _per_slot(layer: nn.Module, slots: int) -> list[torch.Tensor]:
    """Every tensor of the layer's stacked experts indexed by local slot (weights, and any int8
    scales a quantized stack keeps as parameters or buffers)."""
    out = []
    for module in (layer.gate_up, layer.down):
        for _, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if tensor.dim() >= 1 and tensor.shape[0] == slots:
                out.append(tensor)
    return out


def _moved(
    weight: torch.Tensor, old: ReplicaPlacement, new: ReplicaPlacement, state: ParallelState
) -> torch.Tensor:
    """This rank's ``[slots, ...]`` weight under ``new``: slots it keeps copied locally, the others
    received from the first ep rank that held the expert (the same moe_tp slice)."""
    moe_tp, me = state.layout.moe_tp, state.place
    sends: list[list[int]] = [[] for _ in range(state.world)]  # per destination rank: source slots
    recvs: list[list[int]] = [[] for _ in range(state.world)]  # per source rank: destination slots
    local: list[tuple[int, int]] = []
    for r, row in enumerate(new.table):
        for s, e in enumerate(row):
            if e in old.table[r]:
                if r == me.ep_rank:
                    local.append((s, old.table[r].index(e)))
                continue
            q = next(q for q, held in enumerate(old.table) if e in held)
            if q == me.ep_rank:
                sends[r * moe_tp + me.moe_tp_rank].append(old.table[q].index(e))
            if r == me.ep_rank:
                recvs[q * moe_tp + me.moe_tp_rank].append(s)
    flat = weight.reshape(weight.shape[0], -1)
    send = flat[[slot for slots in sends for slot in slots]]
    received = comm.all_to_all(send, [len(x) for x in sends], [len(x) for x in recvs])
    out = torch.empty_like(weight)
    for s, o in local:
        out[s] = weight[o]
    for i, s in enumerate(slot for slots in recvs for slot in slots):
        out[s] = received[i].reshape(weight.shape[1:])
    return out
