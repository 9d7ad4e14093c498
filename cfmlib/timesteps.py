r"""Where training spends its time: densities for the training times :math:`t` (chapters 7 and 11).

The flow-matching loss averages over :math:`t \sim \mathcal U[0, 1]`; any other density
:math:`\pi(t) > 0` gives the same minimiser (the regression is pointwise in :math:`t`) but spends
the network's capacity and the gradient noise differently.  A time sampler is called as
``sampler(n, generator=g, device=..., dtype=...)`` and returns ``(n,)`` times in ``[0, 1]``;
:func:`cfmlib.training.train` rescales them to ``[0, path.t_max]``.

* ``'uniform'`` -- :math:`\mathcal U[0, 1]`.
* ``'logit_normal'`` -- :math:`t = \mathrm{sigmoid}(m + s\,z)`, :math:`z \sim \mathcal N(0, 1)`
  (Esser et al., 2024): more samples at intermediate times.
* ``'mode'`` -- Esser et al.'s "mode sampling with heavy tails",
  :math:`t = 1 - f(u)`, :math:`f(u) = 1 - u - s(\cos^2(\pi u / 2) - 1 + u)`, :math:`u \sim \mathcal U[0,1]`.

Each sampler carries its density as ``sampler.density(t)`` (a tensor of times in ``[0, 1]`` to a tensor of
the same shape).  Drawing times from :math:`\pi` and drawing them uniformly with the loss weight
:math:`\pi(t)` (``train(weighting=sampler.density)``) give the same expected loss and gradient, with
different variances (chapter 11).
"""
from __future__ import annotations

import math

import torch

from . import _checks

__all__ = ["uniform", "logit_normal", "mode", "TIME_SAMPLERS", "get_time_sampler"]


def _density(fn):
    """Wrap a density of the times so that it checks its argument (a tensor of times in ``[0, 1]``)."""
    def density(t):
        _checks.tensor("t", t)
        if bool(((t < 0) | (t > 1)).any()):
            raise ValueError(f"t must lie in [0, 1], got values in [{float(t.min()):.4g}, {float(t.max()):.4g}]")
        return fn(t)
    return density


def uniform():
    r"""Times :math:`t \sim \mathcal U[0, 1]`."""
    def sample(n, generator=None, device=None, dtype=None):
        return torch.rand(n, generator=generator, device=device, dtype=dtype)
    sample.__name__ = "uniform"
    sample.density = _density(lambda t: torch.ones_like(t))
    return sample


def logit_normal(loc: float = 0.0, scale: float = 1.0):
    r"""Times :math:`t = \mathrm{sigmoid}(\mathrm{loc} + \mathrm{scale}\, z)` with :math:`z \sim \mathcal N(0, 1)`."""
    loc = _checks.number("loc", loc)
    scale = _checks.number("scale", scale, lo=0.0, lo_open=True)

    def sample(n, generator=None, device=None, dtype=None):
        z = torch.randn(n, generator=generator, device=device, dtype=dtype)
        return torch.sigmoid(loc + scale * z)

    def density(t):  # the normal density of logit(t), times d logit(t)/dt = 1 / (t (1 - t))
        inside = (t > 0) & (t < 1)
        tc = torch.where(inside, t, torch.full_like(t, 0.5))
        z = (torch.logit(tc) - loc) / scale
        dens = torch.exp(-0.5 * z**2) / (scale * math.sqrt(2 * math.pi) * tc * (1 - tc))
        return torch.where(inside, dens, torch.zeros_like(t))
    sample.__name__ = f"logit_normal({loc:g}, {scale:g})"
    sample.density = _density(density)
    return sample


def mode(s: float = 1.29):
    r"""Mode sampling with heavy tails (Esser et al., 2024), written in this book's time direction.

    With :math:`u \sim \mathcal U[0, 1]`, :math:`f(u) = 1 - u - s(\cos^2(\pi u/2) - 1 + u)` is the
    noise level of the paper (1 = noise); our time is :math:`t = 1 - f(u)`.  ``s`` in
    :math:`[-1, 2/(\pi - 2)]` keeps :math:`f` monotone; ``s = 0`` is uniform.
    """
    s = _checks.number("s", s, lo=-1.0, hi=2.0 / (math.pi - 2.0))

    def sample(n, generator=None, device=None, dtype=None):
        u = torch.rand(n, generator=generator, device=device, dtype=dtype)
        f = 1.0 - u - s * (torch.cos(0.5 * math.pi * u) ** 2 - 1.0 + u)
        return (1.0 - f).clamp(0.0, 1.0)

    def density(t):  # t = g(u) = u + s (cos^2(pi u / 2) - 1 + u) increases; invert by bisection
        lo, hi = torch.zeros_like(t), torch.ones_like(t)
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            up = mid + s * (torch.cos(0.5 * math.pi * mid) ** 2 - 1.0 + mid) < t
            lo, hi = torch.where(up, mid, lo), torch.where(up, hi, mid)
        u = 0.5 * (lo + hi)
        return 1.0 / (1.0 + s * (1.0 - 0.5 * math.pi * torch.sin(math.pi * u)))
    sample.__name__ = f"mode({s:g})"
    sample.density = _density(density)
    return sample


#: Time samplers known by name to :func:`get_time_sampler` (and to ``train(time_sampler=...)``).
TIME_SAMPLERS = {"uniform": uniform, "logit_normal": logit_normal, "mode": mode}


def get_time_sampler(sampler="uniform"):
    """A time sampler from a name in :data:`TIME_SAMPLERS` (default parameters) or a callable
    ``sampler(n, generator=g, device=..., dtype=...) -> (n,)`` passed through unchanged."""
    if callable(sampler):
        return sampler
    _checks.choice("time_sampler", sampler, TIME_SAMPLERS)
    return TIME_SAMPLERS[sampler]()
