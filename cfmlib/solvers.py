r"""Integrating :math:`\frac{dx}{dt} = v(x, t)` forward and backward in time (chapters 2 and 7).

Fixed-step Euler, midpoint and RK4 run in a lean loop; adaptive methods
(``'dopri5'``, ``'bosh3'``, ``'adaptive_heun'``, ...) go through torchdiffeq.
The field is always called as ``v(x, t, **kwargs)`` with ``t`` a ``(batch,)``
tensor, so a :mod:`cfmlib.models` network can be passed directly.  Every
solve counts its function evaluations (NFE), the unit of sampling cost.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _checks

__all__ = ["FIXED_METHODS", "ADAPTIVE_METHODS", "METHODS", "Solution", "odeint", "sample"]

FIXED_METHODS = ("euler", "midpoint", "rk4")
ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
METHODS = FIXED_METHODS + ADAPTIVE_METHODS


@dataclass
class Solution:
    """The result of :func:`odeint`.

    ``x``: the state at ``t1`` (a tensor, or a tuple for tuple states); ``nfe``: number of
    evaluations of the field; ``trajectory``: states at ``times`` (stacked along a new first
    dimension) when requested, else ``None``.
    """

    x: torch.Tensor | tuple
    nfe: int
    trajectory: torch.Tensor | tuple | None = None
    times: torch.Tensor | None = None


def _axpy(x, h, k):
    if isinstance(x, tuple):
        return tuple(a + h * b for a, b in zip(x, k))
    return x + h * k


def _step(f, method, t, h, x):
    if method == "euler":
        return _axpy(x, h, f(t, x))
    if method == "midpoint":
        k1 = f(t, x)
        return _axpy(x, h, f(t + 0.5 * h, _axpy(x, 0.5 * h, k1)))
    k1 = f(t, x)
    k2 = f(t + 0.5 * h, _axpy(x, 0.5 * h, k1))
    k3 = f(t + 0.5 * h, _axpy(x, 0.5 * h, k2))
    k4 = f(t + h, _axpy(x, h, k3))
    if isinstance(x, tuple):
        return tuple(a + (h / 6) * (b1 + 2 * b2 + 2 * b3 + b4) for a, b1, b2, b3, b4 in zip(x, k1, k2, k3, k4))
    return x + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)


def _stack(states):
    if isinstance(states[0], tuple):
        return tuple(torch.stack(s) for s in zip(*states))
    return torch.stack(states)


def integrate(f, x, t0: float, t1: float, *, method: str = "euler", steps: int = 100, atol: float = 1e-5,
              rtol: float = 1e-5, trajectory: bool = False) -> Solution:
    """Integrate ``dx/dt = f(t, x)`` where ``t`` is a 0-d tensor and ``x`` a tensor or tuple of tensors.

    This is the engine under :func:`odeint` and :mod:`cfmlib.likelihood`; it performs no argument
    checks. The number of evaluations of ``f`` is returned in the solution.
    """
    nfe = 0
    ref = x[0] if isinstance(x, tuple) else x

    def counted(t, state):
        nonlocal nfe
        nfe += 1
        return f(t, state)

    times = torch.linspace(t0, t1, steps + 1, dtype=ref.dtype, device=ref.device)
    if method in FIXED_METHODS:
        h = (t1 - t0) / steps
        states = [x] if trajectory else None
        for i in range(steps):
            x = _step(counted, method, times[i], h, x)
            if trajectory:
                states.append(x)
        return Solution(x, nfe, _stack(states) if trajectory else None, times if trajectory else None)

    import torchdiffeq

    grid = times if trajectory else torch.tensor([t0, t1], dtype=ref.dtype, device=ref.device)
    out = torchdiffeq.odeint(counted, x, grid, method=method, atol=atol, rtol=rtol)
    last = tuple(o[-1] for o in out) if isinstance(out, tuple) else out[-1]
    return Solution(last, nfe, out if trajectory else None, grid if trajectory else None)


def odeint(v, x: torch.Tensor, t0: float = 0.0, t1: float = 1.0, *, method: str = "euler", steps: int = 100,
           atol: float = 1e-5, rtol: float = 1e-5, trajectory: bool = False, **kwargs) -> Solution:
    r"""Solve :math:`\dot x = v(x, t)` from ``t0`` to ``t1`` (``t1 < t0`` integrates backward).

    Args:
        v: the field, called as ``v(x, t, **kwargs)`` with ``t`` of shape ``(batch,)``.
        x: initial state, shape ``(batch, ...)``.
        method: one of :data:`METHODS`; fixed-step methods use ``steps`` steps, adaptive
            ones use ``atol`` / ``rtol``.
        trajectory: also return the states at ``steps + 1`` equally spaced times.
        **kwargs: passed to ``v`` (for example class labels ``y``).

    Returns:
        a :class:`Solution` with ``x`` at ``t1``, ``nfe``, and optionally ``trajectory``
        of shape ``(steps + 1, batch, ...)`` and ``times``.
    """
    if not callable(v):
        raise TypeError(f"v must be callable as v(x, t), got {_checks.describe(v)}")
    _checks.tensor("x", x)
    if x.ndim < 2:
        raise ValueError(f"x must be batched with shape (batch, ...), got shape {tuple(x.shape)}")
    _checks.choice("method", method, METHODS)
    _checks.positive_int("steps", steps)
    t0 = _checks.number("t0", t0, lo=0.0, hi=1.0)
    t1 = _checks.number("t1", t1, lo=0.0, hi=1.0)
    if method in ADAPTIVE_METHODS:
        _checks.number("atol", atol, lo=0.0, lo_open=True)
        _checks.number("rtol", rtol, lo=0.0, lo_open=True)
    _checks.module_device("model", v, x=x)
    if kwargs.get("y") is not None and getattr(v, "num_classes", None):
        _checks.labels("y", kwargs["y"], x.shape[0], v.num_classes)
    batch = x.shape[0]

    def f(t, state):
        return v(state, t.expand(batch), **kwargs)

    return integrate(f, x, t0, t1, method=method, steps=steps, atol=atol, rtol=rtol, trajectory=trajectory)


@torch.no_grad()
def sample(model, n: int | None = None, *, x0: torch.Tensor | None = None, path=None, method: str = "euler",
           steps: int = 100, atol: float = 1e-5, rtol: float = 1e-5, trajectory: bool = False,
           generator: torch.Generator | None = None, device=None, **kwargs) -> Solution:
    r"""Generate samples: draw ``x0`` from the source (or use the given one) and integrate
    the model's field from ``t = 0`` to ``path.t_max`` (``1`` unless the path is singular there).

    ``n`` samples of the model's data shape are drawn with ``generator`` on ``device``
    (default: the model's device) when ``x0`` is not given.  Returns a :class:`Solution`.
    """
    from .paths import get_path

    _checks.function("model", model)
    _checks.generator("generator", generator)
    path = get_path("ot" if path is None else path)
    if x0 is None:
        if n is None:
            raise ValueError("pass either n (the number of samples) or x0 (the starting noise)")
        _checks.positive_int("n", n)
        shape = _data_shape(model)
        from .device import get_device

        dev = get_device(device) if device is not None else next(model.parameters()).device
        gen_dev = generator.device if generator is not None else dev
        x0 = path.sample_source((n, *shape), generator=generator, device=gen_dev).to(dev)
    elif n is not None and n != x0.shape[0]:
        raise ValueError(f"n={n} disagrees with x0's batch size {x0.shape[0]}; pass one of them")
    return odeint(model, x0, 0.0, path.t_max, method=method, steps=steps, atol=atol, rtol=rtol,
                  trajectory=trajectory, **kwargs)


def _data_shape(model) -> tuple:
    cfg = getattr(model, "config", None) or getattr(getattr(model, "module", None), "config", None)
    if cfg and "dim" in cfg:
        return (cfg["dim"],)
    if cfg and "image_shape" in cfg:
        return tuple(cfg["image_shape"])
    raise ValueError("cannot tell the data shape of this model; pass x0 (the starting noise) instead of n")
