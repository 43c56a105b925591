"""Latency models fitted from a profile: what one prefill batch and one decode step cost.

Prefill latency is fitted two ways and the one with the lower leave-one-out relative error wins:

* ``linear``: ``a + b*tokens + c*sum(len^2)`` (attention's quadratic term), least squares on relative
  error with non-negative coefficients;
* ``piecewise``: piecewise-linear interpolation over batch tokens (linear extrapolation past the ends).

A decode step costs ``alpha + beta*batch + gamma*batch*context`` (context: the batch's mean context).
Both models round-trip through plain dicts (``to_dict``/``from_dict``) so that a plan can be replayed.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MIN_LATENCY_S = 1e-6


def _nonneg_relative_lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares on relative error with non-negative coefficients (tries every column subset).

    With at most three columns an exhaustive search is exact and cheaper than a general NNLS.
    """
    w = 1.0 / np.maximum(np.abs(y), MIN_LATENCY_S)
    xw, yw = x * w[:, None], y * w
    best, best_err = np.zeros(x.shape[1]), np.inf
    cols = range(x.shape[1])
    for k in range(1, x.shape[1] + 1):
        for subset in itertools.combinations(cols, k):
            idx = list(subset)
            coef, *_ = np.linalg.lstsq(xw[:, idx], yw, rcond=None)
            if np.any(coef < 0):
                continue
            full = np.zeros(x.shape[1])
            full[idx] = coef
            err = float(np.sum((xw @ full - yw) ** 2))
            if err < best_err - 1e-15:
                best, best_err = full, err
    return best


def _relative_errors(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.abs(pred - y) / np.maximum(np.abs(y), MIN_LATENCY_S)


def _interp_extrap(xq: float, xs: np.ndarray, ys: np.ndarray) -> float:
    """Piecewise-linear interpolation, linear extrapolation past both ends."""
    if len(xs) == 1:
        return float(ys[0] * xq / xs[0]) if xs[0] > 0 else float(ys[0])
    if xq <= xs[0]:
        slope = (ys[1] - ys[0]) / (xs[1] - xs[0])
        return float(ys[0] + slope * (xq - xs[0]))
    if xq >= xs[-1]:
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        return float(ys[-1] + slope * (xq - xs[-1]))
    return float(np.interp(xq, xs, ys))


def _collapse(xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique x with the mean y of each (for interpolation)."""
    ux = np.unique(xs)
    uy = np.array([ys[xs == v].mean() for v in ux])
    return ux, uy


@dataclass
class PrefillModel:
    """Latency of one prefill batch from its token count and the sum of its squared prompt lengths."""

    kind: str = "linear"  # "linear" or "piecewise"
    coef: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # a, b, c
    knots_tokens: list[float] = field(default_factory=list)
    knots_latency: list[float] = field(default_factory=list)
    fit_error: dict[str, float] = field(default_factory=dict)

    def latency(self, tokens: float, sum_sq: float | None = None) -> float:
        """Seconds to prefill a batch of ``tokens`` tokens (``sum_sq``: sum of squared prompt lengths)."""
        if sum_sq is None:
            sum_sq = float(tokens) ** 2
        if self.kind == "piecewise":
            value = _interp_extrap(tokens, np.asarray(self.knots_tokens), np.asarray(self.knots_latency))
        else:
            a, b, c = self.coef
            value = a + b * tokens + c * sum_sq
        return max(value, MIN_LATENCY_S)

    @staticmethod
    def fit(points: list[dict[str, Any]]) -> PrefillModel:
        """Fits both forms to profile points and keeps the one with the lower leave-one-out error."""
        if len(points) < 2:
            raise ValueError("a prefill fit needs at least 2 points")
        tokens = np.array([p["batch_tokens"] for p in points], dtype=float)
        sum_sq = np.array([_sum_sq(p) for p in points], dtype=float)
        y = np.array([p["latency_s"] for p in points], dtype=float)
        x = np.column_stack([np.ones_like(tokens), tokens, sum_sq])
        coef = _nonneg_relative_lstsq(x, y)
        linear = PrefillModel(kind="linear", coef=[float(c) for c in coef])
        knots_x, knots_y = _collapse(tokens, y)
        piecewise = PrefillModel(
            kind="piecewise", knots_tokens=knots_x.tolist(), knots_latency=knots_y.tolist()
        )
        errors = {
            "linear": _loo_error(points, lambda pts: _fit_linear_only(pts)),
            "piecewise": _loo_error(points, lambda pts: _fit_piecewise_only(pts)),
        }
        chosen = linear if errors["linear"] <= errors["piecewise"] else piecewise
        pred = np.array([chosen.latency(t, s) for t, s in zip(tokens, sum_sq, strict=True)])
        chosen.fit_error = {
            "mean_rel_error": float(np.mean(_relative_errors(pred, y))),
            "max_rel_error": float(np.max(_relative_errors(pred, y))),
            "loo_rel_error_linear": errors["linear"],
            "loo_rel_error_piecewise": errors["piecewise"],
        }
        return chosen

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "coef": list(self.coef),
            "knots_tokens": list(self.knots_tokens),
            "knots_latency": list(self.knots_latency),
            "fit_error": dict(self.fit_error),
        }

    @staticmethod
    def from_dict(data: dict[str, Any]) -> PrefillModel:
        return PrefillModel(
            kind=data.get("kind", "linear"),
            coef=[float(c) for c in data.get("coef", [0.0, 0.0, 0.0])],
            knots_tokens=[float(v) for v in data.get("knots_tokens", [])],
            knots_latency=[float(v) for v in data.get("knots_latency", [])],
            fit_error=dict(data.get("fit_error", {})),
        )


def _sum_sq(point: dict[str, Any]) -> float:
    """Sum of squared prompt lengths of a profile point (equal lengths assumed when it is absent)."""
    if "sum_sq_len" in point:
        return float(point["sum_sq_len"])
    n = max(int(point.get("num_seqs", 1)), 1)
    return float(point["batch_tokens"]) ** 2 / n


def _fit_linear_only(points: list[dict[str, Any]]) -> PrefillModel:
    tokens = np.array([p["batch_tokens"] for p in points], dtype=float)
    sum_sq = np.array([_sum_sq(p) for p in points], dtype=float)
    y = np.array([p["latency_s"] for p in points], dtype=float)
    coef = _nonneg_relative_lstsq(np.column_stack([np.ones_like(tokens), tokens, sum_sq]), y)
    return PrefillModel(kind="linear", coef=[float(c) for c in coef])


def _fit_piecewise_only(points: list[dict[str, Any]]) -> PrefillModel:
    tokens = np.array([p["batch_tokens"] for p in points], dtype=float)
    y = np.array([p["latency_s"] for p in points], dtype=float)
    kx, ky = _collapse(tokens, y)
    return PrefillModel(kind="piecewise", knots_tokens=kx.tolist(), knots_latency=ky.tolist())


def _loo_error(points: list[dict[str, Any]], fitter) -> float:
    """Mean leave-one-out relative error of a fitting procedure (in-sample when there are < 3 points)."""
    errs = []
    for i, held in enumerate(points):
        rest = points[:i] + points[i + 1 :] if len(points) >= 3 else points
        model = fitter(rest)
        pred = model.latency(held["batch_tokens"], _sum_sq(held))
        errs.append(abs(pred - held["latency_s"]) / max(held["latency_s"], MIN_LATENCY_S))
    return float(np.mean(errs))


@dataclass
class DecodeModel:
    """Latency of one decode step: ``alpha + beta*batch + gamma*batch*context``."""

    alpha: float = 0.0
    beta: float = 0.0
    gamma: float = 0.0
    fit_error: dict[str, float] = field(default_factory=dict)

    def step_latency(self, batch: float, context: float) -> float:
        """Seconds for one decode step of ``batch`` sequences of mean context ``context``."""
        return max(self.alpha + self.beta * batch + self.gamma * batch * context, MIN_LATENCY_S)

    @staticmethod
    def fit(points: list[dict[str, Any]]) -> DecodeModel:
        if len(points) < 2:
            raise ValueError("a decode fit needs at least 2 points")
        b = np.array([p["batch_size"] for p in points], dtype=float)
        c = np.array([p["context_len"] for p in points], dtype=float)
        y = np.array([p["step_latency_s"] for p in points], dtype=float)
        coef = _nonneg_relative_lstsq(np.column_stack([np.ones_like(b), b, b * c]), y)
        model = DecodeModel(alpha=float(coef[0]), beta=float(coef[1]), gamma=float(coef[2]))
        rel = _relative_errors(np.array([model.step_latency(bi, ci) for bi, ci in zip(b, c, strict=True)]), y)
        model.fit_error = {"mean_rel_error": float(np.mean(rel)), "max_rel_error": float(np.max(rel))}
        return model

    def to_dict(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "beta": self.beta,
            "gamma": self.gamma,
            "fit_error": dict(self.fit_error),
        }

    @staticmethod
    def from_dict(data: dict[str, Any]) -> DecodeModel:
        return DecodeModel(
            alpha=float(data["alpha"]),
            beta=float(data["beta"]),
            gamma=float(data["gamma"]),
            fit_error=dict(data.get("fit_error", {})),
        )


@dataclass
class LatencyModel:
    """The prefill and decode models of one engine on one machine."""

    prefill: PrefillModel
    decode: DecodeModel

    @staticmethod
    def fit(profile: dict[str, Any]) -> LatencyModel:
        """Fits both models from a profile dict (see ``pdmesh.planner.profile_file``)."""
        return LatencyModel(
            prefill=PrefillModel.fit(profile["prefill"]), decode=DecodeModel.fit(profile["decode"])
        )

    def prefill_latency(self, tokens: float, sum_sq: float | None = None) -> float:
        return self.prefill.latency(tokens, sum_sq)

    def decode_step_latency(self, batch: float, context: float) -> float:
        return self.decode.step_latency(batch, context)

    def to_dict(self) -> dict[str, Any]:
        return {"prefill": self.prefill.to_dict(), "decode": self.decode.to_dict()}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> LatencyModel:
        return LatencyModel(
            prefill=PrefillModel.from_dict(data["prefill"]), decode=DecodeModel.from_dict(data["decode"])
        )
