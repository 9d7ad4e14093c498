"""Exact log-likelihoods agree with a slow reference that takes the divergence one dimension
at a time (a Python loop over the diagonal of the Jacobian) and integrates with a plain RK4 loop."""
import math

import torch

from cfmlib import likelihood
from cfmlib.models import MLP


def _slow_divergence(v, x, t):
    x = x.detach().requires_grad_(True)
    out = v(x, t)
    div = torch.zeros(x.shape[0], dtype=x.dtype)
    for i in range(x.shape[1]):
        div = div + torch.autograd.grad(out[:, i].sum(), x, retain_graph=True)[0][:, i]
    return out.detach(), div.detach()


def _slow_log_prob(v, x1, steps):
    x, ell, h = x1.clone(), torch.zeros(x1.shape[0], dtype=x1.dtype), -1.0 / steps

    def f(t, x):
        return _slow_divergence(v, x, torch.full((x.shape[0],), t, dtype=x.dtype))

    for k in range(steps):
        t = 1.0 + k * h
        k1, d1 = f(t, x)
        k2, d2 = f(t + h / 2, x + h / 2 * k1)
        k3, d3 = f(t + h / 2, x + h / 2 * k2)
        k4, d4 = f(t + h, x + h * k3)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        ell = ell + h / 6 * (d1 + 2 * d2 + 2 * d3 + d4)
    logp0 = -0.5 * x.pow(2).sum(1) - 0.5 * x.shape[1] * math.log(2 * math.pi)
    return logp0 + ell  # ell = integral of the divergence from t = 1 down to 0


def _net(dim):
    torch.manual_seed(0)
    return MLP(dim=dim, hidden=32, depth=2).double()


def test_exact_divergence_matches_loop_over_dimensions():
    for dim in (1, 2, 5):
        net = _net(dim)
        x = torch.randn(64, dim, generator=torch.Generator().manual_seed(dim), dtype=torch.float64)
        t = torch.rand(64, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
        _, ref = _slow_divergence(net, x, t)
        got = likelihood.divergence(net, x, t, method="exact")
        assert torch.allclose(got, ref, atol=1e-10, rtol=1e-10)


def test_log_prob_matches_slow_reference():
    net = _net(2)
    x1 = torch.randn(50, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = likelihood.log_prob(net, x1, method="rk4", steps=20).log_prob
    ref = _slow_log_prob(net, x1, 20)
    assert torch.allclose(got, ref, atol=1e-8)
    adaptive = likelihood.log_prob(net, x1, method="dopri5", atol=1e-7, rtol=1e-7).log_prob
    assert torch.allclose(adaptive, ref, atol=1e-4)
