"""Unit tests for cfmlib.analytic: the closed-form marginal path and field of Theorem 1.

Each closed form is checked against an independent computation: Monte Carlo
posterior averages, the continuity equation (autograd), normalisation on a
grid, autograd scores, and the limit of zero width.
"""
import math

import pytest
import torch

from cfmlib import datasets, paths
from cfmlib.analytic import EmpiricalDistribution, GaussianMixture, Marginal

D64 = torch.float64
PATH_NAMES = ["condot", "cosine", "vp", "ve"]


def _path(name):
    if name == "condot":
        return paths.CondOTPath(sigma_min=0.01)
    if name == "ve":
        return paths.VEPath(sigma_min=0.05, sigma_max=5.0)
    return paths.get_path(name)


def _mixture():
    return datasets.gaussian_mixture().to(dtype=D64)


def _points(n=64, seed=0, scale=2.5):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, 2, generator=g, dtype=D64)


@pytest.mark.parametrize("name", PATH_NAMES)
@pytest.mark.parametrize("t", [0.2, 0.6, 0.9])
def test_field_matches_importance_weighted_monte_carlo(name, t):
    """u_t(x) = E[u_t(x | x1) | x_t = x], estimated with x1 ~ q and weights p_t(x | x1)."""
    path = _path(name)
    t = min(t, path.t_max)
    q = _mixture()
    marg = Marginal(q, path)
    g = torch.Generator().manual_seed(2)
    # evaluation points drawn from p_t itself, where the field matters
    x = path.sample_xt(torch.randn(8, 2, generator=g, dtype=D64), q.sample(8, generator=g), t)
    m = 100_000
    x1 = q.sample(m, generator=g)
    est = []
    for xi in x:
        xb = xi.expand(m, 2)
        logw = path.conditional_log_prob(xb, x1, t)
        w = torch.softmax(logw, 0)[:, None]
        u = path.conditional_field(xb, x1, t)
        est.append((w * u).sum(0))
        ess = 1.0 / (w**2).sum()
        assert ess > 200, "importance sampling too degenerate for a meaningful test"
    est = torch.stack(est)
    exact = marg.field(x, t)
    scale = exact.abs().max().clamp(min=1.0)
    assert torch.allclose(est, exact, atol=0.05 * float(scale)), (est - exact).abs().max()


def _continuity_residual(logp_fn, field_fn, x, t):
    """(d/dt) log p + div u + u . grad log p, all by autograd (float64)."""
    x = x.clone().requires_grad_(True)
    t = t.clone().requires_grad_(True)
    logp = logp_fn(x, t)
    dlogp_dt, grad_logp = torch.autograd.grad(logp.sum(), (t, x), create_graph=False)
    u = field_fn(x, t)
    div = sum(torch.autograd.grad(u[:, i].sum(), x, retain_graph=True)[0][:, i] for i in range(x.shape[1]))
    terms = (dlogp_dt, div, (u * grad_logp).sum(1))
    res = sum(terms)
    size = sum(a.abs() for a in terms)
    return res.detach(), size.detach()


@pytest.mark.parametrize("name", PATH_NAMES)
@pytest.mark.parametrize("empirical", [False, True])
def test_marginal_pair_satisfies_continuity_equation(name, empirical):
    path = _path(name)
    q = EmpiricalDistribution(_points(5, seed=3, scale=2.0)) if empirical else _mixture()
    marg = Marginal(q, path)
    x = _points(128, seed=4)
    g = torch.Generator().manual_seed(5)
    t = 0.05 + 0.9 * torch.rand(128, generator=g, dtype=D64)
    t = t.clamp(max=path.t_max - 1e-3)
    res, size = _continuity_residual(marg.log_prob, marg.field, x, t)
    assert float(res.abs().max()) < 1e-8 * max(1.0, float(size.max()))


def test_wrong_field_violates_continuity_equation():
    q = _mixture()
    ot, cos = Marginal(q, "condot"), Marginal(q, "cosine")
    x = _points(128, seed=6)
    t = torch.full((128,), 0.5, dtype=D64)
    res, size = _continuity_residual(ot.log_prob, cos.field, x, t)
    assert float(res.abs().max()) > 1e-2 * float(size.max())


@pytest.mark.parametrize("name", ["condot", "cosine", "vp"])
@pytest.mark.parametrize("t", [0.0, 0.5, 0.99])
def test_log_prob_normalised_on_grid(name, t):
    path = _path(name)
    t = min(t, path.t_max)
    marg = Marginal(_mixture(), path)
    lim, n = 8.0, 321
    g = torch.linspace(-lim, lim, n, dtype=D64)
    xx, yy = torch.meshgrid(g, g, indexing="xy")
    pts = torch.stack([xx.flatten(), yy.flatten()], 1)
    mass = marg.log_prob(pts, t).exp().sum() * (g[1] - g[0]) ** 2
    assert abs(float(mass) - 1.0) < 1e-3


def test_mixture_log_prob_is_marginal_at_t1_and_normalised():
    q = _mixture()
    x = _points(50, seed=7)
    # direct formula, component by component
    comps = []
    for k in range(q.n_components):
        m, s = q.means[k], q.stds[k]
        comps.append(math.log(float(q.weights[k])) + (-0.5 * ((x - m) / s) ** 2 - torch.log(s)
                                                    - 0.5 * math.log(2 * math.pi)).sum(1))
    direct = torch.logsumexp(torch.stack(comps, 1), 1)
    assert torch.allclose(q.log_prob(x), direct, atol=1e-12)
    assert torch.allclose(Marginal(q, "condot").log_prob(x, 1.0), direct, atol=1e-12)


@pytest.mark.parametrize("name", PATH_NAMES)
def test_score_is_autograd_gradient_of_log_prob(name):
    path = _path(name)
    marg = Marginal(_mixture(), path)
    x = _points(64, seed=8).requires_grad_(True)
    t = min(0.7, path.t_max)
    (grad,) = torch.autograd.grad(marg.log_prob(x, t).sum(), x)
    assert torch.allclose(marg.score(x.detach(), t), grad, atol=1e-10)
    q = _mixture()
    (grad_q,) = torch.autograd.grad(q.log_prob(x).sum(), x)
    assert torch.allclose(q.score(x.detach()), grad_q, atol=1e-10)


def test_posterior_is_normalised_bayes_rule():
    q = _mixture()
    marg = Marginal(q, "condot")
    x = _points(32, seed=9)
    post = marg.posterior(x, 0.4)
    assert torch.allclose(post.sum(1), torch.ones(32, dtype=D64), atol=1e-12)
    # Bayes: gamma_k = w_k N_k(x) / p_t(x)
    a, s = 0.4, 0.6
    var = a**2 * q.stds**2 + s**2
    logn = (-0.5 * (x[:, None] - a * q.means[None]) ** 2 / var[None] - 0.5 * torch.log(2 * math.pi * var[None])).sum(-1)
    expected = torch.exp(torch.log(q.weights)[None] + logn - marg.log_prob(x, 0.4)[:, None])
    assert torch.allclose(post, expected, atol=1e-12)


@pytest.mark.parametrize("name", PATH_NAMES)
def test_empirical_distribution_is_zero_width_mixture(name):
    path = _path(name)
    pts = _points(6, seed=10, scale=2.0)
    emp = EmpiricalDistribution(pts)
    zero = GaussianMixture(pts, torch.zeros(6, 2, dtype=D64))
    thin = GaussianMixture(pts, 1e-9)
    x = _points(40, seed=11)
    t = min(0.8, path.t_max)
    for other in (zero, thin):
        m_e, m_o = Marginal(emp, path), Marginal(other, path)
        assert torch.allclose(m_e.log_prob(x, t), m_o.log_prob(x, t), atol=1e-8)
        assert torch.allclose(m_e.field(x, t), m_o.field(x, t), atol=1e-8)
        assert torch.allclose(m_e.score(x, t), m_o.score(x, t), atol=1e-8)
    # samples are the points themselves, uniformly
    s, k = emp.sample(3000, generator=torch.Generator().manual_seed(0), return_labels=True)
    assert torch.equal(s, pts[k])
    assert int(torch.bincount(k, minlength=6).min()) > 400


def test_empirical_field_at_time_zero_and_posterior_mean_form():
    """For a finite set, u_t(x) = sum_i gamma_i(x) u_t(x | x1_i) with the conditional field of the path."""
    path = paths.CondOTPath(sigma_min=0.0)
    pts = _points(7, seed=12, scale=2.0)
    marg = Marginal(EmpiricalDistribution(pts), path)
    x = _points(30, seed=13)
    t = 0.35
    gam = marg.posterior(x, t)
    cond = torch.stack([path.conditional_field(x, p.expand(30, 2), t) for p in pts], 1)
    assert torch.allclose(marg.field(x, t), (gam[..., None] * cond).sum(1), atol=1e-12)
    # at t = 0 every point starts at noise: u_0(x) = mean(x1) - x (OT path, sigma_min = 0)
    assert torch.allclose(marg.field(x, 0.0), pts.mean(0) - x, atol=1e-12)


def test_degenerate_empirical_end_raises():
    marg = Marginal(EmpiricalDistribution(_points(3)), paths.CondOTPath(0.0))
    with pytest.raises(ValueError, match="degenerate"):
        marg.field(_points(4), 1.0)


def test_float32_mixture_accepts_float64_points_and_checks():
    q = datasets.eight_gaussians()  # float32
    marg = Marginal(q, "condot")
    x = _points(10)
    assert marg.field(x, 0.5).dtype == D64
    with pytest.raises(TypeError, match="q must be"):
        Marginal(torch.zeros(3, 2), "condot")
    with pytest.raises(ValueError, match="shape"):
        marg.field(torch.zeros(4, 3, dtype=D64), 0.5)
    with pytest.raises(ValueError):
        GaussianMixture(torch.zeros(3, 2), torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError):
        GaussianMixture(torch.zeros(3, 2), 1.0, torch.ones(2))
