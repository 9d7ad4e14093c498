r"""A discrete normalizing flow built from affine coupling layers (chapter 1).

The flow maps data :math:`x` to a latent :math:`z = F(x)` with base density
:math:`p_0 = \mathcal N(0, I)`, and scores data by the change of variables

.. math::  \log q_\theta(x) = \log p_0(F(x)) + \log\lvert\det \partial F / \partial x\rvert .

:math:`F` is a composition of affine coupling layers (Dinh et al., 2017). With a
binary mask :math:`m` one layer keeps the masked coordinates and rescales and shifts
the others with functions of the kept ones only,

.. math::  y = m \odot x + (1 - m) \odot \bigl(x \odot e^{s(m \odot x)} + b(m \odot x)\bigr),

so its Jacobian is triangular (up to a permutation) and
:math:`\log\lvert\det\rvert = \sum_i (1 - m_i)\, s_i(m \odot x)`: the log-determinant costs
:math:`O(d)` instead of the :math:`O(d^3)` of a general determinant. Masks alternate
from layer to layer so that every coordinate is transformed. Log-scales are bounded,
:math:`s = s_{\max} \tanh(\tilde s / s_{\max})`, for stable training.

``forward(x) -> (z, logdet)`` is the normalizing direction (data to noise),
``inverse(z) -> x`` the generative one; :func:`train_flow` fits a flow by maximum
likelihood.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import _checks
from .training import LossMonitor, draw_data

__all__ = ["AffineCoupling", "AffineCouplingFlow", "train_flow"]


class AffineCoupling(nn.Module):
    r"""One affine coupling layer on ``(batch, dim)`` tensors with a fixed binary ``mask``.

    Coordinates with ``mask == 1`` pass through unchanged and condition an MLP that outputs
    the log-scale :math:`s` and shift :math:`b` of the others:
    :math:`y = m x + (1 - m)(x e^{s} + b)`, :math:`\log\lvert\det\rvert = \sum_i (1 - m_i) s_i`.
    The last layer of the MLP starts at zero, so a new layer is the identity.
    """

    def __init__(self, mask: torch.Tensor, hidden: int = 128, depth: int = 2, scale_bound: float = 2.0):
        super().__init__()
        _checks.tensor("mask", mask, ndim=1)
        if not bool(((mask == 0) | (mask == 1)).all()) or mask.sum() < 1 or mask.sum() >= mask.numel():
            raise ValueError("mask must hold only 0 and 1, with at least one of each")
        _checks.positive_int("hidden", hidden)
        _checks.positive_int("depth", depth)
        self.scale_bound = _checks.number("scale_bound", scale_bound, lo=0.0, lo_open=True)
        dim = mask.numel()
        self.register_buffer("mask", mask.clone().float())
        layers, width = [], dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        head = nn.Linear(width, 2 * dim)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        self.net = nn.Sequential(*layers, head)

    def _scale_shift(self, x_kept: torch.Tensor):
        raw_s, b = self.net(x_kept).chunk(2, dim=1)
        s = self.scale_bound * torch.tanh(raw_s / self.scale_bound)
        free = 1 - self.mask
        return s * free, b * free  # s = b = 0 on the kept coordinates

    def forward(self, x: torch.Tensor):
        """Return ``(y, logdet)`` with ``logdet`` of shape ``(batch,)``."""
        s, b = self._scale_shift(x * self.mask)
        return x * torch.exp(s) + b, s.sum(1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Invert :meth:`forward`: the kept coordinates of ``y`` equal those of ``x``."""
        s, b = self._scale_shift(y * self.mask)
        return (y - b) * torch.exp(-s)


class AffineCouplingFlow(nn.Module):
    r"""A RealNVP-style flow: ``n_layers`` affine couplings with alternating masks, base :math:`\mathcal N(0, I)`.

    Layer ``k`` keeps the coordinates ``i`` with ``(i + k) % 2 == 0``, so consecutive
    layers transform complementary halves. ``hidden`` and ``depth`` size each layer's
    MLP; ``scale_bound`` bounds every log-scale. Shapes: ``x``, ``z`` are ``(batch, dim)``.
    """

    def __init__(self, dim: int = 2, n_layers: int = 8, hidden: int = 128, depth: int = 2,
                 scale_bound: float = 2.0):
        super().__init__()
        _checks.positive_int("dim", dim)
        if dim < 2:
            raise ValueError(f"dim must be at least 2 (a coupling layer splits the coordinates in two), got {dim}")
        _checks.positive_int("n_layers", n_layers)
        _checks.positive_int("hidden", hidden)
        _checks.positive_int("depth", depth)
        _checks.number("scale_bound", scale_bound, lo=0.0, lo_open=True)
        self.config = dict(kind="affine_coupling_flow", dim=dim, n_layers=n_layers, hidden=hidden,
                           depth=depth, scale_bound=scale_bound)
        self.dim = dim
        idx = torch.arange(dim)
        self.layers = nn.ModuleList(
            AffineCoupling(((idx + k) % 2 == 0).float(), hidden=hidden, depth=depth, scale_bound=scale_bound)
            for k in range(n_layers))

    def _check(self, name: str, x) -> torch.Tensor:
        _checks.tensor(name, x, ndim=2)
        if x.shape[1] != self.dim:
            raise ValueError(f"{name} must have shape (batch, {self.dim}), got {tuple(x.shape)}")
        p = next(self.parameters())
        if x.dtype != p.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but the flow's parameters are {p.dtype}; "
                            f"convert one of them (e.g. {name}.to({p.dtype}) or flow.to({x.dtype}))")
        if x.device != p.device:
            raise ValueError(f"{name} is on {x.device} but the flow is on {p.device}; move it with .to(device)")
        return x

    def forward(self, x: torch.Tensor):
        r"""Normalizing direction: ``(z, logdet)`` with :math:`z = F(x)` and
        ``logdet`` :math:`= \log\lvert\det \partial F/\partial x\rvert` (the sum over layers), shape ``(batch,)``."""
        self._check("x", x)
        return self._forward(x)

    def _forward(self, x: torch.Tensor):
        """:meth:`forward` without argument checks (the training loop validates once, up front)."""
        logdet = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for layer in self.layers:
            x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        r"""Generative direction: :math:`x = F^{-1}(z)`, the layers undone in reverse order."""
        self._check("z", z)
        for layer in reversed(self.layers):
            z = layer.inverse(z)
        return z

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`\log q_\theta(x) = \log \mathcal N(F(x); 0, I) + \log\lvert\det \partial F/\partial x\rvert`, shape ``(batch,)``."""
        self._check("x", x)
        return self._log_prob(x)

    def _log_prob(self, x: torch.Tensor) -> torch.Tensor:
        z, logdet = self._forward(x)
        return -0.5 * z.pow(2).sum(1) - 0.5 * self.dim * math.log(2 * math.pi) + logdet

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``n`` samples: ``z ~ N(0, I)`` (from ``generator``) pushed through :meth:`inverse`."""
        _checks.positive_int("n", n)
        p = next(self.parameters())
        if generator is not None and generator.device != p.device:
            raise ValueError(f"generator is on {generator.device} but the flow is on {p.device}; "
                             f"use torch.Generator(device=...) on the flow's device")
        z = torch.randn(n, self.dim, generator=generator, device=p.device, dtype=p.dtype)
        return self.inverse(z)


def train_flow(flow: AffineCouplingFlow, data, *, steps: int = 2000, batch_size: int = 256, lr: float = 1e-3,
               weight_decay: float = 0.0, grad_clip: float | None = 10.0, seed: int = 0,
               progress: bool = True) -> list:
    r"""Fit ``flow`` by maximum likelihood: minimise :math:`-\frac1n\sum_k \log q_\theta(x^{(k)})` with Adam.

    ``data`` is a sampler called as ``data(n, generator=g)`` (every cfmlib 2D data set) or a
    tensor ``(N, dim)`` drawn from with replacement. Training runs on the flow's device; all
    randomness comes from one generator seeded with ``seed``. The learning rate follows a
    cosine decay to zero. Returns the loss (mean negative log-likelihood in nats) of every step.
    """
    if not isinstance(flow, AffineCouplingFlow):
        raise TypeError(f"flow must be an AffineCouplingFlow, got {_checks.describe(flow)}")
    _checks.positive_int("steps", steps)
    _checks.positive_int("batch_size", batch_size)
    _checks.number("lr", lr, lo=0.0, lo_open=True)
    _checks.number("weight_decay", weight_decay, lo=0.0)
    if grad_clip is not None:
        _checks.number("grad_clip", grad_clip, lo=0.0, lo_open=True)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {_checks.describe(seed)}")
    p = next(flow.parameters())
    if isinstance(data, torch.Tensor):
        flow._check("data", data)
        _checks.module_dtype("flow", flow, data=data)
        data = data.to(p.device)
    elif not callable(data):
        raise TypeError(f"data must be a sampler called as data(n, generator=...) or a tensor (N, {flow.dim}), "
                        f"got {_checks.describe(data)}")
    gen = torch.Generator(device=p.device).manual_seed(seed)
    opt = torch.optim.Adam(flow.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    monitor = LossMonitor(steps, device=p.device, check_every=1, progress=progress, desc="train_flow",
                          what="the negative log-likelihood", hint="Lower lr, lower scale_bound or set grad_clip.")
    flow.train()
    try:
        for step in range(steps):
            x, _ = draw_data(data, batch_size, gen, p.device)
            if step == 0 and not isinstance(data, torch.Tensor):  # the sampler's output, checked once
                flow._check("data", x)
                _checks.module_dtype("flow", flow, data=x)
            loss = -flow._log_prob(x).mean()  # tensor data was checked once, before the loop
            monitor.record(step, loss.detach())  # stops on NaN before the step is taken
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                nn.utils.clip_grad_norm_(flow.parameters(), grad_clip)
            opt.step()
            sched.step()
    finally:
        monitor.close()
    history = monitor.history.cpu().tolist()
    flow.eval()
    return history
