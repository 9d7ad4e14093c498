r"""Couplings of noise and data within a minibatch (chapter 8).

A coupling decides which noise sample ``x0[i]`` is paired with which data
point ``x1[j]``.  The independent coupling (I-CFM) keeps the order in which
they were drawn.  The minibatch optimal-transport coupling (OT-CFM, Tong et
al., 2024) solves, for two equal uniform batches of size ``n``,

.. math::  \min_{\pi \in S_n} \sum_{i} \lVert x_0^{\pi(i)} - x_1^{i} \rVert^2 ,

whose exact solution is a permutation: every sample is used exactly once,
nothing is duplicated or dropped.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from . import _checks

__all__ = ["COUPLINGS", "independent", "ot_permutation", "ot_pair", "pair", "sq_cost"]

COUPLINGS = ("independent", "ot")


def _check_batches(x0, x1):
    _checks.tensor("x0", x0)
    _checks.tensor("x1", x1)
    if x0.ndim < 2:
        raise ValueError(f"x0 must be batched with shape (batch, ...), got shape {tuple(x0.shape)}")
    _checks.same_shape("x0", x0, "x1", x1)
    _checks.same_device(x0=x0, x1=x1)


def sq_cost(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    r"""Squared Euclidean cost matrix ``C[i, j] = |x0[i] - x1[j]|^2``, shape ``(n, n)``, on the inputs' device."""
    a, b = x0.flatten(1), x1.flatten(1)
    return torch.cdist(a, b).pow(2)


def _assignment(cost: torch.Tensor) -> torch.Tensor:
    """Row ``i`` of ``cost`` is matched to column ``col[i]``: an exact minimum-cost assignment
    (shortest augmenting paths warm-started by an auction, :mod:`cfmlib._assignment`; the same
    optimum as :func:`scipy.optimize.linear_sum_assignment`, several times faster on minibatches)."""
    from ._assignment import assignment

    c = cost.detach().to("cpu", torch.float64).numpy()
    return torch.from_numpy(assignment(c))


def ot_permutation(x0: torch.Tensor, x1: torch.Tensor, labels0: torch.Tensor | None = None,
                   labels1: torch.Tensor | None = None) -> torch.Tensor:
    r"""The exact minibatch OT plan as a permutation ``perm`` (a ``(batch,)`` long tensor):
    ``x0[perm[i]]`` is the noise sample matched to ``x1[i]``.

    With ``labels0`` and ``labels1`` given (label-aware coupling), samples are only matched
    within the same label; each label must then occur equally often in both batches.
    """
    _check_batches(x0, x1)
    n = x0.shape[0]
    cost = sq_cost(x1, x0)  # rows: data, columns: noise
    if labels0 is not None or labels1 is not None:
        if labels0 is None or labels1 is None:
            raise ValueError("pass both labels0 and labels1 for a label-aware coupling, or neither")
        for name, lab in (("labels0", labels0), ("labels1", labels1)):
            if not isinstance(lab, torch.Tensor) or lab.shape != (n,):
                raise ValueError(f"{name} must be a tensor of shape ({n},), got {_checks.describe(lab)}")
        if not torch.equal(torch.sort(labels0).values.cpu(), torch.sort(labels1).values.cpu()):
            raise ValueError("labels0 and labels1 must contain each label equally often for a label-aware coupling")
        mismatch = labels1.reshape(-1, 1).to(cost.device) != labels0.reshape(1, -1).to(cost.device)
        cost = cost.masked_fill(mismatch, float(cost.max()) * 2 * n + 1.0)
    perm = _assignment(cost)
    return perm.to(x0.device)


def independent(x0: torch.Tensor, x1: torch.Tensor):
    """The independent coupling: return ``(x0, x1)`` unchanged."""
    _check_batches(x0, x1)
    return x0, x1


def ot_pair(x0: torch.Tensor, x1: torch.Tensor):
    """Reorder ``x0`` by the exact minibatch OT plan; return ``(x0[perm], x1)``."""
    perm = ot_permutation(x0, x1)
    return x0[perm], x1


def pair(coupling: str, x0: torch.Tensor, x1: torch.Tensor):
    """Apply a coupling by name (one of :data:`COUPLINGS`) and return ``(x0, x1)``."""
    _checks.choice("coupling", coupling, COUPLINGS)
    if coupling == "independent":
        return independent(x0, x1)
    return ot_pair(x0, x1)


def is_permutation(perm: torch.Tensor, n: int) -> bool:
    """True when ``perm`` contains each of ``0..n-1`` exactly once."""
    return perm.shape == (n,) and bool(np.array_equal(np.sort(perm.cpu().numpy()), np.arange(n)))
