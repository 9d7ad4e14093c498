r"""Where training spends its time: densities for the training times :math:`t` (chapters 7 and 14).

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
"""
from __future__ import annotations

import math

import torch

from . import _checks

__all__ = ["uniform", "logit_normal", "mode", "TIME_SAMPLERS", "get_time_sampler"]


def uniform():
    r"""Times :math:`t \sim \mathcal U[0, 1]`."""
    def sample(n, generator=None, device=None, dtype=None):
        return torch.rand(n, generator=generator, device=device, dtype=dtype)
    sample.__name__ = "uniform"
    return sample


def logit_normal(loc: float = 0.0, scale: float = 1.0):
    r"""Times :math:`t = \mathrm{sigmoid}(\mathrm{loc} + \mathrm{scale}\, z)` with :math:`z \sim \mathcal N(0, 1)`."""
    loc = _checks.number("loc", loc)
    scale = _checks.number("scale", scale, lo=0.0, lo_open=True)

    def sample(n, generator=None, device=None, dtype=None):
        z = torch.randn(n, generator=generator, device=device, dtype=dtype)
        return torch.sigmoid(loc + scale * z)
    sample.__name__ = f"logit_normal({loc:g}, {scale:g})"
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
    sample.__name__ = f"mode({s:g})"
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
