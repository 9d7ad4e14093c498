r"""Closed-form ground truth for data with a known distribution (chapters 4, 5, 7 and 10).

For data :math:`q = \sum_k w_k \mathcal N(m_k, \mathrm{diag}(\tau_k^2))` -- a
Gaussian mixture, or with :math:`\tau_k = 0` a finite data set (an empirical
distribution) -- and any affine Gaussian path
:math:`x_t = \alpha_t x_1 + \sigma_t x_0` from :mod:`cfmlib.paths`, everything
about the marginal path is available in closed form:

.. math::
    p_t(x) = \sum_k w_k\, \mathcal N\big(x;\ \alpha_t m_k,\ \mathrm{diag}(\alpha_t^2\tau_k^2 + \sigma_t^2)\big),

    u_t(x) = \mathbb E[\dot\alpha_t x_1 + \dot\sigma_t x_0 \mid x_t = x]
           = \sum_k \gamma_k(x)\big(\dot\alpha_t \hat x_{1,k} + \dot\sigma_t \hat x_{0,k}\big),

with posterior weights :math:`\gamma_k(x) \propto w_k \mathcal N_k(x)` and the
per-component posterior means :math:`\hat x_{1,k} = m_k + \alpha_t\tau_k^2 (x - \alpha_t m_k)/v_k`,
:math:`\hat x_{0,k} = \sigma_t (x - \alpha_t m_k)/v_k`, :math:`v_k = \alpha_t^2\tau_k^2 + \sigma_t^2`.
None of these formulas divides by :math:`\sigma_t` alone, and all sums over
components are done with log-sum-exp.
"""
from __future__ import annotations

import math

import torch

from . import _checks
from .likelihood import divergence
from .paths import AffinePath, get_path

__all__ = ["GaussianMixture", "EmpiricalDistribution", "Marginal", "continuity_residual"]


class GaussianMixture:
    r"""A mixture :math:`\sum_k w_k \mathcal N(m_k, \mathrm{diag}(\tau_k^2))` with closed-form density.

    Args:
        means: ``(K, D)`` component means :math:`m_k`.
        stds: standard deviations :math:`\tau_k`: a number, ``(K,)`` or ``(K, D)``; ``0`` gives point masses.
        weights: ``(K,)`` non-negative weights (normalised here); default uniform.
    """

    def __init__(self, means: torch.Tensor, stds=1.0, weights: torch.Tensor | None = None):
        _checks.tensor("means", means, ndim=2)
        K, D = means.shape
        if isinstance(stds, (int, float)) and not isinstance(stds, bool):
            stds = torch.full((K, D), float(stds), dtype=means.dtype, device=means.device)
        _checks.tensor("stds", stds, ndim=(1, 2))
        _checks.same_device(means=means, stds=stds)
        if stds.ndim == 1:
            if stds.shape[0] != K:
                raise ValueError(f"stds of shape (K,) must have K={K} entries, got {stds.shape[0]}")
            stds = stds[:, None].expand(K, D)
        if stds.shape != (K, D):
            raise ValueError(f"stds must be a number, (K,)=({K},) or (K, D)=({K}, {D}), got {tuple(stds.shape)}")
        if bool((stds < 0).any()):
            raise ValueError("stds must be non-negative")
        if weights is None:
            weights = torch.full((K,), 1.0 / K, dtype=means.dtype, device=means.device)
        _checks.tensor("weights", weights, ndim=1)
        if weights.shape[0] != K:
            raise ValueError(f"weights must have K={K} entries, got {weights.shape[0]}")
        _checks.same_device(means=means, weights=weights)
        if bool((weights < 0).any()) or float(weights.sum()) <= 0:
            raise ValueError("weights must be non-negative with a positive sum")
        _checks.same_device(means=means, stds=stds, weights=weights)
        self.means, self.stds = means, stds.contiguous()
        self.weights = weights / weights.sum()
        self.dim = D

    @property
    def n_components(self) -> int:
        """The number of components ``K``."""
        return self.means.shape[0]

    def to(self, device=None, dtype=None) -> "GaussianMixture":
        """A copy on another device and/or dtype."""
        conv = lambda v: v.to(device=device, dtype=dtype)  # noqa: E731
        return type(self)._from(conv(self.means), conv(self.stds), conv(self.weights))

    @classmethod
    def _from(cls, means, stds, weights):
        obj = cls.__new__(cls)
        obj.means, obj.stds, obj.weights, obj.dim = means, stds, weights, means.shape[1]
        return obj

    def sample(self, n: int, generator: torch.Generator | None = None, return_labels: bool = False):
        """Draw ``n`` samples, shape ``(n, D)`` (and the component index of each, if asked)."""
        _checks.positive_int("n", n)
        _checks.generator("generator", generator)
        dev = generator.device if generator is not None else self.means.device
        w = self.weights.to(dev)
        k = torch.multinomial(w, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, device=dev, dtype=self.means.dtype)
        x = self.means.to(dev)[k] + self.stds.to(dev)[k] * z
        return (x, k) if return_labels else x

    __call__ = sample

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`\log q(x)`, shape ``(batch,)`` (needs every :math:`\tau_k > 0`)."""
        return Marginal(self, _IdentityPath()).log_prob(x, 1.0)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`\nabla \log q(x)`, shape ``(batch, D)``."""
        return Marginal(self, _IdentityPath()).score(x, 1.0)


class EmpiricalDistribution(GaussianMixture):
    """The uniform distribution on a finite set of points ``(N, D)``: a mixture with zero widths."""

    def __init__(self, points: torch.Tensor):
        _checks.tensor("points", points, ndim=2)
        super().__init__(points, 0.0)


class _IdentityPath(AffinePath):
    """x_t = x_1 for every t (used to evaluate the data distribution itself)."""

    def alpha(self, t):
        return torch.ones_like(t)

    def sigma(self, t):
        return torch.zeros_like(t)

    def d_alpha(self, t):
        return torch.zeros_like(t)

    def d_sigma(self, t):
        return torch.zeros_like(t)


class Marginal:
    r"""The marginal probability path :math:`p_t` and field :math:`u_t` that a path induces from a
    :class:`GaussianMixture` (or :class:`EmpiricalDistribution`).

    ``Marginal(q, path)(x, t)`` is :math:`u_t(x)`, so the object can be handed to
    :func:`cfmlib.solvers.odeint` as the field.  ``x``: ``(batch, D)``; ``t``: number or ``(batch,)``.
    """

    def __init__(self, q: GaussianMixture, path="condot"):
        if not isinstance(q, GaussianMixture):
            raise TypeError(f"q must be a GaussianMixture or EmpiricalDistribution, got {_checks.describe(q)}")
        self.q, self.path = q, get_path(path)

    def _parts(self, x, t, need_posterior=True):
        _checks.tensor("x", x, ndim=2)
        if x.shape[1] != self.q.dim:
            raise ValueError(f"x must have shape (batch, {self.q.dim}), got {tuple(x.shape)}")
        _checks.same_device(x=x, means=self.q.means)
        t = _checks.time("t", t, x.shape[0], like=x)
        a, s = self.path.alpha(t)[:, None, None], self.path.sigma(t)[:, None, None]  # (B,1,1)
        m, tau = self.q.means[None].to(x.dtype), self.q.stds[None].to(x.dtype)  # (1,K,D)
        var = a**2 * tau**2 + s**2  # (B,K,D)
        if bool((var <= 0).any()):
            raise ValueError("the marginal is degenerate here (alpha_t^2 tau^2 + sigma_t^2 = 0): a finite data set "
                             "at a time where sigma_t = 0; use sigma_min > 0 or t < t_max")
        diff = x[:, None, :] - a * m  # (B,K,D)
        logn = -0.5 * ((diff**2 / var) + torch.log(2 * math.pi * var)).sum(-1)  # (B,K)
        logits = torch.log(self.q.weights.to(x.dtype))[None] + logn
        return t, a, s, tau, var, diff, logits

    def log_prob(self, x: torch.Tensor, t) -> torch.Tensor:
        r""":math:`\log p_t(x)`, shape ``(batch,)``."""
        *_, logits = self._parts(x, t)
        return torch.logsumexp(logits, dim=1)

    def posterior(self, x: torch.Tensor, t) -> torch.Tensor:
        r"""Posterior component weights :math:`\gamma_k(x)`, shape ``(batch, K)``."""
        *_, logits = self._parts(x, t)
        return torch.softmax(logits, dim=1)

    def score(self, x: torch.Tensor, t) -> torch.Tensor:
        r""":math:`\nabla_x \log p_t(x) = -\sum_k \gamma_k(x) (x - \alpha_t m_k)/v_k`, shape ``(batch, D)``."""
        _, a, s, tau, var, diff, logits = self._parts(x, t)
        g = torch.softmax(logits, dim=1)[..., None]
        return -(g * diff / var).sum(1)

    def field(self, x: torch.Tensor, t) -> torch.Tensor:
        r"""The marginal field :math:`u_t(x)` of Theorem 1, shape ``(batch, D)``.

        The noise term is written :math:`\dot\sigma_t \hat x_{0,k} = \sigma_t\dot\sigma_t (x - \alpha_t m_k)/v_k`
        with :math:`\sigma_t\dot\sigma_t` from :meth:`~cfmlib.paths.AffinePath.sigma_d_sigma`, so the field
        is finite where it has a finite limit (the VP path at ``t = 1``, where :math:`\dot\sigma_t` alone is infinite).
        """
        tb, a, s, tau, var, diff, logits = self._parts(x, t)
        da, sds = self.path.d_alpha(tb)[:, None, None], self.path.sigma_d_sigma(tb)[:, None, None]
        g = torch.softmax(logits, dim=1)[..., None]
        x1_hat = self.q.means[None].to(x.dtype) + a * tau**2 * diff / var
        return (g * (da * x1_hat + sds * diff / var)).sum(1)

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        """The marginal field :math:`u_t(x)` (:meth:`field`), so that the object is a field for the solvers."""
        return self.field(x, t)


def continuity_residual(log_prob_fn, field_fn, x: torch.Tensor, t, *, log_space: bool = False,
                        return_terms: bool = False):
    r"""The residual of the continuity equation (chapter 3) at points ``x`` and times ``t``, by autograd:

    .. math::  r(x, t) = \partial_t p_t(x) + \nabla\cdot\big(p_t(x)\, u_t(x)\big)
               = p_t(x)\big(\partial_t \log p_t(x) + \nabla\log p_t(x)\cdot u_t(x) + \nabla\cdot u_t(x)\big).

    A field ``u`` generates the path ``p`` exactly when ``r = 0`` everywhere.

    Args:
        log_prob_fn: :math:`\log p_t(x)`, called as ``log_prob_fn(x, t)`` with ``x`` ``(batch, D)`` and
            ``t`` ``(batch,)``, returning ``(batch,)`` (e.g. :meth:`Marginal.log_prob`).
        field_fn: :math:`u_t(x)`, called as ``field_fn(x, t)``, returning ``(batch, D)``.
        x: points ``(batch, D)``; use float64 for tight checks.
        t: a number or ``(batch,)`` times.
        log_space: return the residual divided by :math:`p_t(x)` (the bracket above), which is
            well scaled in the tails where :math:`p_t` underflows.
        return_terms: also return the two terms :math:`(\partial_t p,\ \nabla\cdot(p u))` (or their
            log-space versions), e.g. to report a relative error ``|r|.max() / |dp_dt|.max()``.

    Returns:
        ``r`` of shape ``(batch,)``, or ``(r, dp_dt, div_flux)`` when ``return_terms``.
    """
    if not callable(log_prob_fn):
        raise TypeError(f"log_prob_fn must be callable as log_prob_fn(x, t), got {_checks.describe(log_prob_fn)}")
    if not callable(field_fn):
        raise TypeError(f"field_fn must be callable as field_fn(x, t), got {_checks.describe(field_fn)}")
    _checks.tensor("x", x, ndim=2)
    t = _checks.time("t", t, x.shape[0], like=x)
    with torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        tg = t.detach().clone().requires_grad_(True)
        logp = log_prob_fn(xg, tg)
        if logp.shape != (x.shape[0],):
            raise ValueError(f"log_prob_fn must return shape (batch,) = ({x.shape[0]},), got {tuple(logp.shape)}")
        dlogp_dt, score = torch.autograd.grad(logp.sum(), (tg, xg), allow_unused=True)
        dlogp_dt = torch.zeros_like(tg) if dlogp_dt is None else dlogp_dt  # a path constant in time
        score = torch.zeros_like(xg) if score is None else score
        u = field_fn(xg, tg)
        if u.shape != x.shape:
            raise ValueError(f"field_fn must return the shape of x {tuple(x.shape)}, got {tuple(u.shape)}")
        # `+ 0 * x` keeps x in the graph, so that a field constant in x has divergence 0 instead of failing
        div_u = divergence(lambda y, s: field_fn(y, s) + 0 * y, x.detach(), t.detach())
    dt_term = dlogp_dt.detach()
    flux_term = (score * u).sum(1).detach() + div_u.detach()
    if not log_space:
        p = logp.detach().exp()
        dt_term, flux_term = p * dt_term, p * flux_term
    r = dt_term + flux_term
    return (r, dt_term, flux_term) if return_terms else r
