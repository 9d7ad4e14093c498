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

from . import _checks, assignment
from .models import data_shape
from .paths import gaussian_path, get_path
from .solvers import sample

__all__ = ["Coupling", "IndependentCoupling", "ExactOTCoupling", "COUPLINGS", "get_coupling", "independent",
           "ot_permutation", "ot_pair", "pair", "sq_cost", "is_permutation", "reflow_pairs"]


def _check_batches(x0, x1, check_values=True):
    _checks.tensor("x0", x0, finite=check_values)
    _checks.tensor("x1", x1, finite=check_values)
    if x0.ndim < 2:
        raise ValueError(f"x0 must be batched with shape (batch, ...), got shape {tuple(x0.shape)}")
    _checks.same_shape("x0", x0, "x1", x1)
    _checks.same_device(x0=x0, x1=x1)


def sq_cost(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    r"""Squared Euclidean cost matrix ``C[i, j] = |x0[i] - x1[j]|^2``, shape ``(n, m)``, on the inputs' device."""
    _checks.tensor("x0", x0)
    _checks.tensor("x1", x1)
    if x0.ndim < 2 or x0.shape[1:] != x1.shape[1:]:
        raise ValueError(f"x0 and x1 must be batches (n, ...) and (m, ...) of samples of the same shape, "
                         f"got shapes {tuple(x0.shape)} and {tuple(x1.shape)}")
    _checks.same_device(x0=x0, x1=x1)
    return _cost(x0, x1)


def _cost(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    return torch.cdist(x0.flatten(1), x1.flatten(1)).pow(2)


def _solve(cost: torch.Tensor) -> torch.Tensor:
    """Row ``i`` of ``cost`` is matched to column ``col[i]``: an exact minimum-cost assignment."""
    return torch.from_numpy(assignment.solve(cost))


class Coupling:
    r"""A coupling pairs a batch of source points with a batch of data of the same size.

    A subclass implements :meth:`indices`; everything else (argument checks, the path's source
    scale, reordering) is done here once.  Register a new coupling in :data:`COUPLINGS` to make it
    available by name to :func:`pair` and :func:`cfmlib.training.train`.
    """

    name = "coupling"

    def indices(self, source: torch.Tensor, x1: torch.Tensor):
        """Index tensors ``(i0, i1)`` such that ``(source[i0], x1[i1])`` are the pairs; ``None`` keeps the
        order of that side. Called without argument checks (:meth:`pair` checks), possibly in a
        background thread (:class:`cfmlib.training.Batches`), so it must not use a shared generator."""
        raise NotImplementedError  # pragma: no cover - abstract

    def pair(self, x0: torch.Tensor, x1: torch.Tensor, *, path=None, check: bool = True):
        r"""Return the coupled batch ``(x0', x1')``.

        ``x0`` are source points; with ``path`` given they are the path's noise (for a Gaussian path,
        standard-normal :math:`x_0` whose source point is :math:`\sigma_0 x_0`), and the coupling is
        computed between the source points and the data, as training does.  ``check=False`` skips the
        argument checks, for a loop that has validated its data already.
        """
        if check:
            _check_batches(x0, x1)
        src = x0 if path is None else get_path(path).coupling_source(x0)
        i0, i1 = self.indices(src, x1)
        return (x0 if i0 is None else x0[i0]), (x1 if i1 is None else x1[i1])

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class IndependentCoupling(Coupling):
    """The independent coupling (I-CFM): pairs in the order they were drawn."""

    name = "independent"

    def indices(self, source, x1):
        """No reordering: ``(None, None)``."""
        return None, None


class ExactOTCoupling(Coupling):
    r"""The exact minibatch optimal-transport coupling (OT-CFM, Tong et al., 2024; chapter 8):
    the permutation :math:`\pi` minimising :math:`\sum_i \lVert x_0^{\pi(i)} - x_1^i\rVert^2`,
    solved exactly by cfmlib's assignment solver."""

    name = "ot"

    def indices(self, source, x1):
        """The exact OT permutation of the source points (data keep their order)."""
        return _solve(_cost(x1, source)).to(source.device), None


#: The couplings known by name to :func:`get_coupling`, :func:`pair` and ``train(coupling=...)``.
COUPLINGS = {"independent": IndependentCoupling, "ot": ExactOTCoupling}


def get_coupling(coupling="independent") -> Coupling:
    """A coupling object from a name in :data:`COUPLINGS` (``'independent'``, ``'ot'``), or a
    :class:`Coupling` passed through unchanged."""
    if isinstance(coupling, Coupling):
        return coupling
    if coupling == "condot":
        raise ValueError("'condot' is a probability path (path='condot'); the minibatch optimal-transport "
                         "coupling is coupling='ot'")
    _checks.choice("coupling", coupling, COUPLINGS)
    return COUPLINGS[coupling]()


def ot_permutation(x0: torch.Tensor, x1: torch.Tensor, labels0: torch.Tensor | None = None,
                   labels1: torch.Tensor | None = None, *, path=None) -> torch.Tensor:
    r"""The exact minibatch OT plan as a permutation ``perm`` (a ``(batch,)`` long tensor):
    ``x0[perm[i]]`` is the noise sample matched to ``x1[i]``.

    With ``path`` given, ``x0`` is the path's noise and the source points :math:`\sigma_0 x_0` are
    matched (see :meth:`Coupling.pair`).  With ``labels0`` and ``labels1`` given (label-aware
    coupling), samples are only matched within the same label; each label must then occur equally
    often in both batches.
    """
    _check_batches(x0, x1)
    n = x0.shape[0]
    src = x0 if path is None else get_path(path).coupling_source(x0)
    cost = _cost(x1, src)  # rows: data, columns: noise
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
    return _solve(cost).to(x0.device)


def independent(x0: torch.Tensor, x1: torch.Tensor):
    """The independent coupling: return ``(x0, x1)`` unchanged."""
    return IndependentCoupling().pair(x0, x1)


def ot_pair(x0: torch.Tensor, x1: torch.Tensor, *, path=None):
    r"""Reorder ``x0`` by the exact minibatch OT plan; return ``(x0[perm], x1)``.

    Pass ``path`` when ``x0`` is a path's noise rather than its source points (the VE path's source is
    :math:`\sigma_{\max} x_0`): the plan is then computed between source points and data."""
    return ExactOTCoupling().pair(x0, x1, path=path)


def pair(coupling, x0: torch.Tensor, x1: torch.Tensor, *, path=None):
    """Apply a coupling (a name in :data:`COUPLINGS` or a :class:`Coupling`) and return ``(x0, x1)``."""
    return get_coupling(coupling).pair(x0, x1, path=path)


def is_permutation(perm: torch.Tensor, n: int) -> bool:
    """True when ``perm`` contains each of ``0..n-1`` exactly once."""
    if not isinstance(perm, torch.Tensor):
        raise TypeError(f"perm must be a torch.Tensor of indices, got {_checks.describe(perm)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise (TypeError if not isinstance(n, int) or isinstance(n, bool) else ValueError)(
            f"n must be a non-negative int, got {_checks.describe(n)}")
    return perm.shape == (n,) and bool(np.array_equal(np.sort(perm.cpu().numpy()), np.arange(n)))


@torch.no_grad()
def reflow_pairs(model, n: int, *, path="condot", method: str = "rk4", steps: int = 50,
                 generator: torch.Generator | None = None, device=None, batch_size: int = 4096, **kwargs):
    r"""Pairs for one round of reflow (rectified flow, Liu et al. 2023; chapter 8).

    Draw ``n`` noise samples :math:`x_0 \sim p_0` of ``path`` and push each through the
    flow of the trained field: :math:`x_1 = \phi_1(x_0)`, the ODE solution of
    :math:`\dot x_t = v_\theta(x_t, t)` from ``t = 0`` to ``path.t_max``.  The result is a
    deterministic coupling :math:`(x_0, \phi_1(x_0))`; training on it with
    ``cfmlib.train(model, pairs=(x0, x1))`` gives the reflowed (straighter) field.

    Args:
        model: the trained field, called as ``model(x, t, **kwargs)``; its ``config`` gives the
            data shape.
        n: number of pairs.
        path, method, steps: the source distribution and the ODE solver
            (see :func:`cfmlib.solvers.sample`).
        generator: draws the noise (seeded pairs); ``device``: where to compute (default:
            the model's device).
        batch_size: solve in chunks of this many samples to bound memory.

    Returns:
        ``(x0, x1)``, two tensors of shape ``(n, ...)`` on the model's (or the given) device;
        ``x0`` is the standard-normal noise of the path (the flow starts at
        ``path.source_scale * x0``), so the pairs can go straight to ``train(pairs=...)``.
    """
    _checks.positive_int("n", n)
    _checks.positive_int("batch_size", batch_size)
    _checks.generator("generator", generator)
    if not callable(model):
        raise TypeError(f"model must be callable as model(x, t), got {_checks.describe(model)}")
    path = gaussian_path(path, "cfmlib.couplings.reflow_pairs")
    shape = data_shape(model)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    gen_dev = generator.device if generator is not None else dev
    x0 = torch.randn((n, *shape), generator=generator, device=gen_dev).to(dev)
    start = path.coupling_source(x0)  # the source point of the flow: sigma_0 x0
    x1 = torch.cat([sample(model, x0=chunk, path=path, method=method, steps=steps, **kwargs).x
                    for chunk in start.split(batch_size)])
    return x0, x1
