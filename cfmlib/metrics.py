r"""Distances between sample sets, likelihood units and path straightness (chapters 3-10).

* :func:`w2` -- the exact 2-Wasserstein distance between two empirical
  distributions, :math:`W_2(a, b)^2 = \min_\pi \frac1n \sum_i \lVert a_i - b_{\pi(i)} \rVert^2`
  for equal sizes (an assignment problem, solved exactly), or by an exact
  transport plan (POT) for unequal sizes.
* :func:`mmd` -- the unbiased squared maximum mean discrepancy with a sum of
  Gaussian kernels.
* :func:`bits_per_dim` -- negative log-likelihood in nats converted to bits per dimension.
* :func:`straightness` -- how far a trajectory's velocity strays from its chord.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from . import _checks

__all__ = ["w2", "mmd", "bits_per_dim", "straightness"]


def _two_sets(a, b):
    _checks.tensor("a", a, ndim=2)
    _checks.tensor("b", b, ndim=2)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must have the same dimension, got {a.shape[1]} and {b.shape[1]}")
    if a.shape[0] == 0 or b.shape[0] == 0:
        raise ValueError("a and b must not be empty")


def w2(a: torch.Tensor, b: torch.Tensor) -> float:
    r"""Exact :math:`W_2` between the empirical distributions of ``a`` ``(n, D)`` and ``b`` ``(m, D)``."""
    _two_sets(a, b)
    A = a.detach().to("cpu", torch.float64).flatten(1).numpy()
    B = b.detach().to("cpu", torch.float64).flatten(1).numpy()
    cost = cdist(A, B, "sqeuclidean")  # direct differences: exactly 0 for identical points
    if A.shape[0] == B.shape[0]:
        r, c = linear_sum_assignment(cost)
        return float(math.sqrt(max(cost[r, c].mean(), 0.0)))
    import ot  # POT, for unequal sizes

    wa = np.full(A.shape[0], 1.0 / A.shape[0])
    wb = np.full(B.shape[0], 1.0 / B.shape[0])
    return float(math.sqrt(max(ot.emd2(wa, wb, cost, numItermax=10_000_000), 0.0)))


def mmd(a: torch.Tensor, b: torch.Tensor, bandwidths=(0.1, 0.3, 1.0, 3.0)) -> float:
    r"""Unbiased squared MMD with kernel :math:`\sum_h \exp(-\lVert x - y\rVert^2 / (2h^2))`."""
    _two_sets(a, b)
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("mmd needs at least two samples in each set")
    _checks.same_device(a=a, b=b)
    a, b = a.detach().double(), b.detach().double().to(a.device)
    if isinstance(bandwidths, (int, float)) and not isinstance(bandwidths, bool):
        bandwidths = (bandwidths,)
    if not isinstance(bandwidths, (tuple, list)) or not bandwidths:
        raise ValueError(f"bandwidths must be a non-empty sequence of positive numbers, got {bandwidths!r}")
    hs = [_checks.number("bandwidth", h, lo=0.0, lo_open=True) for h in bandwidths]

    def k(x, y):
        d2 = torch.cdist(x, y).pow(2)
        return sum(torch.exp(-d2 / (2 * h * h)) for h in hs)

    n, m = a.shape[0], b.shape[0]
    kaa, kbb, kab = k(a, a), k(b, b), k(a, b)
    saa = (kaa.sum() - kaa.diagonal().sum()) / (n * (n - 1))
    sbb = (kbb.sum() - kbb.diagonal().sum()) / (m * (m - 1))
    return float(saa + sbb - 2 * kab.mean())


def bits_per_dim(nll_nats, dim: int):
    """Convert a negative log-likelihood in nats (per sample) to bits per dimension."""
    _checks.positive_int("dim", dim)
    if isinstance(nll_nats, bool) or not isinstance(nll_nats, (int, float, torch.Tensor)):
        raise TypeError(f"nll_nats must be a number or a tensor (nats per sample), got {_checks.describe(nll_nats)}")
    return nll_nats / (dim * math.log(2.0))


def straightness(trajectory: torch.Tensor, times: torch.Tensor | None = None) -> float:
    r"""Mean squared deviation of the velocity from the chord along trajectories:

    .. math:: S = \mathbb E\int_0^1 \lVert \dot x_t - (x_1 - x_0) \rVert^2 dt ,

    estimated from a trajectory ``(steps + 1, batch, ...)`` at monotone ``times`` (default: equally
    spaced on ``[0, 1]``; a non-uniform grid is allowed) by finite differences, each interval
    weighted by its length and the integral divided by the time span.  ``S = 0`` exactly for
    straight paths travelled at constant speed; on ``[0, 1]``,
    :math:`S = \mathbb E\int_0^1 \lVert\dot x_t\rVert^2 dt - \mathbb E\lVert x_1 - x_0\rVert^2`.
    The finite-difference value never exceeds the continuous one (Jensen), and converges to it
    as the grid is refined.  Derived and used in chapter 8.
    """
    _checks.tensor("trajectory", trajectory)
    if trajectory.ndim < 3 or trajectory.shape[0] < 2:
        raise ValueError(f"trajectory must have shape (steps + 1, batch, ...) with steps >= 1, "
                         f"got {tuple(trajectory.shape)}")
    steps = trajectory.shape[0] - 1
    if times is None:
        h = torch.full((steps,), 1.0 / steps, dtype=trajectory.dtype, device=trajectory.device)
    else:
        _checks.tensor("times", times, ndim=1)
        if times.shape[0] != steps + 1:
            raise ValueError(f"times must have {steps + 1} entries to match the trajectory, got {times.shape[0]}")
        h = (times[1:] - times[:-1]).to(device=trajectory.device, dtype=trajectory.dtype)
        if not (bool((h > 0).all()) or bool((h < 0).all())):
            raise ValueError("times must be strictly increasing (or strictly decreasing for a backward solve)")
    span = float(h.sum())
    shape = (steps,) + (1,) * (trajectory.ndim - 1)
    vel = (trajectory[1:] - trajectory[:-1]) / h.view(shape)  # (steps, batch, ...)
    chord = (trajectory[-1] - trajectory[0]) / span
    dev = (vel - chord[None]).flatten(2).pow(2).sum(-1)  # (steps, batch)
    dev = (dev * h[:, None]).sum(0) / span  # time average per trajectory, (batch,)
    return float(dev.mean())
