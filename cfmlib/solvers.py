r"""Integrating :math:`\frac{dx}{dt} = v(x, t)` forward and backward in time (chapters 2 and 7).

Fixed-step Euler, midpoint and RK4 run in a lean loop; adaptive methods
(``'dopri5'``, ``'bosh3'``, ``'adaptive_heun'``, ...) go through torchdiffeq.
The field is always called as ``v(x, t, **kwargs)`` with ``t`` a ``(batch,)``
tensor, so a :mod:`cfmlib.models` network can be passed directly.  Every
solve counts its function evaluations (NFE), the unit of sampling cost.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torchdiffeq

from . import _checks
from .device import get_device
from .models import data_shape
from .paths import get_path

__all__ = ["FIXED_METHODS", "ADAPTIVE_METHODS", "METHODS", "Solution", "odeint", "sample", "sdeint"]

#: Fixed-step methods, run in cfmlib's own loop.
FIXED_METHODS = ("euler", "midpoint", "rk4")
#: Adaptive methods, run through torchdiffeq with ``atol`` / ``rtol``.
ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
#: Every solver name accepted by :func:`odeint` and :func:`sample`.
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
    """``x + h k`` in one fused operation (no temporary for ``h k``)."""
    if isinstance(x, tuple):
        return tuple(torch.add(a, b, alpha=h) for a, b in zip(x, k))
    return torch.add(x, k, alpha=h)


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

    if method in FIXED_METHODS:
        times = torch.linspace(t0, t1, steps + 1, dtype=ref.dtype, device=ref.device)
        h = (t1 - t0) / steps
        states = [x] if trajectory else None
        for i in range(steps):
            x = _step(counted, method, times[i], h, x)
            if trajectory:
                states.append(x)
        return Solution(x, nfe, _stack(states) if trajectory else None, times if trajectory else None)

    # Adaptive steps must never leave [t0, t1]: torchdiffeq would otherwise step past t1 and
    # interpolate back, evaluating the field where it may be undefined (or, for a network, where it
    # was never trained).  `step_t=[t1]` makes the step that would cross t1 end exactly on it.  The
    # only other evaluation outside is the probe of the initial step-size heuristic (a guess of the
    # step size, not part of the solution); clamping its time keeps the field inside the interval.
    lo, hi = min(t0, t1), max(t0, t1)
    grid = (torch.linspace(t0, t1, steps + 1, dtype=ref.dtype, device=ref.device) if trajectory
            else torch.tensor([t0, t1], dtype=ref.dtype, device=ref.device))
    out = torchdiffeq.odeint(lambda t, state: counted(t.clamp(lo, hi), state), x, grid, method=method,
                             atol=atol, rtol=rtol, options=dict(step_t=torch.tensor([t1], dtype=torch.float64)))
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
    if t0 == t1:
        raise ValueError(f"t0 and t1 must differ (both are {t0}); there is nothing to integrate")
    _checks.module_device("model", v, x=x)
    _checks.module_dtype("model", v, x=x)
    if kwargs.get("y") is not None and getattr(v, "num_classes", None):
        _checks.labels("y", kwargs["y"], x.shape[0], v.num_classes)
    batch = x.shape[0]
    first = [True]

    def f(t, state):
        out = v(state, t.expand(batch), **kwargs)
        if first[0]:  # once per solve: a wrongly shaped field would otherwise broadcast silently
            _checks.field_output("v", out, state)
            first[0] = False
        return out

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
    _checks.function("model", model)
    _checks.generator("generator", generator)
    path = get_path("condot" if path is None else path)
    if x0 is None:
        if n is None:
            raise ValueError("pass either n (the number of samples) or x0 (the starting noise)")
        _checks.positive_int("n", n)
        shape = data_shape(model)
        dev = get_device(device) if device is not None else next(model.parameters()).device
        gen_dev = generator.device if generator is not None else dev
        param = next((q for q in model.parameters() if q.is_floating_point()), None) \
            if isinstance(model, torch.nn.Module) else None
        dtype = param.dtype if param is not None else None  # noise in the model's precision
        x0 = path.sample_source((n, *shape), generator=generator, device=gen_dev, dtype=dtype).to(dev)
    elif n is not None and n != x0.shape[0]:
        raise ValueError(f"n={n} disagrees with x0's batch size {x0.shape[0]}; pass one of them")
    return odeint(model, x0, 0.0, path.t_max, method=method, steps=steps, atol=atol, rtol=rtol,
                  trajectory=trajectory, **kwargs)


@torch.no_grad()
def sdeint(v, x: torch.Tensor, path, t0: float = 0.0, t1: float | None = None, *, steps: int = 100, g=1.0,
           generator: torch.Generator | None = None, trajectory: bool = False, **kwargs) -> Solution:
    r"""Sample with the SDE that shares the marginals :math:`p_t` of the field ``v`` (chapter 10).

    Euler--Maruyama for (time from noise ``t = 0`` to data ``t = 1``)

    .. math::  dx = \Big[v(x, t) + \frac{g(t)^2}{2}\nabla\log p_t(x)\Big]dt + g(t)\, dW_t ,

    where the score is derived from the velocity through the Gaussian path,
    :math:`\nabla\log p_t = -\hat x_0/\sigma_t` (:meth:`cfmlib.paths.AffinePath.velocity_to_score`).
    By the Fokker--Planck equation the extra drift cancels the diffusion term, so every ``g``
    leaves the marginals of the probability-flow ODE unchanged; ``g = 0`` is Euler on the ODE.

    Guard near the data end: the score grows like :math:`1/\sigma_t` and the drift's stiffness like
    :math:`g^2/(2\sigma_t^2)`, which makes an explicit step unstable when :math:`\sigma_t \to 0`
    (``t -> 1`` for the OT, cosine and VP paths).  The diffusion coefficient used in each step is
    therefore capped, :math:`g_{\mathrm{eff}}(t) = \min(g(t), \sigma_t/\sqrt h)`, which keeps the
    contraction per step :math:`h g_{\mathrm{eff}}^2 / (2\sigma_t^2) \le 1/2`; since any ``g`` gives the
    same marginals this is still a valid sampler (the cap only removes noise where the step could
    not resolve it).  Where :math:`g_{\mathrm{eff}} = 0` the score is not evaluated, so the step never
    divides by :math:`\sigma_t = 0`.  The field is evaluated at the left end of each step, never at
    ``t1``; ``t1`` defaults to ``path.t_max``.

    Args:
        v: the velocity field, called as ``v(x, t, **kwargs)`` with ``t`` of shape ``(batch,)``;
            it must have been trained on ``path``.
        x: the starting samples ``(batch, ...)`` at ``t0`` (e.g. ``path.sample_source(...)``).
        path: the Gaussian path (name or :class:`cfmlib.paths.AffinePath`) that links velocity and score.
        t0, t1: start and end time, ``0 <= t0 < t1 <= 1``.
        steps: number of Euler--Maruyama steps (one evaluation of ``v`` each).
        g: the diffusion coefficient, a non-negative number or a callable ``g(t)`` of a 0-d tensor.
        generator: the random generator of the Brownian increments.
        trajectory: also return the states at the ``steps + 1`` grid times.

    Returns:
        a :class:`Solution` (``nfe == steps``).
    """
    if not callable(v):
        raise TypeError(f"v must be callable as v(x, t), got {_checks.describe(v)}")
    _checks.tensor("x", x)
    if x.ndim < 2:
        raise ValueError(f"x must be batched with shape (batch, ...), got shape {tuple(x.shape)}")
    path = get_path(path)
    _checks.positive_int("steps", steps)
    _checks.generator("generator", generator)
    _checks.module_device("model", v, x=x)
    _checks.module_dtype("model", v, x=x)
    if kwargs.get("y") is not None and getattr(v, "num_classes", None):
        _checks.labels("y", kwargs["y"], x.shape[0], v.num_classes)
    t0 = _checks.number("t0", t0, lo=0.0, hi=1.0)
    t1 = _checks.number("t1", path.t_max if t1 is None else t1, lo=0.0, hi=1.0)
    if not t1 > t0:
        raise ValueError(f"sdeint integrates forward in time: need t0 < t1, got t0={t0}, t1={t1}")
    if callable(g):
        g_fn = g
    else:
        g_const = _checks.number("g", g, lo=0.0)
        g_fn = lambda t: g_const  # noqa: E731
    batch, h = x.shape[0], (t1 - t0) / steps
    times = torch.linspace(t0, t1, steps + 1, dtype=x.dtype, device=x.device)
    states = [x] if trajectory else None
    nfe = 0
    for i in range(steps):
        tb = times[i].expand(batch)
        vel = v(x, tb, **kwargs)
        nfe += 1
        gi = float(g_fn(times[i]))
        if not (math.isfinite(gi) and gi >= 0):
            raise ValueError(f"g(t) must be a finite non-negative number, got {gi} at t={float(times[i]):.4g}")
        sig = float(path.sigma(times[i : i + 1]))
        g_eff = min(gi, sig / math.sqrt(h))
        if g_eff > 0:
            drift = vel + 0.5 * g_eff**2 * path.velocity_to_score(vel, x, tb, check=False)
            gen_dev = generator.device if generator is not None else x.device
            noise = torch.randn(x.shape, generator=generator, device=gen_dev, dtype=x.dtype).to(x.device)
            x = x + h * drift + g_eff * math.sqrt(h) * noise
        else:
            x = x + h * vel
        if trajectory:
            states.append(x)
    return Solution(x, nfe, torch.stack(states) if trajectory else None, times if trajectory else None)
