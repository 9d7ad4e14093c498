r"""Integrating :math:`\frac{dx}{dt} = v(x, t)` forward and backward in time (chapters 2 and 7).

Fixed-step Euler, midpoint and RK4 run in a lean loop; adaptive methods
(``'dopri5'``, ``'bosh3'``, ``'adaptive_heun'``, ...) go through torchdiffeq.
The field is always called as ``v(x, t, **kwargs)`` with ``t`` a ``(batch,)``
tensor, so a :mod:`cfmlib.models` network can be passed directly.  Every
solve counts its function evaluations (NFE), the unit of sampling cost.
Chapter 11 adds samplers for a trained model: non-uniform time grids (:func:`time_grid`), Heun's
second-order steps on any grid (:func:`odeint_grid`) and the exponential integrators DDIM and
DPM-Solver++(2M) for Gaussian paths (:func:`exponential_integrator`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torchdiffeq

from . import _checks
from .device import get_device
from .models import data_shape
from .paths import gaussian_path, get_path

__all__ = ["FIXED_METHODS", "ADAPTIVE_METHODS", "METHODS", "Solution", "odeint", "sample", "source_points", "sdeint",
           "GRID_METHODS", "GRIDS", "time_grid", "odeint_grid", "exponential_integrator"]

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
    # only other evaluation outside is the probe of the initial step-size heuristic (the second
    # evaluation: a guess of the step size, not part of the solution); clamping its time keeps the
    # field inside the interval.  Any other time outside is a bug here, not a silent extrapolation.
    lo, hi = min(t0, t1), max(t0, t1)
    # the grid's end points are t0 and t1 rounded to the state's precision: that much is not "outside"
    slack = 4 * torch.finfo(ref.dtype).eps * max(1.0, abs(t0), abs(t1))

    def inside(t, state):
        tc = t.clamp(lo, hi)
        if nfe != 1 and float((t - tc).detach().abs()) > slack:
            raise RuntimeError(f"cfmlib: the adaptive solver asked for the field at t = {float(t):.6g}, outside "
                               f"[{lo:.6g}, {hi:.6g}]; this is a bug in cfmlib, please report it")
        return counted(tc, state)

    grid = (torch.linspace(t0, t1, steps + 1, dtype=ref.dtype, device=ref.device) if trajectory
            else torch.tensor([t0, t1], dtype=ref.dtype, device=ref.device))
    # step_t is the grid's own end point (t1 rounded as the grid rounds it): with t1 itself, a t1 that
    # the grid's precision rounds upwards (0.999 in float32) would be reached one step too early and
    # the next, unconfined step would overshoot.
    out = torchdiffeq.odeint(inside, x, grid, method=method, atol=atol, rtol=rtol,
                             options=dict(step_t=grid[-1:].detach().to("cpu", torch.float64)))
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


def source_points(model, path, n: int | None = None, x0: torch.Tensor | None = None, *,
                  generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """The starting noise of a sample (chapters 7 and 14): ``x0`` itself when given (its batch size
    must agree with ``n`` if both are given), else ``n`` draws from ``path``'s source in the model's
    data shape and floating-point precision, drawn with ``generator`` (on its device) and moved to
    ``device`` (default: the model's device)."""
    if x0 is not None:
        _checks.tensor("x0", x0)
        if n is not None and n != x0.shape[0]:
            raise ValueError(f"n={n} disagrees with x0's batch size {x0.shape[0]}; pass one of them")
        return x0
    if n is None:
        raise ValueError("pass either n (the number of samples) or x0 (the starting noise)")
    _checks.positive_int("n", n)
    shape = data_shape(model)
    dev = get_device(device) if device is not None else next(model.parameters()).device
    gen_dev = generator.device if generator is not None else dev
    param = next((q for q in model.parameters() if q.is_floating_point()), None) \
        if isinstance(model, torch.nn.Module) else None
    dtype = param.dtype if param is not None else None  # noise in the model's precision
    return path.sample_source((n, *shape), generator=generator, device=gen_dev, dtype=dtype).to(dev)


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
    path = gaussian_path("condot" if path is None else path, "cfmlib.solvers.sample")
    x0 = source_points(model, path, n, x0, generator=generator, device=device)
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
    path = gaussian_path(path, "cfmlib.solvers.sdeint")
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


# --- samplers for a trained model: time grids, Heun, exponential integrators (chapter 11) ----------
#: Fixed-step methods of :func:`odeint_grid` (``'heun'``: the explicit trapezoidal rule, 2 NFE per step).
GRID_METHODS = ("euler", "midpoint", "heun", "rk4")
#: Time grids of :func:`time_grid`.
GRIDS = ("uniform", "edm", "logsnr")


def time_grid(steps: int, kind: str = "uniform", *, path="condot", t0: float = 0.0, t1: float | None = None,
              rho: float = 7.0, sigma_min: float = 0.002, sigma_max: float = 80.0) -> torch.Tensor:
    r"""Times :math:`t_0 < t_1 < \dots < t_N` (``N = steps``) for the fixed-step samplers (chapter 11).

    * ``'uniform'`` -- equal steps from ``t0`` to ``t1`` (default ``path.t_max``).
    * ``'edm'`` -- Karras et al. (2022): the noise-to-signal ratio :math:`r_t = \sigma_t/\alpha_t` of the path
      (the noise level of the equivalent variance-exploding path) falls from :math:`r_{\max}` to
      :math:`r_{\min}` evenly in :math:`r^{1/\rho}`,
      :math:`r_i = \big(r_{\max}^{1/\rho} + \tfrac iN(r_{\min}^{1/\rho} - r_{\max}^{1/\rho})\big)^\rho`, with
      :math:`r_{\max} = \min(\sigma_{\max}, r_{t_0})` and :math:`r_{\min} = \max(\sigma_{\min}, r_{t_1})`;
      large ``rho`` crowds the steps towards the data end.
    * ``'logsnr'`` -- even steps in :math:`\lambda_t = \log(\alpha_t/\sigma_t)` between the same limits
      (the ``rho -> inf`` limit of ``'edm'``; the grid of DPM-Solver).

    The ratio grids are mapped to times through the path (:meth:`cfmlib.paths.AffinePath.time_of_log_snr`),
    and their end points are then set to ``t0`` and ``t1`` exactly, so every grid starts at the source and
    ends where sampling ends.  Returns a float64 tensor of shape ``(steps + 1,)``.
    """
    _checks.positive_int("steps", steps)
    _checks.choice("kind", kind, GRIDS)
    path = get_path(path)
    t0 = _checks.number("t0", t0, lo=0.0, hi=1.0)
    t1 = _checks.number("t1", path.t_max if t1 is None else t1, lo=0.0, hi=1.0)
    if not t1 > t0:
        raise ValueError(f"a time grid runs forward: need t0 < t1, got t0={t0}, t1={t1}")
    if kind == "uniform":
        return torch.linspace(t0, t1, steps + 1, dtype=torch.float64)
    path = gaussian_path(path, f"time_grid(kind={kind!r})")
    rho = _checks.number("rho", rho, lo=0.0, lo_open=True)
    sigma_min = _checks.number("sigma_min", sigma_min, lo=0.0, lo_open=True)
    sigma_max = _checks.number("sigma_max", sigma_max, lo=sigma_min, lo_open=True)
    lam = path.log_snr(torch.tensor([t0, t1], dtype=torch.float64))
    lam_lo, lam_hi = max(float(lam[0]), -math.log(sigma_max)), min(float(lam[1]), -math.log(sigma_min))
    if not lam_hi > lam_lo:
        raise ValueError(f"the path's noise-to-signal ratio on [t0, t1] = [{t0}, {t1}] does not overlap "
                         f"[sigma_min, sigma_max] = [{sigma_min}, {sigma_max}]; widen them")
    i = torch.arange(steps + 1, dtype=torch.float64) / steps
    if kind == "edm":
        r_hi, r_lo = math.exp(-lam_lo) ** (1 / rho), math.exp(-lam_hi) ** (1 / rho)
        lams = -rho * torch.log(r_hi + i * (r_lo - r_hi))
    else:
        lams = lam_lo + i * (lam_hi - lam_lo)
    times = path.time_of_log_snr(lams)
    times[0], times[-1] = t0, t1
    if not bool((times[1:] > times[:-1]).all()):
        raise ValueError(f"the {kind!r} grid of {steps} steps has repeated times (steps too many for the "
                         f"ratio range); use fewer steps or widen sigma_min, sigma_max")
    return times


def _grid(times, x):
    if isinstance(times, (list, tuple)):
        times = torch.tensor(times, dtype=torch.float64)
    _checks.tensor("times", times, ndim=1)
    if times.shape[0] < 2:
        raise ValueError(f"times must hold at least two times (one step), got {times.shape[0]}")
    if bool(((times < 0) | (times > 1)).any()):
        raise ValueError(f"times must lie in [0, 1], got values in [{float(times.min()):.4g}, {float(times.max()):.4g}]")
    return times.detach().to("cpu", torch.float64)


def _field(v, x, kwargs):
    if not callable(v):
        raise TypeError(f"v must be callable as v(x, t), got {_checks.describe(v)}")
    _checks.tensor("x", x)
    if x.ndim < 2:
        raise ValueError(f"x must be batched with shape (batch, ...), got shape {tuple(x.shape)}")
    _checks.module_device("model", v, x=x)
    _checks.module_dtype("model", v, x=x)
    if kwargs.get("y") is not None and getattr(v, "num_classes", None):
        _checks.labels("y", kwargs["y"], x.shape[0], v.num_classes)
    batch, first = x.shape[0], [True]

    def f(t, state):
        out = v(state, torch.full((batch,), float(t), dtype=state.dtype, device=state.device), **kwargs)
        if first[0]:
            _checks.field_output("v", out, state)
            first[0] = False
        return out
    return f


def odeint_grid(v, x: torch.Tensor, times, *, method: str = "heun", trajectory: bool = False, **kwargs) -> Solution:
    r"""Solve :math:`\dot x = v(x, t)` with fixed steps on a given time grid (chapter 11).

    ``times``: a 1-D tensor (or list) of times in ``[0, 1]``, monotone (e.g. :func:`time_grid`); step ``k``
    goes from ``times[k]`` to ``times[k + 1]`` with ``method``, one of :data:`GRID_METHODS`:
    Euler, midpoint and RK4 as in :func:`odeint`, and ``'heun'``, the explicit trapezoidal rule
    :math:`x_{k+1} = x_k + \tfrac h2\big(v(x_k, t_k) + v(x_k + h\,v(x_k, t_k), t_{k+1})\big)`, second order,
    two evaluations per step, the last one at the step's end (Karras et al., 2022, who skip that last
    correction on the final step only because their denoiser form is singular at zero noise).
    Heun and RK4 evaluate the field at the grid's end, midpoint and Euler never do.
    ``**kwargs`` go to ``v`` (e.g. labels ``y``).  Returns a :class:`Solution`.
    """
    _checks.choice("method", method, GRID_METHODS)
    f = _field(v, x, kwargs)
    grid = _grid(times, x)
    h = grid[1:] - grid[:-1]
    if not (bool((h > 0).all()) or bool((h < 0).all())):
        raise ValueError("times must be strictly increasing (or strictly decreasing to integrate backward)")
    nfe = 0

    def counted(t, state):
        nonlocal nfe
        nfe += 1
        return f(t, state)

    states = [x] if trajectory else None
    for k in range(len(h)):
        t, hk = grid[k], float(h[k])
        if method == "heun":
            k1 = counted(t, x)
            k2 = counted(t + hk, _axpy(x, hk, k1))
            x = x + (0.5 * hk) * (k1 + k2)
        else:
            x = _step(counted, method, t, hk, x)
        if trajectory:
            states.append(x)
    return Solution(x, nfe, torch.stack(states) if trajectory else None,
                    grid.to(x.dtype) if trajectory else None)


@torch.no_grad()
def exponential_integrator(v, x: torch.Tensor, path, times, *, order: int = 2, trajectory: bool = False,
                           **kwargs) -> Solution:
    r"""Sample an affine Gaussian path's probability-flow ODE with an exponential integrator (chapter 11).

    Written with the data prediction :math:`\hat x_1 = (\dot\sigma_t x - \sigma_t v)/(\alpha_t\dot\sigma_t - \sigma_t\dot\alpha_t)`
    of the velocity ``v`` (:meth:`cfmlib.paths.AffinePath.velocity_to_x1`), the field is
    :math:`\dot x = \frac{\dot\sigma_t}{\sigma_t} x + \big(\dot\alpha_t - \frac{\dot\sigma_t}{\sigma_t}\alpha_t\big)\hat x_1`: a linear part
    solved exactly plus a slowly varying one.  Holding :math:`\hat x_1` fixed over a step gives DDIM
    (Song et al., 2021), the first-order step (``order=1``)

    .. math::  x_{k+1} = \frac{\sigma_{k+1}}{\sigma_k}\, x_k + \Big(\alpha_{k+1} - \alpha_k\frac{\sigma_{k+1}}{\sigma_k}\Big)\hat x_1(x_k, t_k)
               = \alpha_{k+1}\hat x_1 + \sigma_{k+1}\hat x_0 ;

    ``order=2`` is the multistep DPM-Solver++(2M) of Lu et al. (2022), which replaces :math:`\hat x_1` by
    :math:`(1 + \tfrac1{2r})\hat x_1^{(k)} - \tfrac1{2r}\hat x_1^{(k-1)}`, :math:`r = h_{k-1}/h_k`, with
    :math:`h_k = \lambda_{k+1} - \lambda_k` in the log signal-to-noise ratio :math:`\lambda = \log(\alpha/\sigma)`;
    it takes first-order steps where :math:`h_{k-1}` or :math:`h_k` is infinite (the first step from
    :math:`\alpha = 0`, a last step to :math:`\sigma = 0`).  One evaluation per step.  A single data
    point is reached exactly in one step, and on the CondOT path the first-order step *is* Euler's.

    Args:
        v: the velocity field ``v(x, t, **kwargs)`` of a model trained on ``path``.
        x: the starting samples at ``times[0]``.
        path: the :class:`~cfmlib.paths.AffinePath` (or name) the model was trained on.
        times: increasing times (e.g. :func:`time_grid`); :math:`\sigma_t > 0` at every time but the last.
        order: 1 (DDIM) or 2 (DPM-Solver++(2M)).
    """
    path = gaussian_path(path, "exponential_integrator")
    if order not in (1, 2) or isinstance(order, bool):
        raise ValueError(f"order must be 1 (DDIM) or 2 (DPM-Solver++(2M)), got {order!r}")
    f = _field(v, x, kwargs)
    grid = _grid(times, x)
    if not bool((grid[1:] > grid[:-1]).all()):
        raise ValueError("times must be strictly increasing (the exponential integrator runs from noise to data)")
    a, s, da, ds = (c.tolist() for c in path.schedule(grid, like=grid))
    if any(si <= 0 for si in s[:-1]):
        k = next(i for i, si in enumerate(s[:-1]) if si <= 0)
        raise ValueError(f"times: sigma_t = 0 at t = {float(grid[k]):.4g} before the last time; the step divides "
                         f"by sigma_t there (end the grid at the first time with sigma_t = 0)")
    lam = path.log_snr(grid).tolist()
    states, nfe, prev = ([x] if trajectory else None), 0, None
    for k in range(len(grid) - 1):
        vel = f(grid[k], x)
        nfe += 1
        x1 = (ds[k] * x - s[k] * vel) / (a[k] * ds[k] - s[k] * da[k])       # data prediction at t_k
        d = x1
        h = lam[k + 1] - lam[k]
        if order == 2 and prev is not None and math.isfinite(h) and math.isfinite(prev[1]):
            r = prev[1] / h
            d = (1 + 0.5 / r) * x1 - (0.5 / r) * prev[0]
        ratio = s[k + 1] / s[k]
        x = ratio * x + (a[k + 1] - a[k] * ratio) * d
        prev = (x1, h)
        if trajectory:
            states.append(x)
    return Solution(x, nfe, torch.stack(states) if trajectory else None, grid.to(x.dtype) if trajectory else None)
