r"""Affine Gaussian conditional probability paths (chapters 5, 6, 10 and 11).

A path is fixed by two scalar schedules of time, :math:`\alpha_t` and
:math:`\sigma_t`.  Given a data point ``x1`` and a noise sample ``x0 ~ N(0, I)``,

.. math::  x_t = \psi_t(x_0 \mid x_1) = \alpha_t x_1 + \sigma_t x_0,
           \qquad p_t(x \mid x_1) = \mathcal N(x;\ \alpha_t x_1,\ \sigma_t^2 I),

so that :math:`\mu_t(x_1) = \alpha_t x_1`.  Time runs from noise (``t = 0``)
to data (``t = 1``), as in Lipman et al. (2023).  Everything else -- samples
``xt``, the conditional target field ``ut``, conditional scores and the
conversions between velocity, score and noise prediction -- is derived from
the schedule in this one base class.  Adding a path means writing
``alpha`` and ``sigma`` (and, for speed, their derivatives).  :class:`PredictionPath`
trains a network to predict the data or the noise instead of the velocity (chapter 11).

Shapes: ``x0``, ``x1``, ``x`` are ``(batch, ...)``; ``t`` is a number or a
``(batch,)`` / ``(batch, 1)`` tensor with values in ``[0, 1]``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import _checks

__all__ = ["ProbabilityPath", "AffinePath", "gaussian_path", "CondOTPath", "VEPath", "VPPath", "CosinePath", "PATHS", "get_path",
           "SchedulerChange", "scheduler_change", "TARGETS", "PredictionPath", "PredictedVelocity"]


def _bc(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a ``(batch,)`` schedule value to broadcast against ``x``."""
    return s.reshape(-1, *([1] * (x.ndim - 1)))



def _mean_squared_error(out: torch.Tensor, goal: torch.Tensor, xt: torch.Tensor, weight, what: str) -> torch.Tensor:
    """The mean over the batch of ``weight * |out - goal|^2`` (summed over coordinates), in at least
    float32; a shape mismatch is an error (free to check, and a broadcast would train on a wrong loss)."""
    if out.shape != goal.shape:
        raise ValueError(f"the model returned shape {tuple(out.shape)} for inputs of shape {tuple(xt.shape)}; {what}")
    dt = torch.promote_types(torch.promote_types(out.dtype, goal.dtype), torch.float32)
    err = (out.to(dt) - goal.to(dt)).pow(2).flatten(1).sum(1)
    if weight is not None:
        err = err * weight.to(dt)
    return err.mean()

class ProbabilityPath:
    r"""What :func:`cfmlib.training.train` needs from a path: the path decides the loss.

    Every path of cfmlib is one: the Gaussian paths below, and paths on other spaces (finite state
    spaces, manifolds) defined elsewhere.  A subclass provides

    * ``t_max`` -- the largest training and sampling time (below 1 where the target blows up);
    * :meth:`draw_x0` -- a source sample for a batch of data, in the path's own parameterisation;
    * :meth:`coupling_source` -- the points of :math:`p_0` that a coupling pairs with the data;
    * :meth:`loss` -- the regression loss on a batch ``(x0, x1, t)``, without argument checks;
    * :meth:`check_batch` -- the argument checks of that loss (:func:`cfmlib.training.cfm_loss` and
      :func:`cfmlib.training.train_step` call it);
    * optionally :meth:`draw_t` (training times) and :meth:`check_data` (what data the path accepts);
    * ``loss_name`` -- what the loss is called in messages (a NaN loss names it);
    * ``sampler`` -- the function that samples a model trained on the path, where
      :func:`cfmlib.solvers.sample` (which integrates Gaussian paths) does not apply.
    """

    name = "path"
    t_max = 1.0
    loss_name = "the loss"
    sampler = ""

    def draw_x0(self, x1: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A source sample ``x0`` for the batch of data ``x1``, drawn from ``generator`` (abstract)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def coupling_source(self, x0: torch.Tensor) -> torch.Tensor:
        """The source points that a coupling pairs with data (``x0`` itself unless overridden)."""
        return x0

    def draw_t(self, n: int, sampler, generator: torch.Generator | None, device, dtype) -> torch.Tensor:
        """Training times: ``sampler``'s draws in ``[0, 1]`` scaled to ``[0, t_max]``, shape ``(n,)``."""
        t = sampler(n, generator=generator, device=device, dtype=dtype)
        return t * self.t_max if self.t_max != 1.0 else t

    def check_data(self, name: str, x1: torch.Tensor) -> None:
        """Raise when ``x1`` cannot be data for this path (default: a finite floating tensor)."""
        _checks.tensor(name, x1, finite=False)

    def check_batch(self, x0, x1, t, model=None) -> torch.Tensor:
        """Check a batch for :meth:`loss` and return ``t`` as a ``(batch,)`` tensor (abstract)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def loss(self, model, x0, x1, t, y=None, weight=None) -> torch.Tensor:
        """The training loss of ``model`` on the batch ``(x0, x1, t)`` with optional labels ``y`` and
        per-sample weights ``weight``, without argument checks (abstract)."""
        raise NotImplementedError  # pragma: no cover - abstract


class AffinePath(ProbabilityPath):
    r"""Base class: a Gaussian path :math:`x_t = \alpha_t x_1 + \sigma_t x_0`.

    Subclasses implement :meth:`alpha` and :meth:`sigma` (elementwise functions
    of a ``(batch,)`` tensor ``t``).  :meth:`d_alpha` and :meth:`d_sigma`
    default to automatic differentiation and may be overridden with closed
    forms.  ``t_max`` is the largest time at which the conditional field is
    finite and well conditioned (below 1 only for paths whose
    :math:`\dot\sigma_t` diverges at ``t = 1``).
    """

    name = "affine"
    t_max = 1.0
    loss_name = "the CFM loss"
    sampler = "cfmlib.solvers.sample"

    # --- the schedule --------------------------------------------------------
    def alpha(self, t: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        r"""The signal coefficient :math:`\alpha_t` of :math:`x_t = \alpha_t x_1 + \sigma_t x_0` (elementwise in ``t``)."""
        raise NotImplementedError

    def sigma(self, t: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        r"""The noise coefficient :math:`\sigma_t` of :math:`x_t = \alpha_t x_1 + \sigma_t x_0` (elementwise in ``t``)."""
        raise NotImplementedError

    def _derivative(self, fn, t: torch.Tensor) -> torch.Tensor:
        # A schedule that does not depend on t (e.g. alpha_t = 1 written as a constant) has no
        # graph to differentiate; its derivative is zero.
        with torch.enable_grad():
            tt = t.detach().clone().requires_grad_(True)
            out = fn(tt)
            if not isinstance(out, torch.Tensor):
                out = torch.as_tensor(out, dtype=tt.dtype, device=tt.device)
            if not out.requires_grad:
                return torch.zeros_like(tt)
            (d,) = torch.autograd.grad(out.sum(), tt, allow_unused=True)
        return torch.zeros_like(tt) if d is None else d

    def d_alpha(self, t: torch.Tensor) -> torch.Tensor:
        r""":math:`\dot\alpha_t` (autograd unless overridden)."""
        return self._derivative(self.alpha, t)

    def d_sigma(self, t: torch.Tensor) -> torch.Tensor:
        r""":math:`\dot\sigma_t` (autograd unless overridden)."""
        return self._derivative(self.sigma, t)

    def sigma_d_sigma(self, t: torch.Tensor) -> torch.Tensor:
        r""":math:`\sigma_t\dot\sigma_t = \tfrac12 \tfrac{d}{dt}\sigma_t^2`, finite where
        :math:`\dot\sigma_t` alone is not (the VP path at ``t = 1``); overridden there."""
        return self.sigma(t) * self.d_sigma(t)

    def schedule(self, t, like: torch.Tensor | None = None, batch: int | None = None):
        r"""Return :math:`(\alpha_t, \sigma_t, \dot\alpha_t, \dot\sigma_t)`, each of shape ``(batch,)``."""
        t = _checks.time("t", t, batch, like=like)
        return self.alpha(t), self.sigma(t), self.d_alpha(t), self.d_sigma(t)

    @property
    def source_scale(self) -> float:
        r""":math:`\sigma_0`: the standard deviation of the source :math:`p_0 \approx N(0, \sigma_0^2 I)`."""
        return float(self.sigma(torch.zeros(1, dtype=torch.float64)))

    def sample_source(self, shape, *, generator: torch.Generator | None = None, device=None,
                      dtype=None) -> torch.Tensor:
        """Draw from the source distribution ``N(0, source_scale**2 I)`` with the given shape."""
        _checks.shape("shape", shape)
        _checks.generator("generator", generator)
        return self.source_scale * torch.randn(*shape, generator=generator, device=device, dtype=dtype)

    # --- what training needs (ProbabilityPath) ---------------------------------
    def draw_x0(self, x1: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        r"""Standard-normal noise :math:`x_0` of ``x1``'s shape, dtype and device (the source point
        is :math:`\sigma_0 x_0`, see :meth:`coupling_source`)."""
        return torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)

    def coupling_source(self, x0: torch.Tensor) -> torch.Tensor:
        r"""The source points :math:`\sigma_0 x_0` that a coupling pairs with data (``x0`` itself when
        :math:`\sigma_0 = 1`; the VE path's source is wide)."""
        scale = self.source_scale
        return x0 if scale == 1.0 else scale * x0

    def check_data(self, name: str, x1: torch.Tensor) -> None:
        """Data for a Gaussian path: a floating tensor ``(batch, ...)``."""
        _checks.tensor(name, x1, finite=False)
        if x1.ndim < 2:
            raise ValueError(f"{name} must be batched with shape (batch, ...), got shape {tuple(x1.shape)}")

    def check_batch(self, x0, x1, t, model=None) -> torch.Tensor:
        """The checks of :func:`cfmlib.training.cfm_loss`: shapes, dtypes and devices on every call;
        finite values and ``0 <= t <= t_max`` on every call for CPU tensors and on calls 1, 2, 4, 8, ...
        on an accelerator (reading values there waits for the device). Returns ``t`` as a ``(batch,)`` tensor."""
        t = self._pair(x0, x1, t, hi=self.t_max, why="the conditional target")
        if model is not None:
            _checks.module_device("model", model, x1=x1)
            _checks.module_dtype("model", model, x1=x1)
        return t

    def loss(self, model, x0, x1, t, y=None, weight=None) -> torch.Tensor:
        r"""The CFM loss on a batch, :math:`\frac1n\sum_j w_j \lVert v_\theta(x_{t_j}, t_j) - u_{t_j}(x_{t_j} \mid x_{1,j})\rVert^2`,
        without argument checks (:func:`cfmlib.training.cfm_loss` is the checked front door).

        ``t``: a ``(batch,)`` tensor; ``weight``: optional ``(batch,)`` weights :math:`w_j` (default 1).
        The loss is computed in float32 at least (autocast may give a half-precision ``v``).
        """
        xt, ut = self._sample(x0, x1, t)
        v = model(xt, t) if y is None else model(xt, t, y)
        return _mean_squared_error(v, ut, xt, weight, "a field must return one velocity per input coordinate "
                                                      "(the data's shape)")

    # --- checks ----------------------------------------------------------------
    def _pair(self, x0, x1, t, hi: float = 1.0, why: str = ""):
        _checks.tensor("x0", x0, finite=False)
        _checks.tensor("x1", x1, finite=False)
        if x0.ndim < 2:
            raise ValueError(f"x0 must be batched with shape (batch, ...), got shape {tuple(x0.shape)}")
        _checks.same_shape("x0", x0, "x1", x1)
        _checks.same_device(x0=x0, x1=x1)
        _checks.same_dtype(x0=x0, x1=x1)
        due = _checks.values_due(f"{type(self).__name__}.pair", x1)
        t = _checks.time("t", t, x1.shape[0], like=x1, values=due)
        if due:
            for name, x in (("x0", x0), ("x1", x1)):
                _checks.tensor(name, x)
            self._check_t_max(t, hi, why)
        return t

    def _check_t_max(self, t, hi, why):
        if hi < 1.0 and t.numel() and bool((t > hi).any()):
            raise ValueError(f"t = {float(t.max()):.4g} is beyond this path's t_max = {hi:g}, where {why} is "
                             f"infinite ({type(self).__name__}: sigma_t -> 0 with an infinite derivative); "
                             f"draw times in [0, path.t_max]")

    def _point(self, x, x1, t, name="x"):
        _checks.tensor(name, x)
        _checks.tensor("x1", x1)
        if x.ndim < 2:
            raise ValueError(f"{name} must be batched with shape (batch, ...), got shape {tuple(x.shape)}")
        _checks.same_shape(name, x, "x1", x1)
        _checks.same_device(**{name: x, "x1": x1})
        return _checks.time("t", t, x.shape[0], like=x)

    @staticmethod
    def _nonzero(name: str, values: torch.Tensor, t: torch.Tensor, why: str) -> None:
        """Raise when a schedule value the formula divides by is zero at one of the times ``t``."""
        bad = values == 0
        if bool(bad.any()):
            raise ValueError(f"t: {name} = 0 at t = {float(t[bad][0]):.4g}, and {why} divides by {name}; "
                             f"use times where {name} > 0")

    # --- conditional flow --------------------------------------------------------
    def sample_xt(self, x0: torch.Tensor, x1: torch.Tensor, t) -> torch.Tensor:
        r""":math:`x_t = \alpha_t x_1 + \sigma_t x_0`, shape of ``x1`` (any ``t`` in ``[0, 1]``)."""
        t = self._pair(x0, x1, t)
        return _bc(self.alpha(t), x1) * x1 + _bc(self.sigma(t), x0) * x0

    def target(self, x0: torch.Tensor, x1: torch.Tensor, t) -> torch.Tensor:
        r"""Conditional target :math:`u_t(x_t \mid x_1) = \dot\alpha_t x_1 + \dot\sigma_t x_0`.

        This is :math:`\frac{d}{dt}\psi_t(x_0 \mid x_1)`; written in ``x0`` and ``x1`` it
        never divides by :math:`\sigma_t` (for the CondOT path it is ``x1 - (1 - sigma_min) x0``).
        Needs ``t <= t_max``.
        """
        t = self._pair(x0, x1, t, hi=self.t_max, why="the conditional target")
        return _bc(self.d_alpha(t), x1) * x1 + _bc(self.d_sigma(t), x0) * x0

    def sample(self, x0: torch.Tensor, x1: torch.Tensor, t, check: bool = True):
        """Return ``(xt, ut)``: the point on the conditional path and its target velocity (``t <= t_max``).

        ``check=False`` skips the argument checks (``t`` must then be a ``(batch,)`` tensor): for losses
        built on a path (:mod:`cfmlib.fewstep`) that check their batch once themselves."""
        if check:
            t = self._pair(x0, x1, t, hi=self.t_max, why="the conditional target")
        return self._sample(x0, x1, t)

    def _sample(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor):
        """:meth:`sample` without argument checks (``t`` a ``(batch,)`` tensor)."""
        a, s, da, ds = self.alpha(t), self.sigma(t), self.d_alpha(t), self.d_sigma(t)
        a, s, da, ds = (_bc(v, x1) for v in (a, s, da, ds))
        return a * x1 + s * x0, da * x1 + ds * x0

    def conditional_field(self, x: torch.Tensor, x1: torch.Tensor, t) -> torch.Tensor:
        r"""Theorem 3's field at an arbitrary point ``x``:
        :math:`u_t(x \mid x_1) = \frac{\dot\sigma_t}{\sigma_t}(x - \alpha_t x_1) + \dot\alpha_t x_1`.

        Needs :math:`\sigma_t > 0`.
        """
        t = self._point(x, x1, t)
        self._nonzero("sigma_t", self.sigma(t), t, "the conditional field")
        a, s, da, ds = (_bc(v, x) for v in (self.alpha(t), self.sigma(t), self.d_alpha(t), self.d_sigma(t)))
        return ds / s * (x - a * x1) + da * x1

    def conditional_score(self, x: torch.Tensor, x1: torch.Tensor, t) -> torch.Tensor:
        r""":math:`\nabla_x \log p_t(x \mid x_1) = -(x - \alpha_t x_1) / \sigma_t^2`."""
        t = self._point(x, x1, t)
        self._nonzero("sigma_t", self.sigma(t), t, "the conditional score")
        a, s = _bc(self.alpha(t), x), _bc(self.sigma(t), x)
        return -(x - a * x1) / s**2

    def conditional_log_prob(self, x: torch.Tensor, x1: torch.Tensor, t) -> torch.Tensor:
        r""":math:`\log \mathcal N(x; \alpha_t x_1, \sigma_t^2 I)`, shape ``(batch,)``."""
        t = self._point(x, x1, t)
        a, s = self.alpha(t), self.sigma(t)
        self._nonzero("sigma_t", s, t, "the conditional log-density")
        d = x[0].numel()
        r2 = ((x - _bc(a, x) * x1) ** 2).flatten(1).sum(1)
        return -0.5 * r2 / s**2 - d * torch.log(s) - 0.5 * d * math.log(2 * math.pi)

    # --- conversions between parameterisations (chapter 10) ------------------
    # x = a x1 + s x0 and v = da x1 + ds x0 form a 2x2 linear system in (x1, x0)
    # whose determinant is a ds - s da.
    def _xv(self, v, x, t, vname):
        due = _checks.values_due(f"AffinePath.{vname}", x)
        _checks.tensor(vname, v, finite=due)
        _checks.tensor("x", x, finite=due)
        _checks.same_shape(vname, v, "x", x)
        _checks.same_device(**{vname: v, "x": x})
        t = _checks.time("t", t, x.shape[0], like=x, values=due)
        return t, [_bc(u, x) for u in (self.alpha(t), self.sigma(t), self.d_alpha(t), self.d_sigma(t))]

    def velocity_to_noise(self, v: torch.Tensor, x: torch.Tensor, t) -> torch.Tensor:
        r"""Noise prediction :math:`\hat x_0 = (\alpha_t v - \dot\alpha_t x) / (\alpha_t\dot\sigma_t - \sigma_t\dot\alpha_t)`."""
        t, (a, s, da, ds) = self._xv(v, x, t, "v")
        return (a * v - da * x) / (a * ds - s * da)

    def velocity_to_x1(self, v: torch.Tensor, x: torch.Tensor, t) -> torch.Tensor:
        r"""Data prediction :math:`\hat x_1 = (\dot\sigma_t x - \sigma_t v) / (\alpha_t\dot\sigma_t - \sigma_t\dot\alpha_t)`."""
        t, (a, s, da, ds) = self._xv(v, x, t, "v")
        return (ds * x - s * v) / (a * ds - s * da)

    def velocity_to_score(self, v: torch.Tensor, x: torch.Tensor, t, check: bool = True) -> torch.Tensor:
        r"""Score :math:`\nabla \log p_t(x) = -\hat x_0 / \sigma_t` from a velocity (needs :math:`\sigma_t > 0`).

        ``check=False`` skips the argument checks (``t`` must then be a ``(batch,)`` tensor): for solver
        loops such as :func:`cfmlib.solvers.sdeint`, which check their inputs once per solve."""
        if check:
            t, (a, s, da, ds) = self._xv(v, x, t, "v")
            if _checks.values_due("AffinePath.velocity_to_score", x):
                self._nonzero("sigma_t", s.reshape(-1), t, "the score")
        else:
            a, s, da, ds = (_bc(u, x) for u in (self.alpha(t), self.sigma(t), self.d_alpha(t), self.d_sigma(t)))
        return -(a * v - da * x) / ((a * ds - s * da) * s)

    def noise_to_velocity(self, eps: torch.Tensor, x: torch.Tensor, t) -> torch.Tensor:
        r"""Velocity from a noise prediction: :math:`v = \frac{\dot\alpha_t}{\alpha_t} x + (\dot\sigma_t - \frac{\dot\alpha_t\sigma_t}{\alpha_t})\hat x_0` (needs :math:`\alpha_t > 0`)."""
        t, (a, s, da, ds) = self._xv(eps, x, t, "eps")
        self._nonzero("alpha_t", a.reshape(-1), t, "the conversion")
        return da / a * x + (ds - da * s / a) * eps

    def score_to_velocity(self, score: torch.Tensor, x: torch.Tensor, t) -> torch.Tensor:
        r"""Velocity from a score, through :math:`\hat x_0 = -\sigma_t \nabla\log p_t(x)` (needs :math:`\alpha_t > 0`)."""
        t, (a, s, da, ds) = self._xv(score, x, t, "score")
        self._nonzero("alpha_t", a.reshape(-1), t, "the conversion")
        eps = -s * score
        return da / a * x + (ds - da * s / a) * eps

    def x1_to_velocity(self, x1: torch.Tensor, x: torch.Tensor, t) -> torch.Tensor:
        r"""Velocity from a data prediction (chapter 11): with :math:`\hat x_0 = (x - \alpha_t\hat x_1)/\sigma_t`,
        :math:`v = \dot\alpha_t\hat x_1 + \dot\sigma_t\hat x_0 = \big(\dot\sigma_t x - (\alpha_t\dot\sigma_t - \sigma_t\dot\alpha_t)\hat x_1\big)/\sigma_t`
        (needs :math:`\sigma_t > 0`; for CondOT, :math:`(\hat x_1 - x)/(1 - t)`)."""
        t, (a, s, da, ds) = self._xv(x1, x, t, "x1")
        self._nonzero("sigma_t", s.reshape(-1), t, "the conversion")
        return (ds * x - (a * ds - s * da) * x1) / s

    def log_snr(self, t) -> torch.Tensor:
        r"""The log signal-to-noise ratio :math:`\lambda_t = \log(\alpha_t/\sigma_t)`, shape ``(batch,)``
        (``-inf`` where :math:`\alpha_t = 0`, ``+inf`` where :math:`\sigma_t = 0`; chapter 11's samplers)."""
        t = _checks.time("t", t)
        t = t.reshape(-1) if t.ndim else t.reshape(1)
        return torch.log(self.alpha(t)) - torch.log(self.sigma(t))

    def time_of_log_snr(self, lam, *, iters: int = 100) -> torch.Tensor:
        r"""The time :math:`t \in [0, 1]` at which :math:`\log(\alpha_t/\sigma_t) = \lambda` (bisection; the
        ratio must increase with :math:`t`, as for every path in :data:`PATHS`).  ``lam``: a number or a
        ``(n,)`` tensor; values beyond the path's range give the end of ``[0, 1]`` nearest to them.
        Returns float64 times of shape ``(n,)``."""
        _checks.positive_int("iters", iters)
        lam = torch.as_tensor(lam, dtype=torch.float64).reshape(-1)
        if bool(torch.isnan(lam).any()):
            raise ValueError("lam contains NaN; pass log signal-to-noise ratios (numbers, +-inf allowed)")
        lo, hi = torch.zeros_like(lam), torch.ones_like(lam)
        for _ in range(iters):  # sign of alpha - e^lam sigma, written without dividing by sigma
            mid = 0.5 * (lo + hi)
            a, s = self.alpha(mid), self.sigma(mid)
            up = torch.where(lam > 0, a * torch.exp(-lam) < s, a < torch.exp(lam) * s)
            lo, hi = torch.where(up, mid, lo), torch.where(up, hi, mid)
        return 0.5 * (lo + hi)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"


class CondOTPath(AffinePath):
    r"""The conditional optimal-transport (CondOT) path of Lipman et al. (2023), named ``'condot'``:
    :math:`\alpha_t = t`, :math:`\sigma_t = 1 - (1 - \sigma_{\min}) t`;
    target :math:`u_t = x_1 - (1 - \sigma_{\min}) x_0`."""

    name = "condot"

    def __init__(self, sigma_min: float = 0.0):
        self.sigma_min = _checks.number("sigma_min", sigma_min, lo=0.0, hi=1.0, hi_open=True)

    def alpha(self, t):
        r""":math:`\alpha_t = t`."""
        return t

    def sigma(self, t):
        r""":math:`\sigma_t = 1 - (1 - \sigma_{\min}) t`."""
        return 1.0 - (1.0 - self.sigma_min) * t

    def d_alpha(self, t):
        r""":math:`\dot\alpha_t = 1`."""
        return torch.ones_like(t)

    def d_sigma(self, t):
        r""":math:`\dot\sigma_t = -(1 - \sigma_{\min})`."""
        return torch.full_like(t, -(1.0 - self.sigma_min))

    def _sample(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor):
        # the same x_t and u_t in two fused operations (the training loop's hot path):
        # u_t = x1 - (1 - sigma_min) x0 and x_t = t x1 + (1 - (1 - sigma_min) t) x0 = x0 + t u_t
        ut = torch.add(x1, x0, alpha=-(1.0 - self.sigma_min))
        return torch.addcmul(x0, _bc(t, x1), ut), ut


class VEPath(AffinePath):
    r"""Variance-exploding path (Song et al., 2021, in the time direction of Lipman et al.):
    :math:`\alpha_t = 1`, :math:`\sigma_t = \sigma_{\min} (\sigma_{\max}/\sigma_{\min})^{1-t}`.

    The source is approximately :math:`N(0, \sigma_{\max}^2 I)` (see :attr:`source_scale`).
    """

    name = "ve"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 10.0):
        self.sigma_min = _checks.number("sigma_min", sigma_min, lo=0.0, lo_open=True)
        self.sigma_max = _checks.number("sigma_max", sigma_max, lo=self.sigma_min, lo_open=True)

    def alpha(self, t):
        r""":math:`\alpha_t = 1`."""
        return torch.ones_like(t)

    def sigma(self, t):
        r""":math:`\sigma_t = \sigma_{\min} (\sigma_{\max}/\sigma_{\min})^{1-t}`."""
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** (1.0 - t)

    def d_alpha(self, t):
        r""":math:`\dot\alpha_t = 0`."""
        return torch.zeros_like(t)

    def d_sigma(self, t):
        r""":math:`\dot\sigma_t = -\log(\sigma_{\max}/\sigma_{\min})\, \sigma_t`."""
        return -math.log(self.sigma_max / self.sigma_min) * self.sigma(t)


class VPPath(AffinePath):
    r"""Variance-preserving path (DDPM / Song et al., 2021) with the linear schedule
    :math:`\beta(s) = \beta_{\min} + s(\beta_{\max} - \beta_{\min})`:
    :math:`\alpha_t = e^{-T(1-t)/2}`, :math:`T(s) = \int_0^s \beta`, :math:`\sigma_t = \sqrt{1 - \alpha_t^2}`.

    :math:`\dot\sigma_t` diverges at ``t = 1``, so ``t_max = 1 - 1e-3``.
    """

    name = "vp"
    t_max = 1.0 - 1e-3

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        self.beta_min = _checks.number("beta_min", beta_min, lo=0.0, lo_open=True)
        self.beta_max = _checks.number("beta_max", beta_max, lo=self.beta_min)

    def _T(self, s):
        return self.beta_min * s + 0.5 * (self.beta_max - self.beta_min) * s**2

    def _beta(self, s):
        return self.beta_min + (self.beta_max - self.beta_min) * s

    def alpha(self, t):
        r""":math:`\alpha_t = e^{-T(1-t)/2}` with :math:`T(s) = \beta_{\min} s + \tfrac12(\beta_{\max} - \beta_{\min}) s^2`."""
        return torch.exp(-0.5 * self._T(1.0 - t))

    def sigma(self, t):
        r""":math:`\sigma_t = \sqrt{1 - \alpha_t^2}`."""
        return torch.sqrt(-torch.expm1(-self._T(1.0 - t)))

    def d_alpha(self, t):
        r""":math:`\dot\alpha_t = \tfrac12 \beta(1 - t)\, \alpha_t`."""
        return 0.5 * self._beta(1.0 - t) * self.alpha(t)

    def d_sigma(self, t):
        r""":math:`\dot\sigma_t = -\alpha_t\dot\alpha_t/\sigma_t` (infinite at ``t = 1``, hence ``t_max < 1``)."""
        a = self.alpha(t)
        return -a * self.d_alpha(t) / self.sigma(t)

    def sigma_d_sigma(self, t):
        r""":math:`\sigma_t\dot\sigma_t = -\alpha_t\dot\alpha_t`, finite at ``t = 1``."""
        # sigma^2 = 1 - alpha^2, so sigma * d_sigma = -alpha * d_alpha: finite at t = 1
        return -self.alpha(t) * self.d_alpha(t)


class CosinePath(AffinePath):
    r"""Cosine (trigonometric) path: :math:`\alpha_t = \sin(\pi t/2)`, :math:`\sigma_t = \cos(\pi t/2)`."""

    name = "cosine"

    def alpha(self, t):
        r""":math:`\alpha_t = \sin(\pi t/2)`."""
        return torch.sin(0.5 * math.pi * t)

    def sigma(self, t):
        r""":math:`\sigma_t = \cos(\pi t/2)`."""
        return torch.cos(0.5 * math.pi * t)

    def d_alpha(self, t):
        r""":math:`\dot\alpha_t = \tfrac\pi2 \cos(\pi t/2)`."""
        return 0.5 * math.pi * torch.cos(0.5 * math.pi * t)

    def d_sigma(self, t):
        r""":math:`\dot\sigma_t = -\tfrac\pi2 \sin(\pi t/2)`."""
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)


#: The paths known by name to :func:`get_path` (and to every function taking ``path=``).
PATHS = {"condot": CondOTPath, "ve": VEPath, "vp": VPPath, "cosine": CosinePath}


def get_path(path="condot", **kwargs) -> ProbabilityPath:
    """Return a path object from a name in :data:`PATHS` (``'condot'``, ``'ve'``, ``'vp'``, ``'cosine'``)
    or pass a path object (an :class:`AffinePath` or any :class:`ProbabilityPath`) through unchanged.

    The CondOT path was called ``'ot'`` before version 0.2; ``'ot'`` now names only the minibatch
    optimal-transport *coupling* (:mod:`cfmlib.couplings`), and ``get_path('ot')`` says so.
    """
    if isinstance(path, ProbabilityPath):
        if kwargs:
            raise ValueError("path is already a path object; pass its parameters to its constructor instead")
        return path
    if path == "ot":
        raise ValueError("'ot' names the minibatch optimal-transport coupling (coupling='ot'); the conditional "
                         "OT path is called 'condot' (path='condot', or paths.CondOTPath(sigma_min))")
    _checks.choice("path", path, PATHS)
    _checks.known_kwargs(f"get_path({path!r})", PATHS[path], kwargs)
    return PATHS[path](**kwargs)


# --- changing the schedule (chapter 6) --------------------------------------------------------


def gaussian_path(path, who: str) -> "AffinePath":
    r""":func:`get_path` for the functions that need a Gaussian path (sampling from :math:`N(0, \sigma_0^2 I)`,
    the log-likelihood, conversions): a :class:`PredictionPath` gives the path it wraps; any other
    path object raises a ``TypeError`` naming ``who`` and the sampler that belongs to the path."""
    path = get_path(path)
    if isinstance(path, PredictionPath):
        return path.path
    if not isinstance(path, AffinePath):
        where = f"; sample a model trained on it with {path.sampler}" if getattr(path, "sampler", "") else ""
        raise TypeError(f"{who} works with Gaussian paths (x_t = alpha_t x1 + sigma_t x0), got "
                        f"{_checks.describe(path)}{where}")
    return path


class SchedulerChange(NamedTuple):
    r"""The result of :func:`scheduler_change`: times ``r`` of the other path, scales ``s`` and their
    time derivatives ``dr`` :math:`= \dot r_t` and ``ds`` :math:`= \dot s_t`, each of shape ``(batch,)``."""

    r: torch.Tensor
    s: torch.Tensor
    dr: torch.Tensor
    ds: torch.Tensor


def scheduler_change(path, other, t, *, iters: int = 100) -> SchedulerChange:
    r"""The change of time and scale that carries ``path`` onto ``other`` (chapter 6; the scheduler
    change of Lipman et al., 2024, §4.8).

    For each time :math:`t` of ``path`` (schedule :math:`\alpha, \sigma`) it returns the time
    :math:`r_t` at which ``other`` (schedule :math:`\bar\alpha, \bar\sigma`) has the same
    signal-to-noise ratio, :math:`\bar\alpha_{r}/\bar\sigma_{r} = \alpha_t/\sigma_t`, and the scale
    :math:`s_t = \sigma_t/\bar\sigma_{r} = \alpha_t/\bar\alpha_{r}`.  Then
    :math:`x_t = s_t\, \bar x_{r_t}` for every pair :math:`(x_0, x_1)`, so the marginal paths and fields
    (same source and coupling) satisfy

    .. math::  p_t(x) = s_t^{-d}\, \bar p_{r_t}(x / s_t), \qquad
               u_t(x) = \frac{\dot s_t}{s_t}\, x + s_t\, \dot r_t\, \bar u_{r_t}(x / s_t),

    and :math:`x(t) = s_t\, \bar x(r_t)` maps marginal trajectories of ``other`` onto those of ``path``.

    Args:
        path: an :class:`AffinePath` or a name for :func:`get_path`.
        other: the same; its signal-to-noise ratio must increase strictly with time (true of every
            path in :data:`PATHS`).
        t: a number or a ``(batch,)`` tensor of times of ``path`` in ``[0, 1]``.
        iters: bisection steps for :math:`r_t` (each halves the bracket, which starts as ``[0, 1]``).

    Returns:
        a :class:`SchedulerChange` ``(r, s, dr, ds)`` in ``t``'s dtype (float32 for a number),
        computed in float64.  :math:`\dot r_t = (\dot\alpha_t\sigma_t - \alpha_t\dot\sigma_t) /
        \big(s_t^2(\dot{\bar\alpha}_r\bar\sigma_r - \bar\alpha_r\dot{\bar\sigma}_r)\big)` needs finite
        derivatives of ``other`` at :math:`r_t` (the VP path has none at ``r = 1``).

    Raises:
        ValueError: where :math:`\alpha_t/\sigma_t` lies outside the range of ``other``'s ratio on
        ``[0, 1]`` (a VE path never reaches ratio 0, so ``t = 0`` of the CondOT path has no image).
    """
    path, other = get_path(path), get_path(other)
    for name, p in (("path", path), ("other", other)):
        if not isinstance(p, AffinePath):
            raise TypeError(f"{name} must be an AffinePath (a Gaussian path x_t = alpha_t x1 + sigma_t x0), "
                            f"got {_checks.describe(p)}")
    _checks.positive_int("iters", iters)
    t_in = _checks.time("t", t)
    t = t_in.detach().to(torch.float64).reshape(-1)
    a, s_, da, ds_ = (f(t) for f in (path.alpha, path.sigma, path.d_alpha, path.d_sigma))

    def gap(r):  # sign of SNR_other(r) - SNR(t), without dividing by a sigma that may be 0
        return other.alpha(r) * s_ - a * other.sigma(r)

    lo, hi = torch.zeros_like(t), torch.ones_like(t)
    # rounding: a schedule that should vanish at an end (cos(pi/2) = 6e-17) must not put that end out of range
    tol = 1e-12 * (a.abs() + s_.abs()) * (other.alpha(lo).abs() + other.sigma(lo).abs()
                                          + other.alpha(hi).abs() + other.sigma(hi).abs())
    bad = (gap(lo) > tol) | (gap(hi) < -tol)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"t = {float(t[i]):.4g}: the signal-to-noise ratio alpha_t/sigma_t = "
                         f"{float(a[i] / s_[i]) if float(s_[i]) > 0 else math.inf:.4g} of {type(path).__name__} is "
                         f"outside the range of {type(other).__name__}'s ratio on [0, 1]; use times where the "
                         f"two ratios overlap")
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        up = gap(mid) < 0
        lo, hi = torch.where(up, mid, lo), torch.where(up, hi, mid)
    r = 0.5 * (lo + hi)
    ab, sb, dab, dsb = (f(r) for f in (other.alpha, other.sigma, other.d_alpha, other.d_sigma))
    norm = ab**2 + sb**2
    s = (a * ab + s_ * sb) / norm                             # alpha = s alpha_bar and sigma = s sigma_bar
    dr = (da * s_ - a * ds_) / (s**2 * (dab * sb - ab * dsb))  # d/dt of the SNR, divided by other's at r
    ds = (ab * (da - s * dab * dr) + sb * (ds_ - s * dsb * dr)) / norm
    shape, dtype = t_in.shape, t_in.dtype
    return SchedulerChange(*(v.reshape(shape).to(dtype) for v in (r, s, dr, ds)))


# --- prediction targets (chapter 11) ----------------------------------------------------------
#: What a network can be trained to output on an affine Gaussian path (:class:`PredictionPath`).
TARGETS = ("velocity", "x1", "x0")


class PredictionPath(ProbabilityPath):
    r"""An affine Gaussian path on which the network predicts ``target`` instead of the velocity (chapter 11).

    * ``'velocity'`` -- the CFM loss :math:`\lVert v_\theta(x_t, t) - (\dot\alpha_t x_1 + \dot\sigma_t x_0)\rVert^2`;
    * ``'x1'`` -- data prediction, :math:`\lVert \hat x_{1,\theta}(x_t, t) - x_1\rVert^2`;
    * ``'x0'`` -- noise prediction, :math:`\lVert \hat x_{0,\theta}(x_t, t) - x_0\rVert^2` (DDPM's :math:`\epsilon`).

    Noise, times, couplings and argument checks are the wrapped path's, so
    ``cfmlib.train(model, data, path=PredictionPath("condot", "x1"))`` trains a data predictor with the
    ordinary training loop.  The three losses have the same minimiser up to the conversions of chapter 10,
    but they weight the times differently: with :math:`D_t = \alpha_t\dot\sigma_t - \sigma_t\dot\alpha_t`, a
    prediction error :math:`e` is a velocity error :math:`-D_t e/\sigma_t` (``'x1'``) or :math:`D_t e/\alpha_t`
    (``'x0'``), so each loss is the velocity loss with the weight :meth:`velocity_weight`,
    :math:`\sigma_t^2/D_t^2` or :math:`\alpha_t^2/D_t^2` (for CondOT :math:`(1-t)^2` and :math:`t^2`).
    :meth:`velocity` turns a trained predictor into a velocity field for the solvers.

    Args:
        path: an :class:`AffinePath` or a name for :func:`get_path`.
        target: one of :data:`TARGETS`.
    """

    loss_name = "the prediction loss"

    def __init__(self, path="condot", target: str = "x1"):
        self.path = get_path(path)
        if not isinstance(self.path, AffinePath):
            raise TypeError(f"path must be an AffinePath (a Gaussian path x_t = alpha_t x1 + sigma_t x0), "
                            f"got {_checks.describe(self.path)}")
        self.target = _checks.choice("target", target, TARGETS)
        self.name = f"{self.path.name}-{self.target}"
        self.t_max = self.path.t_max

    # what training needs: the wrapped path's, except the loss
    def draw_x0(self, x1, generator=None):
        """The wrapped path's noise."""
        return self.path.draw_x0(x1, generator)

    def coupling_source(self, x0):
        """The wrapped path's source points."""
        return self.path.coupling_source(x0)

    def draw_t(self, n, sampler, generator, device, dtype):
        """The wrapped path's training times."""
        return self.path.draw_t(n, sampler, generator, device, dtype)

    def check_data(self, name, x1):
        """The wrapped path's data check."""
        self.path.check_data(name, x1)

    def check_batch(self, x0, x1, t, model=None):
        """The wrapped path's batch checks; returns ``t`` as a ``(batch,)`` tensor."""
        return self.path.check_batch(x0, x1, t, model)

    def loss(self, model, x0, x1, t, y=None, weight=None) -> torch.Tensor:
        r"""Mean over the batch of :math:`w_j \lVert f_\theta(x_{t_j}, t_j) - \text{target}_j\rVert^2`, without
        argument checks (:func:`cfmlib.training.cfm_loss` checks); ``t`` a ``(batch,)`` tensor."""
        if self.target == "velocity":
            return self.path.loss(model, x0, x1, t, y, weight)
        xt = _bc(self.path.alpha(t), x1) * x1 + _bc(self.path.sigma(t), x0) * x0
        out = model(xt, t) if y is None else model(xt, t, y)
        goal = x1 if self.target == "x1" else x0
        return _mean_squared_error(out, goal, xt, weight,
                                   f"a {self.target} predictor must return one value per input coordinate")

    def velocity_weight(self, t) -> torch.Tensor:
        r"""The weight :math:`w_t` with which this loss is the velocity loss: ``1``, :math:`\sigma_t^2/D_t^2`
        (``'x1'``) or :math:`\alpha_t^2/D_t^2` (``'x0'``), :math:`D_t = \alpha_t\dot\sigma_t - \sigma_t\dot\alpha_t`;
        shape ``(batch,)``."""
        a, s, da, ds = self.path.schedule(t)
        if self.target == "velocity":
            return torch.ones_like(a)
        det2 = (a * ds - s * da) ** 2
        return (s if self.target == "x1" else a) ** 2 / det2

    def to_velocity(self, pred: torch.Tensor, x: torch.Tensor, t) -> torch.Tensor:
        r"""The velocity of a prediction at ``(x, t)``: :meth:`AffinePath.x1_to_velocity` (needs
        :math:`\sigma_t > 0`), :meth:`AffinePath.noise_to_velocity` (needs :math:`\alpha_t > 0`) or ``pred`` itself."""
        if self.target == "x1":
            return self.path.x1_to_velocity(pred, x, t)
        if self.target == "x0":
            return self.path.noise_to_velocity(pred, x, t)
        return pred

    def velocity(self, model) -> "PredictedVelocity":
        """The velocity field of a model trained on this path (a module for :mod:`cfmlib.solvers`)."""
        return PredictedVelocity(model, self)

    def __repr__(self) -> str:
        return f"PredictionPath({self.path!r}, target={self.target!r})"


class PredictedVelocity(torch.nn.Module):
    r"""The velocity field :math:`v(x, t[, y])` of a network trained on a :class:`PredictionPath`: the network's
    prediction converted with :meth:`PredictionPath.to_velocity` (chapter 11).  Called like a model,
    ``field(x, t)`` or ``field(x, t, y)``, so the solvers, :func:`cfmlib.models.guided` and
    :func:`cfmlib.solvers.sample` (``config``, ``num_classes``) take it as they take the network.
    A solver must not evaluate it where the conversion divides by zero: at :math:`\sigma_t = 0` for
    ``'x1'`` (CondOT: ``t = 1``) and at :math:`\alpha_t = 0` for ``'x0'`` (CondOT: ``t = 0``)."""

    def __init__(self, model: torch.nn.Module, path: PredictionPath):
        super().__init__()
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {_checks.describe(model)}")
        if not isinstance(path, PredictionPath):
            raise TypeError(f"path must be a PredictionPath, got {_checks.describe(path)}")
        self.model, self.prediction = model, path
        self.config = getattr(model, "config", None)
        self.num_classes = getattr(model, "num_classes", None)

    def forward(self, x: torch.Tensor, t, y: torch.Tensor | None = None) -> torch.Tensor:
        """The velocity :math:`v(x, t)` converted from the wrapped model's prediction."""
        pred = self.model(x, t) if y is None else self.model(x, t, y)
        return self.prediction.to_velocity(pred, x, t)
