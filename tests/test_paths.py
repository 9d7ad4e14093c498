"""Affine Gaussian paths (chapters 5, 6 and 10): boundary conditions, targets as time derivatives,
Theorem 3 (the conditional field generates its Gaussian path), conversions between velocity, score
and noise prediction, autograd derivatives, a user-defined path, and argument checks."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from cfmlib.paths import PATHS, AffinePath, CondOTPath, CosinePath, VEPath, VPPath, get_path

D64 = torch.float64

ALL_PATHS = {
    "condot": CondOTPath(),
    "condot-smin": CondOTPath(sigma_min=0.05),
    "ve": VEPath(sigma_min=0.01, sigma_max=5.0),
    "vp": VPPath(),
    "cosine": CosinePath(),
}


class Quadratic(AffinePath):
    """A path written only through its schedule: alpha = t^2, sigma = 1 - t (no derivatives given)."""

    def alpha(self, t):
        return t**2

    def sigma(self, t):
        return 1.0 - t


class ConstantAlpha(AffinePath):
    """alpha_t = 1 without any dependence on t (autograd must return zero, not fail)."""

    def alpha(self, t):
        return torch.ones_like(t)

    def sigma(self, t):
        return 2.0 - t


def _times(path, n=7):
    return torch.linspace(0.05, min(path.t_max, 0.95), n, dtype=D64)


@pytest.mark.parametrize("name", list(ALL_PATHS))
def test_boundary_conditions(name):
    p = ALL_PATHS[name]
    zero, one = torch.zeros(1, dtype=D64), torch.ones(1, dtype=D64)
    if name.startswith("condot"):
        assert float(p.alpha(zero)) == 0.0 and float(p.sigma(zero)) == 1.0
        assert float(p.alpha(one)) == 1.0 and math.isclose(float(p.sigma(one)), p.sigma_min)
    elif name == "ve":
        assert float(p.alpha(zero)) == 1.0 and math.isclose(float(p.sigma(zero)), p.sigma_max)
        assert float(p.alpha(one)) == 1.0 and math.isclose(float(p.sigma(one)), p.sigma_min)
        assert math.isclose(p.source_scale, p.sigma_max)
    elif name == "vp":
        # alpha_0 = exp(-T(1)/2) is tiny, sigma_0^2 = 1 - alpha_0^2; the data end is exact
        assert float(p.alpha(zero)) < 1e-2 and abs(float(p.sigma(zero)) - 1.0) < 1e-4
        assert float(p.alpha(one)) == 1.0 and float(p.sigma(one)) == 0.0
        tm = torch.tensor([p.t_max], dtype=D64)
        assert float(p.sigma(tm)) < 0.1 and torch.isfinite(p.d_sigma(tm)).all()
        # variance preserving at every time
        t = torch.linspace(0, 1, 11, dtype=D64)
        assert torch.allclose(p.alpha(t) ** 2 + p.sigma(t) ** 2, torch.ones_like(t))
    elif name == "cosine":
        assert abs(float(p.alpha(zero))) < 1e-12 and float(p.sigma(zero)) == 1.0
        assert float(p.alpha(one)) == 1.0 and abs(float(p.sigma(one))) < 1e-12
    if name != "ve":
        assert math.isclose(p.source_scale, 1.0, abs_tol=1e-4)


@pytest.mark.parametrize("name", list(ALL_PATHS))
def test_sample_xt_at_ends(name):
    p = ALL_PATHS[name]
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(5, 3, generator=g, dtype=D64), torch.randn(5, 3, generator=g, dtype=D64)
    a1, s1 = p.alpha(torch.ones(1, dtype=D64)), p.sigma(torch.ones(1, dtype=D64))
    assert torch.allclose(p.sample_xt(x0, x1, 1.0), a1 * x1 + s1 * x0)
    if name == "condot":
        assert torch.allclose(p.sample_xt(x0, x1, 0.0), x0)
        assert torch.allclose(p.sample_xt(x0, x1, 1.0), x1)


@pytest.mark.parametrize("name", list(ALL_PATHS) + ["quadratic"])
def test_target_is_time_derivative_of_flow(name):
    p = Quadratic() if name == "quadratic" else ALL_PATHS[name]
    g = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(7, 2, generator=g, dtype=D64), torch.randn(7, 2, generator=g, dtype=D64)
    t, h = _times(p), 1e-6
    fd = (p.sample_xt(x0, x1, t + h) - p.sample_xt(x0, x1, t - h)) / (2 * h)
    ut = p.target(x0, x1, t)
    assert torch.allclose(fd, ut, atol=1e-6, rtol=1e-6)
    xt, ut2 = p.sample(x0, x1, t)
    assert torch.allclose(xt, p.sample_xt(x0, x1, t)) and torch.allclose(ut2, ut)
    # Theorem 3's field evaluated on the path equals the target
    assert torch.allclose(p.conditional_field(xt, x1, t), ut, atol=1e-9)


def test_ot_target_closed_form():
    p = CondOTPath(sigma_min=0.1)
    x0, x1 = torch.randn(4, 2, dtype=D64), torch.randn(4, 2, dtype=D64)
    for t in (0.0, 0.3, 1.0):
        assert torch.allclose(p.target(x0, x1, t), x1 - 0.9 * x0)


@pytest.mark.parametrize("name", list(ALL_PATHS) + ["quadratic"])
def test_theorem3_continuity_equation(name):
    """d/dt log p + div u + u . grad log p = 0 for p_t(x|x1) = N(alpha x1, sigma^2 I) and u = Theorem 3."""
    p = Quadratic() if name == "quadratic" else ALL_PATHS[name]
    g = torch.Generator().manual_seed(2)
    n, d = 9, 3
    x1 = torch.randn(n, d, generator=g, dtype=D64)
    t = _times(p, n).requires_grad_(True)
    x = (p.alpha(t.detach())[:, None] * x1
         + p.sigma(t.detach())[:, None] * torch.randn(n, d, generator=g, dtype=D64)).requires_grad_(True)
    logp = p.conditional_log_prob(x, x1, t)
    dlogp_dt, grad_logp = torch.autograd.grad(logp.sum(), (t, x))
    u = p.conditional_field(x, x1, t)
    div = sum(torch.autograd.grad(u[:, i].sum(), x, retain_graph=True)[0][:, i] for i in range(d))
    residual = dlogp_dt + div + (u * grad_logp).sum(1)
    assert residual.abs().max() < 1e-8
    # and the conditional score is the x-gradient of the conditional log-density
    assert torch.allclose(grad_logp, p.conditional_score(x.detach(), x1, t.detach()))


@pytest.mark.parametrize("name", list(ALL_PATHS))
def test_conversions_are_mutually_inverse(name):
    p = ALL_PATHS[name]
    g = torch.Generator().manual_seed(3)
    x0, x1 = torch.randn(7, 2, generator=g, dtype=D64), torch.randn(7, 2, generator=g, dtype=D64)
    t = _times(p)
    x, v = p.sample(x0, x1, t)
    # for the conditional pair, the 2x2 system recovers x0 and x1 exactly
    assert torch.allclose(p.velocity_to_noise(v, x, t), x0, atol=1e-9)
    assert torch.allclose(p.velocity_to_x1(v, x, t), x1, atol=1e-9)
    eps = p.velocity_to_noise(v, x, t)
    assert torch.allclose(p.noise_to_velocity(eps, x, t), v, atol=1e-8)
    score = p.velocity_to_score(v, x, t)
    assert torch.allclose(p.score_to_velocity(score, x, t), v, atol=1e-8)
    # an arbitrary vector: velocity -> score -> velocity and noise -> velocity -> noise
    w = torch.randn(7, 2, generator=g, dtype=D64)
    assert torch.allclose(p.score_to_velocity(p.velocity_to_score(w, x, t), x, t), w, atol=1e-8)
    assert torch.allclose(p.velocity_to_noise(p.noise_to_velocity(w, x, t), x, t), w, atol=1e-8)


@pytest.mark.parametrize("name", list(ALL_PATHS))
def test_score_from_conditional_field_is_conditional_score(name):
    p = ALL_PATHS[name]
    g = torch.Generator().manual_seed(4)
    x, x1 = torch.randn(7, 2, generator=g, dtype=D64), torch.randn(7, 2, generator=g, dtype=D64)
    t = _times(p)
    v = p.conditional_field(x, x1, t)
    assert torch.allclose(p.velocity_to_score(v, x, t), p.conditional_score(x, x1, t), atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("name", list(ALL_PATHS))
def test_autograd_derivatives_match_closed_forms(name):
    p = ALL_PATHS[name]
    t = torch.linspace(0.0, p.t_max, 21, dtype=D64)
    assert torch.allclose(AffinePath.d_alpha(p, t), p.d_alpha(t), atol=1e-10, rtol=1e-10)
    assert torch.allclose(AffinePath.d_sigma(p, t), p.d_sigma(t), atol=1e-10, rtol=1e-10)


def test_user_defined_path_from_schedule_only():
    p = Quadratic()
    t = torch.linspace(0, 1, 11, dtype=D64)
    assert torch.allclose(p.d_alpha(t), 2 * t) and torch.allclose(p.d_sigma(t), -torch.ones_like(t))
    a, s, da, ds = p.schedule(t)
    assert torch.allclose(da, 2 * t)
    x0, x1 = torch.randn(11, 2, dtype=D64), torch.randn(11, 2, dtype=D64)
    assert torch.allclose(p.target(x0, x1, t), 2 * t[:, None] * x1 - x0)
    assert math.isclose(p.source_scale, 1.0)
    assert get_path(p) is p
    # a schedule that is constant in t has zero derivative (not an autograd error)
    c = ConstantAlpha()
    assert torch.equal(c.d_alpha(t), torch.zeros_like(t))
    assert torch.allclose(c.d_sigma(t), -torch.ones_like(t))
    assert math.isclose(c.source_scale, 2.0)
    assert c.sample_source((4, 3)).shape == (4, 3)


def test_derivatives_work_under_no_grad():
    p = Quadratic()
    with torch.no_grad():
        assert torch.allclose(p.d_alpha(torch.tensor([0.5])), torch.tensor([1.0]))


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(sorted(ALL_PATHS)), batch=st.integers(1, 6),
       shape=st.lists(st.integers(1, 4), min_size=1, max_size=3),
       t_form=st.sampled_from(["scalar", "vector", "column", "0d"]), seed=st.integers(0, 2**16))
def test_shapes_and_time_forms(name, batch, shape, t_form, seed):
    p = ALL_PATHS[name]
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, *shape, generator=g)
    x1 = torch.randn(batch, *shape, generator=g)
    tv = torch.rand(batch, generator=g) * p.t_max * 0.9 + 0.05
    t = {"scalar": 0.5, "vector": tv, "column": tv[:, None], "0d": torch.tensor(0.5)}[t_form]
    xt, ut = p.sample(x0, x1, t)
    assert xt.shape == ut.shape == x1.shape
    assert p.conditional_field(xt, x1, t).shape == x1.shape
    assert p.conditional_score(xt, x1, t).shape == x1.shape
    assert p.conditional_log_prob(xt, x1, t).shape == (batch,)
    for conv in (p.velocity_to_noise, p.velocity_to_x1, p.velocity_to_score, p.noise_to_velocity,
                 p.score_to_velocity):
        assert conv(ut, xt, t).shape == x1.shape
    assert torch.allclose(p.velocity_to_noise(ut, xt, t), x0, atol=1e-3, rtol=1e-3)


@settings(max_examples=30, deadline=None)
@given(sigma_min=st.floats(0.0, 0.99), t=st.floats(0.0, 1.0))
def test_ot_sigma_min_schedule(sigma_min, t):
    p = CondOTPath(sigma_min=sigma_min)
    tt = torch.tensor([t], dtype=D64)
    assert math.isclose(float(p.sigma(tt)), 1 - (1 - sigma_min) * t, abs_tol=1e-12)
    assert float(p.sigma(tt)) >= sigma_min - 1e-12


@settings(max_examples=30, deadline=None)
@given(smin=st.floats(1e-3, 1.0), ratio=st.floats(1.5, 100.0), t=st.floats(0.0, 1.0))
def test_ve_schedule_is_geometric(smin, ratio, t):
    p = VEPath(sigma_min=smin, sigma_max=smin * ratio)
    tt = torch.tensor([t], dtype=D64)
    assert math.isclose(float(p.sigma(tt)), smin * ratio ** (1 - t), rel_tol=1e-9)


@pytest.mark.parametrize("kw", [dict(sigma_min=-0.1), dict(sigma_min=1.0), dict(sigma_min=1.5)])
def test_bad_sigma_min_ot(kw):
    with pytest.raises(ValueError, match="sigma_min"):
        CondOTPath(**kw)


def test_bad_parameters_other_paths():
    with pytest.raises(ValueError, match="sigma_min"):
        VEPath(sigma_min=0.0)
    with pytest.raises(ValueError, match="sigma_max"):
        VEPath(sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="beta_min"):
        VPPath(beta_min=-1.0)
    with pytest.raises(ValueError, match="beta_max"):
        VPPath(beta_min=1.0, beta_max=0.5)
    with pytest.raises(TypeError, match="sigma_min"):
        CondOTPath(sigma_min="0.1")
    with pytest.raises(ValueError, match="unknown path"):
        get_path("nope")
    with pytest.raises(ValueError, match="already a path object"):
        get_path(CondOTPath(), sigma_min=0.1)
    assert set(PATHS) == {"condot", "ve", "vp", "cosine"}
    assert isinstance(get_path("vp", beta_max=10.0), VPPath)


@pytest.mark.parametrize("t", [-0.1, 1.1, float("nan")])
def test_time_out_of_range(t):
    p = CondOTPath()
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="t "):
        p.sample(x, x, t)
    with pytest.raises(ValueError, match="t "):
        p.sample(x, x, torch.full((3,), t))


def test_mismatched_shapes_and_types():
    p = CondOTPath()
    with pytest.raises(ValueError, match="same shape"):
        p.sample(torch.zeros(3, 2), torch.zeros(3, 4), 0.5)
    with pytest.raises(ValueError, match="3 entries"):
        p.target(torch.zeros(4, 2), torch.zeros(4, 2), torch.rand(3))
    with pytest.raises(ValueError, match="batched"):
        p.sample_xt(torch.zeros(2), torch.zeros(2), 0.5)
    with pytest.raises(ValueError, match="same shape"):
        p.conditional_field(torch.zeros(3, 2), torch.zeros(2, 2), 0.5)
    with pytest.raises(ValueError, match="same shape"):
        p.velocity_to_score(torch.zeros(3, 2), torch.zeros(3, 3), 0.5)
    with pytest.raises(TypeError, match="x0"):
        p.sample([[0.0]], torch.zeros(1, 1), 0.5)
    with pytest.raises(TypeError, match="t must be"):
        p.sample(torch.zeros(3, 2), torch.zeros(3, 2), "0.5")
    with pytest.raises(ValueError, match="t must be a scalar"):
        p.sample(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3, 2))


@pytest.mark.parametrize("sigma_min", [0.0, 0.1])
@pytest.mark.parametrize("shape", [(64, 2), (8, 3, 4, 4)])
def test_ot_path_fused_sample_equals_the_general_formula(sigma_min, shape):
    """CondOTPath._sample (two fused operations, the training hot path) gives the x_t and u_t of the
    general affine formula alpha_t x1 + sigma_t x0, alpha'_t x1 + sigma'_t x0."""
    from cfmlib.paths import AffinePath, CondOTPath

    g = torch.Generator().manual_seed(0)
    x0, x1, t = torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.rand(shape[0], generator=g)
    path = CondOTPath(sigma_min)
    xt, ut = path._sample(x0, x1, t)
    rx, ru = AffinePath._sample(path, x0, x1, t)
    assert torch.allclose(xt, rx, atol=1e-6) and torch.allclose(ut, ru, atol=1e-6)
