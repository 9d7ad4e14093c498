r"""One step or a few: flow maps, average velocities and the losses that learn them (chapter 14).

A field :math:`u_t` and its ODE :math:`\dot x = u_t(x)` define a two-time *flow map*
:math:`\phi_{r \to t}(x)`, the solution at time :math:`t` of the ODE started at :math:`x` at time
:math:`r \le t`.  Written through the *average velocity*

.. math::  \bar u(x, r, t) = \frac{\phi_{r\to t}(x) - x}{t - r} = \frac1{t - r}\int_r^t u_\tau(x_\tau)\,d\tau,
           \qquad \bar u(x, t, t) = u_t(x),

a network :math:`\bar u_\theta(x, r, t)` generates in a few jumps,
:math:`x \leftarrow x + (t_{k+1} - t_k)\,\bar u_\theta(x, t_k, t_{k+1})` (:func:`sample`).  Time runs
from noise (``t = 0``) to data (``t = 1``) as everywhere in cfmlib; MeanFlow (Geng et al., 2025) and
the consistency models of Song et al. (2023) run it the other way, and every formula here is theirs
translated: the start of a jump is ``r``, its end ``t``, and ``r <= t``.

* :class:`FlowMapMLP`, :class:`FlowMapUNet` -- networks :math:`\bar u_\theta(x, r, t[, y])`;
* :class:`GaussianFlowMap` -- field, flow map and average velocity in closed form for Gaussian data
  under an affine path (the ground truth of the tests); :func:`flow_map` and
  :func:`average_velocity` integrate any field;
* :func:`meanflow_residual` -- the residual of the MeanFlow identity
  :math:`\bar u(x, r, t) = u_r(x) + (t - r)\,\frac{d}{dr}\bar u(x_r, r, t)`, by a Jacobian-vector product;
* :class:`MeanFlowPath`, :class:`ShortcutPath`, :class:`ConsistencyPath` -- the three losses, as paths
  for :func:`cfmlib.training.train` (``train(FlowMapMLP(dim=2), data, path=MeanFlowPath())``);
* :func:`grid_times` -- training times on a grid (distilling a teacher's pairs into a few-step model);
* :func:`sample` -- the one- or few-step sampler (with ``renoise=True``, the multistep sampler of
  consistency models).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import jvp

from . import _checks
from .models import MODELS, UNet, sinusoidal_embedding, time_as_batch
from .paths import AffinePath, ProbabilityPath, get_path
from .solvers import Solution, source_points

__all__ = ["FlowMapMLP", "FlowMapUNet", "GaussianFlowMap", "flow_map", "average_velocity", "meanflow_residual",
           "MeanFlowPath", "ShortcutPath", "ConsistencyPath", "grid_times", "sample"]


def _bc(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A ``(batch,)`` time value reshaped to broadcast against ``x``."""
    return s.reshape(-1, *([1] * (x.ndim - 1)))


# ------------------------------------------------------------------------------------------ networks
def _two_times(r, t, x):
    """``r`` and ``t`` as ``(batch,)`` tensors in ``x``'s dtype (numbers allowed)."""
    return time_as_batch(r, x), time_as_batch(t, x)


class FlowMapMLP(nn.Module):
    r"""A multilayer perceptron :math:`\bar u_\theta(x, r, t)` for low-dimensional data: the average
    velocity of a jump from time ``r`` to time ``t`` (chapter 14).

    The input is ``concat(x, e(r), e(t - r))``, with ``e`` the raw time (``time_features = 0``) or
    ``time_features`` sinusoidal features of ``time_scale`` times the time (see :class:`FlowMapUNet`);
    then ``depth`` blocks of ``Linear(hidden) + SiLU`` and a final ``Linear`` back to ``dim``.  At
    ``r = t`` the network is an ordinary field :math:`v_\theta(x, t)`; feeding the length ``t - r``
    of the jump rather than ``t`` itself makes that case easy to represent.  With ``num_classes``, a learned label embedding (the last of its
    ``num_classes + 1`` rows the null label) is added to the first hidden layer.
    Called as ``model(x, r, t)`` or ``model(x, r, t, y)``.
    """

    def __init__(self, dim: int = 2, hidden: int = 256, depth: int = 3, time_features: int = 0,
                 num_classes: int | None = None, time_scale: float = 0.01):
        super().__init__()
        _checks.positive_int("dim", dim)
        _checks.positive_int("hidden", hidden)
        _checks.positive_int("depth", depth)
        _checks.time_features("time_features", time_features)
        if num_classes is not None:
            _checks.positive_int("num_classes", num_classes)
        self.time_scale = _checks.number("time_scale", time_scale, lo=0.0, lo_open=True)
        self.config = dict(kind="flowmap_mlp", dim=dim, hidden=hidden, depth=depth, time_features=time_features,
                           num_classes=num_classes, time_scale=time_scale)
        self.dim, self.time_features, self.num_classes = dim, time_features, num_classes
        layers, width = [], dim + 2 * max(time_features, 1)
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(hidden, dim)
        self.label = nn.Embedding(num_classes + 1, hidden) if num_classes else None

    def _embed(self, s):
        if self.time_features == 0:
            return s[:, None]
        return sinusoidal_embedding(self.time_scale * s, self.time_features)

    def forward(self, x: torch.Tensor, r, t, y: torch.Tensor | None = None) -> torch.Tensor:
        r"""The average velocity :math:`u_\theta(x, r, t)` over :math:`[r, t]` (``model(x, r, t[, y])``)."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (batch, {self.dim}), got {tuple(x.shape)}")
        r, t = _two_times(r, t, x)
        h = torch.cat([x, self._embed(r), self._embed(t - r)], dim=1)
        if self.label is None:
            if y is not None:
                raise ValueError("y was given but the model was built without num_classes")
            return self.head(self.body(h))
        if y is None:
            y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
        elif not isinstance(y, torch.Tensor) or y.shape != (x.shape[0],) or y.is_floating_point():
            raise ValueError(f"y must be an integer tensor of shape ({x.shape[0]},), got {_checks.describe(y)}")
        h = self.body[1](self.body[0](h) + self.label(y))
        return self.head(self.body[2:](h))


class FlowMapUNet(UNet):
    r"""The small U-Net of chapter 9 as an average velocity :math:`\bar u_\theta(x, r, t[, y])` for images
    (chapter 14).

    The same network as :class:`cfmlib.models.UNet`, whose embedding of the time becomes the sum of
    an embedding of the start ``r`` (the U-Net's own time MLP) and one of the jump length ``t - r``
    (a second MLP of the same shape); the label embedding is added as before.  Called as
    ``model(x, r, t)`` or ``model(x, r, t, y)``.  Arguments as for :class:`~cfmlib.models.UNet`, and

    ``time_scale``: the sinusoidal features see ``time_scale * r`` and ``time_scale * (t - r)``, so
    that their fastest angular frequency is ``1000 * time_scale`` (10 by default; the plain U-Net
    uses 1000).  The MeanFlow loss differentiates the network in time, and fast features make that
    derivative, and so the target, huge at initialisation: with ``time_scale = 1`` and the plain
    squared error (``MeanFlowPath(p=0)``) training on 8x8 digits diverges.
    """

    def __init__(self, image_shape=(1, 8, 8), base: int = 32, time_features: int = 64,
                 num_classes: int | None = None, groups: int = 8, time_scale: float = 0.01):
        super().__init__(image_shape=image_shape, base=base, time_features=time_features, num_classes=num_classes,
                         groups=groups)
        self.time_scale = _checks.number("time_scale", time_scale, lo=0.0, lo_open=True)
        self.config = dict(self.config, kind="flowmap_unet", time_scale=time_scale)
        emb = 4 * base
        self.gap_mlp = nn.Sequential(nn.Linear(time_features, emb), nn.SiLU(), nn.Linear(emb, emb))

    def forward(self, x: torch.Tensor, r, t, y: torch.Tensor | None = None) -> torch.Tensor:
        r"""The average velocity :math:`u_\theta(x, r, t)` over :math:`[r, t]` for images."""
        if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"x must have shape (batch, {', '.join(map(str, self.image_shape))}), "
                             f"got {tuple(x.shape)}")
        r, t = _two_times(r, t, x)
        c = self.time_scale
        e = self.time_mlp(sinusoidal_embedding(c * r, self.time_features)) \
            + self.gap_mlp(sinusoidal_embedding(c * (t - r), self.time_features))
        return self._body(x, e, y)  # the U-Net's body (cfmlib.models.UNet) with the two-time embedding


MODELS["flowmap_mlp"] = FlowMapMLP
MODELS["flowmap_unet"] = FlowMapUNet


# ------------------------------------------------------------------------------------------ ground truth
class GaussianFlowMap:
    r"""Gaussian data :math:`q = \mathcal N(m, \mathrm{diag}(s^2))` under an affine path: the marginal
    field, its flow map and its average velocity in closed form (chapter 14).

    Each coordinate of :math:`x_t = \alpha_t x_1 + \sigma_t x_0` is Gaussian with mean
    :math:`\alpha_t m` and standard deviation :math:`S_t = (\alpha_t^2 s^2 + \sigma_t^2)^{1/2}`; the
    marginal field moves every point at a fixed standardised position,

    .. math::  u_t(x) = \dot\alpha_t m + \frac{\dot S_t}{S_t}(x - \alpha_t m), \qquad
               \phi_{r\to t}(x) = \alpha_t m + \frac{S_t}{S_r}(x - \alpha_r m), \qquad
               \bar u(x, r, t) = \frac{\phi_{r\to t}(x) - x}{t - r}

    (with :math:`\bar u(x, t, t) = u_t(x)`).  The standardised position :math:`(x_t - \alpha_t m)/S_t`
    is constant along a trajectory; :math:`S_t` is not linear in :math:`t`, so the velocity changes
    along the way and the instantaneous field is *not* the average velocity.

    Args:
        mean: ``(D,)`` the data mean :math:`m`.
        std: a number or ``(D,)``, the data's standard deviations :math:`s > 0`.
        path: an :class:`~cfmlib.paths.AffinePath` or a name (default ``'condot'``).
    """

    def __init__(self, mean: torch.Tensor, std=1.0, path="condot"):
        _checks.tensor("mean", mean, ndim=1)
        if isinstance(std, (int, float)) and not isinstance(std, bool):
            std = torch.full_like(mean, float(std))
        _checks.tensor("std", std, ndim=1)
        if std.shape != mean.shape:
            raise ValueError(f"std must be a number or have mean's shape {tuple(mean.shape)}, got {tuple(std.shape)}")
        if bool((std <= 0).any()):
            raise ValueError("std must be positive")
        self.path = get_path(path)
        if not isinstance(self.path, AffinePath):
            raise TypeError(f"path must be an AffinePath (x_t = alpha_t x1 + sigma_t x0), got {_checks.describe(path)}")
        self.mean, self.std, self.dim = mean, std.to(mean.dtype), mean.shape[0]

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` data points, shape ``(n, D)``."""
        _checks.positive_int("n", n)
        _checks.generator("generator", generator)
        dev = generator.device if generator is not None else self.mean.device
        z = torch.randn(n, self.dim, generator=generator, device=dev, dtype=self.mean.dtype)
        return self.mean.to(dev) + self.std.to(dev) * z

    __call__ = sample

    def _point(self, x, name="x"):
        _checks.tensor(name, x, ndim=2, finite=False)
        if x.shape[1] != self.dim:
            raise ValueError(f"{name} must have shape (batch, {self.dim}), got {tuple(x.shape)}")
        _checks.same_device(**{name: x, "mean": self.mean})

    def _scale(self, t):  # S_t and dS_t/dt, shape (batch, 1) against (batch, D)
        p = self.path
        a, da = p.alpha(t)[:, None], p.d_alpha(t)[:, None]
        var = a**2 * self.std**2 + p.sigma(t)[:, None] ** 2
        S = var.sqrt()
        dS = (a * da * self.std**2 + p.sigma_d_sigma(t)[:, None]) / S
        return a, da, S, dS

    def field(self, x: torch.Tensor, t) -> torch.Tensor:
        r"""The marginal field :math:`u_t(x)`, shape ``(batch, D)``."""
        self._point(x)
        t = time_as_batch(t, x)
        a, da, S, dS = self._scale(t)
        return da * self.mean + dS / S * (x - a * self.mean)

    def flow_map(self, x: torch.Tensor, r, t) -> torch.Tensor:
        r""":math:`\phi_{r\to t}(x)`: where the marginal flow carries ``x`` from time ``r`` to time ``t``."""
        self._point(x)
        r, t = _two_times(r, t, x)
        ar, _, Sr, _ = self._scale(r)
        at, _, St, _ = self._scale(t)
        return at * self.mean + St / Sr * (x - ar * self.mean)

    def average_velocity(self, x: torch.Tensor, r, t) -> torch.Tensor:
        r""":math:`\bar u(x, r, t) = (\phi_{r\to t}(x) - x)/(t - r)`, and :math:`u_t(x)` where ``t = r``."""
        self._point(x)
        r, t = _two_times(r, t, x)
        same = (t == r)[:, None]
        gap = torch.where(same, torch.ones_like(t)[:, None], (t - r)[:, None])
        return torch.where(same, self.field(x, r), (self.flow_map(x, r, t) - x) / gap)


def flow_map(field, x: torch.Tensor, r, t, *, steps: int = 100, **kwargs) -> torch.Tensor:
    r"""The flow map :math:`\phi_{r \to t}(x)` of any ``field(x, t, **kwargs)`` by ``steps`` RK4 steps,
    each sample over its own interval (``r`` and ``t`` may be ``(batch,)`` tensors).

    Differentiable in ``x``, ``r`` and ``t`` (the ground truth for :func:`meanflow_residual` when the
    field has no closed-form flow, e.g. :class:`cfmlib.analytic.Marginal` of a mixture)."""
    _checks.function("field", field)
    _checks.tensor("x", x, finite=False)
    _checks.positive_int("steps", steps)
    r, t = _two_times(r, t, x)
    hb = _bc((t - r) / steps, x)
    for k in range(steps):  # torch.lerp ends exactly on t (no time beyond it by rounding)
        s, mid, end = (torch.lerp(r, t, w / steps) for w in (k, k + 0.5, k + 1))
        k1 = field(x, s, **kwargs)
        k2 = field(x + 0.5 * hb * k1, mid, **kwargs)
        k3 = field(x + 0.5 * hb * k2, mid, **kwargs)
        k4 = field(x + hb * k3, end, **kwargs)
        x = x + hb / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def average_velocity(field, x: torch.Tensor, r, t, *, steps: int = 100, **kwargs) -> torch.Tensor:
    r""":math:`\bar u(x, r, t) = (\phi_{r\to t}(x) - x) / (t - r)` of any field, by :func:`flow_map`
    (needs ``t > r``)."""
    r, t = _two_times(r, t, x)
    if bool((t <= r).any()):
        raise ValueError("average_velocity needs t > r for every sample (at t = r it is the field itself)")
    return (flow_map(field, x, r, t, steps=steps, **kwargs) - x) / _bc(t - r, x)


def meanflow_residual(ubar, field, x: torch.Tensor, r, t, **kwargs) -> torch.Tensor:
    r"""The residual of the MeanFlow identity (Geng et al., 2025, in this book's time direction):

    .. math::  \bar u(x, r, t) - u_r(x) - (t - r)\,\big(\nabla_x \bar u(x, r, t)\, u_r(x) + \partial_r \bar u(x, r, t)\big),

    the last term the derivative of :math:`\bar u(x_r, r, t)` along the trajectory of ``field``
    through ``x`` at time ``r``, computed as one Jacobian-vector product (``torch.func.jvp``) with
    tangent :math:`(u_r(x), 1, 0)`.  It vanishes (up to rounding) for every ``x`` and ``r <= t``
    exactly when ``ubar`` is the average velocity of ``field`` (chapter 14).

    Args:
        ubar: ``ubar(x, r, t, **kwargs)``, differentiable (a network or a closed form).
        field: ``field(x, t, **kwargs)``, the instantaneous velocity.
        x: ``(batch, ...)`` points at time ``r``; ``r``, ``t``: numbers or ``(batch,)`` tensors.

    Returns:
        a tensor of ``x``'s shape.
    """
    _checks.function("ubar", ubar, "(x, r, t)")
    _checks.function("field", field)
    _checks.tensor("x", x)
    r, t = _two_times(r, t, x)
    u = field(x, r, **kwargs)
    _checks.field_output("field", u, x)
    out, d_dr = jvp(lambda x_, r_: ubar(x_, r_, t, **kwargs), (x, r), (u, torch.ones_like(r)))
    return out - u - _bc(t - r, x) * d_dr


# ------------------------------------------------------------------------------------------ losses
class _FlowMapObjective(ProbabilityPath):
    """Shared parts of the few-step losses: a wrapped affine path that draws the noise and builds
    ``x_t``, and two times ``(r, t)`` per sample (``t`` of shape ``(batch, 2)``)."""

    loss_name = "the flow-map loss"
    sampler = "cfmlib.fewstep.sample"

    def __init__(self, path="condot"):
        self.path = get_path(path)
        if not isinstance(self.path, AffinePath):
            raise TypeError(f"path must be an AffinePath (x_t = alpha_t x1 + sigma_t x0), got {_checks.describe(path)}")
        self.t_max = self.path.t_max

    def draw_x0(self, x1, generator=None):
        return self.path.draw_x0(x1, generator)

    def coupling_source(self, x0):
        return self.path.coupling_source(x0)

    def check_data(self, name, x1):
        self.path.check_data(name, x1)

    def check_batch(self, x0, x1, t, model=None) -> torch.Tensor:
        """Shapes, dtypes and devices of the batch; ``t`` a ``(batch, 2)`` tensor of pairs ``(r, t)`` with
        ``0 <= r <= t <= t_max`` (values on every call for CPU tensors, on calls 1, 2, 4, ... on an
        accelerator). Returns ``t``."""
        if not isinstance(t, torch.Tensor) or t.ndim != 2 or t.shape[1] != 2:
            raise ValueError(f"t must be a (batch, 2) tensor of time pairs (r, t) for {type(self).__name__}, "
                             f"got {_checks.describe(t)}; draw it with path.draw_t")
        self.path.check_batch(x0, x1, t[:, 0])
        due = _checks.values_due(f"{type(self).__name__}.check_batch", x1)
        _checks.time("t", t[:, 1], x1.shape[0], like=x1, hi=self.t_max, values=due)
        if due and t.numel() and bool((t[:, 0] > t[:, 1]).any()):
            raise ValueError("every time pair (r, t) must have r <= t (a jump runs forward, from noise to data)")
        if model is not None:
            _checks.module_device("model", model, x1=x1)
            _checks.module_dtype("model", model, x1=x1)
        return t

    def _start(self, x0, x1, r):
        """``x_r`` on the conditional path and its conditional velocity."""
        return self.path.sample(x0, x1, r, check=False)

    @staticmethod
    def _call(model, x, r, t, y):
        return model(x, r, t) if y is None else model(x, r, t, y)

    @staticmethod
    def _reduce(err, weight, dt):
        if weight is not None:
            err = err * weight.to(dt)
        return err.mean()

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "t_max")
        return f"{type(self).__name__}({params})"


def _sq(a, b):
    dt = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return (a.to(dt) - b.to(dt)).pow(2).flatten(1).sum(1), dt


def _output(name, out, x):
    if out.shape != x.shape:  # free to check, and a broadcast here would train on a wrong loss
        raise ValueError(f"the model returned shape {tuple(out.shape)} for inputs of shape {tuple(x.shape)}; "
                         f"{name} must return one velocity per input coordinate (the data's shape)")


class MeanFlowPath(_FlowMapObjective):
    r"""The MeanFlow loss (Geng et al., 2025) for a network :math:`\bar u_\theta(x, r, t)` (chapter 14).

    For a pair :math:`(x_0, x_1)`, times :math:`r \le t`, the point :math:`x_r = \alpha_r x_1 + \sigma_r x_0`
    and its conditional velocity :math:`v = \dot\alpha_r x_1 + \dot\sigma_r x_0`, the target is the
    right-hand side of the MeanFlow identity with :math:`v` for the field,

    .. math::  \bar u_{\mathrm{tgt}} = v + (t - r)\,\big(\nabla_x\bar u_\theta\, v + \partial_r \bar u_\theta\big),
               \qquad \mathcal L = \mathbb E\, w\,\lVert \bar u_\theta(x_r, r, t) - \mathrm{sg}(\bar u_{\mathrm{tgt}})\rVert^2 ,

    the bracket one Jacobian-vector product (``torch.func.jvp``, tangent :math:`(v, 1, 0)`) and
    ``sg`` a stop-gradient.  With :math:`r = t` the loss is the flow-matching loss.  The target is
    linear in :math:`v`, so averaging over the pairs through :math:`x_r` turns :math:`v` into the
    marginal field, as in Theorem 2.

    Args:
        path: the affine path (default CondOT) that draws ``x_r`` and ``v``.
        ratio: the fraction of samples with :math:`r < t` (the others have :math:`r = t`); the paper's
            best one-step setting is 0.25.
        p, c: the adaptive weight :math:`w = 1 / (\lVert \bar u_\theta - \bar u_{\mathrm{tgt}}\rVert^2 + c)^p`
            (stop-gradient) of the paper, which uses ``p = 1``.  The default ``p = 0`` is the plain squared error, whose
            stationary point is the average velocity; with ``p > 0`` the weight depends on the noisy
            target and moves the stationary point away from the conditional mean (chapter 14).

    Times: :meth:`draw_t` draws two times from the time sampler and sorts them (the ``r < t`` part), or
    uses the first for both (the ``r = t`` part).  The Jacobian-vector product is computed only on the
    ``r < t`` part (elsewhere it is multiplied by zero).
    """

    name = "meanflow"

    def __init__(self, path="condot", *, ratio: float = 0.25, p: float = 0.0, c: float = 1e-3):
        super().__init__(path)
        self.ratio = _checks.number("ratio", ratio, lo=0.0, hi=1.0)
        self.p = _checks.number("p", p, lo=0.0)
        self.c = _checks.number("c", c, lo=0.0, lo_open=True)

    def draw_t(self, n, sampler, generator, device, dtype):
        """``(n, 2)`` pairs ``(r, t)``: a fraction ``ratio`` sorted pairs of two draws, the rest ``(s, s)``."""
        a = sampler(n, generator=generator, device=device, dtype=dtype) * self.t_max
        b = sampler(n, generator=generator, device=device, dtype=dtype) * self.t_max
        apart = torch.rand(n, generator=generator, device=device) < self.ratio
        r = torch.where(apart, torch.minimum(a, b), a)
        t = torch.where(apart, torch.maximum(a, b), a)
        return torch.stack([r, t], dim=1)

    def loss(self, model, x0, x1, t, y=None, weight=None) -> torch.Tensor:
        r"""The MeanFlow loss on a batch (``t``: ``(batch, 2)`` pairs ``(r, t)``), without argument checks."""
        r, t = t[:, 0], t[:, 1]
        xr, v = self._start(x0, x1, r)
        apart = t > r
        errs, weights = [], []
        for part, jump in ((~apart, False), (apart, True)):
            if not bool(part.any()):
                continue
            xp, vp, rp, tp = xr[part], v[part], r[part], t[part]
            yp = None if y is None else y[part]
            if jump:  # the derivative along the conditional velocity: one JVP with tangent (v, 1, 0)
                out, d_dr = jvp(lambda x_, r_: self._call(model, x_, r_, tp, yp), (xp, rp), (vp, torch.ones_like(rp)))
                target = (vp + _bc(tp - rp, vp) * d_dr).detach()
            else:  # r = t: the flow-matching target
                out, target = self._call(model, xp, rp, tp, yp), vp
            _output("the model", out, xp)
            err, dt = _sq(out, target)
            if self.p > 0:
                err = err / (err.detach() + self.c) ** self.p
            errs.append(err)
            weights.append(None if weight is None else weight[part])
        err = torch.cat(errs)
        return self._reduce(err, None if weight is None else torch.cat(weights), dt)


class ShortcutPath(_FlowMapObjective):
    r"""The shortcut-model loss (Frans et al., 2024) for a network :math:`\bar u_\theta(x, r, t)` (chapter 14).

    A fraction ``1 - fraction`` of each batch is flow matching (:math:`r = t`, target the conditional
    velocity :math:`v` at :math:`x_r`).  The rest enforces the *self-consistency* of jumps: for a jump
    of length :math:`D = 2^{-k}`, :math:`k \in \{0, \dots, \log_2 M\}`, from a start :math:`r` on the grid
    of multiples of :math:`d = D/2`, the target is the average of two half jumps,

    .. math::  \bar u_{\mathrm{tgt}} = \tfrac12\big(\bar u_\theta(x_r, r, r + d) + \bar u_\theta(x', r + d, r + D)\big),
               \qquad x' = x_r + d\,\bar u_\theta(x_r, r, r + d),

    computed without gradient (for the shortest jump, :math:`D = 1/M`, the half jumps use the field,
    :math:`\bar u_\theta(\cdot, s, s)`).  The paper writes the network as :math:`s_\theta(x_t, t, d)`
    with a step size :math:`d`: here :math:`s_\theta(x, r, d) = \bar u_\theta(x, r, r + d)`.  Its
    targets come from the EMA weights; here from the current weights (the same at convergence).

    Args:
        path: the affine path (default CondOT).
        fraction: the fraction of each batch spent on self-consistency (the paper's code uses 1/8).
        max_steps: :math:`M`, a power of two: the smallest jump is :math:`1/M`.
    """

    name = "shortcut"

    def __init__(self, path="condot", *, fraction: float = 0.25, max_steps: int = 128):
        super().__init__(path)
        self.fraction = _checks.number("fraction", fraction, lo=0.0, hi=1.0)
        _checks.positive_int("max_steps", max_steps)
        if max_steps & (max_steps - 1):
            raise ValueError(f"max_steps must be a power of two (jumps of 1, 1/2, 1/4, ...), got {max_steps}")
        if self.t_max != 1.0:
            raise ValueError(f"the shortcut grid spans [0, 1], but {type(self.path).__name__} stops at "
                             f"t_max = {self.t_max}; use a path with t_max = 1")
        self.max_steps = max_steps

    def draw_t(self, n, sampler, generator, device, dtype):
        """``(n, 2)`` pairs: ``(s, s)`` with ``s`` from the time sampler, or a grid jump ``(r, r + D)``."""
        s = sampler(n, generator=generator, device=device, dtype=dtype)
        jump = torch.rand(n, generator=generator, device=device) < self.fraction
        levels = int(math.log2(self.max_steps))
        k = torch.randint(0, levels + 1, (n,), generator=generator, device=device)
        D = torch.pow(2.0, -k.to(dtype))
        positions = 2.0 ** (k + 1).to(dtype) - 1  # starts 0, d, ..., 1 - D with d = D / 2
        u = torch.rand(n, generator=generator, device=device, dtype=dtype)
        r0 = torch.floor(u * positions) * D / 2
        r = torch.where(jump, r0, s)
        t = torch.where(jump, (r0 + D).clamp(max=1.0), s)
        return torch.stack([r, t], dim=1)

    def loss(self, model, x0, x1, t, y=None, weight=None) -> torch.Tensor:
        r"""The shortcut loss on a batch (``t``: ``(batch, 2)`` pairs), without argument checks."""
        r, t = t[:, 0], t[:, 1]
        xr, v = self._start(x0, x1, r)
        out = self._call(model, xr, r, t, y)
        _output("the model", out, xr)
        target = v.to(out.dtype)
        jump = t > r
        if bool(jump.any()):
            yj = None if y is None else y[jump]
            xj, rj, tj = xr[jump], r[jump], t[jump]
            d = (tj - rj) / 2
            field = (tj - rj) <= (1.0 + 1e-6) / self.max_steps  # the shortest jump: half steps by the field
            with torch.no_grad():
                mid = rj + d
                s1 = self._call(model, xj, rj, torch.where(field, rj, mid), yj)
                x_mid = xj + _bc(d, xj) * s1
                s2 = self._call(model, x_mid, mid, torch.where(field, mid, tj), yj)
            target = target.clone()
            target[jump] = (0.5 * (s1 + s2)).to(target.dtype)
        err, dt = _sq(out, target)
        return self._reduce(err, weight, dt)


class ConsistencyPath(_FlowMapObjective):
    r"""Consistency training (Song et al., 2023) in this book's time direction, for a network
    :math:`\bar u_\theta(x, r, t)` queried only at :math:`t = 1` (chapter 14).

    The consistency function :math:`f_\theta(x, r) = x + (1 - r)\,\bar u_\theta(x, r, 1)` maps a point
    at time :math:`r` to the end of its trajectory; :math:`f_\theta(x, 1) = x` holds by construction.
    Training makes it constant along trajectories: two points of the same conditional path,
    :math:`x_r` and :math:`x_{r + \Delta}` (same :math:`x_0`, :math:`x_1`), must map to the same end,

    .. math::  \mathcal L = \mathbb E\,\Big\lVert \frac{f_\theta(x_r, r) - \mathrm{sg}\big(f_\theta(x_{r+\Delta}, r + \Delta)\big)}{\Delta}\Big\rVert^2,

    with :math:`r` uniform on :math:`[0, 1 - \Delta]` and ``sg`` a stop-gradient (the target network
    of Song et al. is an EMA of the weights; with the current weights, as in their improved training,
    nothing changes at convergence).  The step :math:`x_r \to x_{r+\Delta}` follows the conditional,
    not the marginal, velocity: an error of order :math:`\Delta` in the target.  As :math:`\Delta \to 0`,
    :math:`\Delta` times the gradient of this loss tends to the gradient of :class:`MeanFlowPath`'s loss
    at :math:`t = 1` with per-sample weight :math:`1 - r`: consistency training is MeanFlow at the end
    time (chapter 14).

    Args:
        path: the affine path (default CondOT; ``t_max`` must be 1).
        delta: the time step :math:`\Delta` between the two points.
    """

    name = "consistency"

    def __init__(self, path="condot", *, delta: float = 0.002):
        super().__init__(path)
        self.delta = _checks.number("delta", delta, lo=0.0, hi=1.0, lo_open=True)
        if self.t_max != 1.0:
            raise ValueError(f"a consistency model maps to t = 1, but {type(self.path).__name__} stops at "
                             f"t_max = {self.t_max}; use a path with t_max = 1")

    def draw_t(self, n, sampler, generator, device, dtype):
        """``(n, 2)`` pairs ``(r, r + delta)`` with ``r`` from the time sampler scaled to ``[0, 1 - delta]``."""
        r = sampler(n, generator=generator, device=device, dtype=dtype) * (1.0 - self.delta)
        return torch.stack([r, (r + self.delta).clamp(max=1.0)], dim=1)

    def consistency_function(self, model, x, r, y=None):
        r""":math:`f_\theta(x, r) = x + (1 - r)\,\bar u_\theta(x, r, 1)`."""
        r = time_as_batch(r, x)
        out = self._call(model, x, r, torch.ones_like(r), y)
        _output("the model", out, x)
        return x + _bc(1.0 - r, x) * out

    def loss(self, model, x0, x1, t, y=None, weight=None) -> torch.Tensor:
        r"""The consistency-training loss on a batch (``t``: ``(batch, 2)`` pairs ``(r, r + delta)``)."""
        r, s = t[:, 0], t[:, 1]
        xr = self.path.sample(x0, x1, r, check=False)[0]
        xs = self.path.sample(x0, x1, s, check=False)[0]
        f_r = self.consistency_function(model, xr, r, y)
        with torch.no_grad():
            f_s = self.consistency_function(model, xs, s, y)
        gap = _bc((s - r).clamp(min=1e-12), xr)
        err, dt = _sq(f_r / gap, f_s / gap)
        return self._reduce(err, weight, dt)


# ------------------------------------------------------------------------------------------ times, sampling
def grid_times(steps: int):
    r"""A time sampler (for ``train(time_sampler=...)``) drawing uniformly from the grid
    :math:`\{0, 1/k, \dots, (k-1)/k\}` of a ``k``-step Euler sampler.

    Trained on a teacher's pairs (``train(model, pairs=couplings.reflow_pairs(teacher, n), time_sampler=grid_times(k))``),
    a field learns the teacher's map at exactly the times a ``k``-step sampler visits: distillation
    into a ``k``-step model (Liu et al., 2023; chapter 14)."""
    _checks.positive_int("steps", steps)

    def draw(n, generator=None, device=None, dtype=None):
        k = torch.randint(0, steps, (n,), generator=generator, device=device)
        return k.to(dtype if dtype is not None else torch.get_default_dtype()) / steps
    draw.__name__ = f"grid_times({steps})"
    return draw


@torch.no_grad()
def sample(model, n: int | None = None, *, x0: torch.Tensor | None = None, steps: int = 1, times=None,
           path="condot", renoise: bool = False, generator: torch.Generator | None = None, device=None,
           trajectory: bool = False, **kwargs) -> Solution:
    r"""Generate with a flow-map network :math:`\bar u_\theta(x, r, t)` in a few jumps (chapter 14).

    From :math:`x_0` (drawn from the path's source, or given), for the times
    :math:`0 = t_0 < t_1 < \dots < t_K = 1` (``times``, or ``steps`` equal jumps):

    * ``renoise=False``: :math:`x \leftarrow x + (t_{k+1} - t_k)\,\bar u_\theta(x, t_k, t_{k+1})`, the
      flow map jump by jump (MeanFlow, shortcut models);
    * ``renoise=True``: the multistep sampler of consistency models: jump to the end,
      :math:`\hat x_1 = x + (1 - t_k)\,\bar u_\theta(x, t_k, 1)`, then, before the last jump, put the
      estimate back on the path with fresh noise, :math:`x = \alpha_{t_{k+1}}\hat x_1 + \sigma_{t_{k+1}} z`.

    Each jump is one network evaluation (``nfe = K``).  ``kwargs`` (e.g. labels ``y``) go to the model.
    Returns a :class:`cfmlib.solvers.Solution` (``trajectory``: the states at ``times``).
    """
    _checks.function("model", model, "(x, r, t)")
    _checks.generator("generator", generator)
    path = get_path(path)
    if not isinstance(path, AffinePath):
        raise TypeError(f"path must be an AffinePath, got {_checks.describe(path)}")
    if times is None:
        _checks.positive_int("steps", steps)
        times = torch.linspace(0.0, path.t_max, steps + 1, dtype=torch.float64).tolist()
    else:
        times = [float(_checks.number("times", s, lo=0.0, hi=path.t_max)) for s in times]
        if len(times) < 2 or times[0] != 0.0 or any(b <= a for a, b in zip(times, times[1:])):
            raise ValueError(f"times must rise strictly from 0 and hold at least two entries, got {times}")
    x0 = source_points(model, path, n, x0, generator=generator, device=device)
    _checks.module_device("model", model, x0=x0)
    _checks.module_dtype("model", model, x0=x0)
    x, states, end = x0, [x0], times[-1]
    for k, (a, b) in enumerate(zip(times, times[1:])):
        if renoise:
            out = model(x, a, end, **kwargs)
            _checks.field_output("model", out, x)
            x = x + (end - a) * out
            if k + 2 < len(times):
                z = torch.randn(x.shape, generator=generator, device=generator.device if generator is not None
                                else x.device, dtype=x.dtype).to(x.device)
                tb = torch.full((x.shape[0],), b, dtype=x.dtype, device=x.device)
                x = _bc(path.alpha(tb), x) * x + _bc(path.sigma(tb), x) * z
        else:
            out = model(x, a, b, **kwargs)
            _checks.field_output("model", out, x)
            x = x + (b - a) * out
        states.append(x)
    grid = torch.tensor(times, dtype=x.dtype, device=x.device)
    return Solution(x, len(times) - 1, torch.stack(states) if trajectory else None, grid if trajectory else None)
