"""The scheduler change between affine Gaussian paths (chapter 6): paths.scheduler_change maps times of one
path onto another with the same signal-to-noise ratio, with a scale, and the marginal densities, fields and
trajectories of the two paths correspond through that map."""
import math

import pytest
import torch

from cfmlib import analytic, datasets, solvers
from cfmlib.paths import AffinePath, CondOTPath, CosinePath, ProbabilityPath, VEPath, VPPath, scheduler_change

D64 = torch.float64

# (path, other, times of `path` whose signal-to-noise ratio `other` reaches)
PAIRS = {
    "condot->cosine": (CondOTPath(), CosinePath(), (0.0, 1.0)),  # both ends: ratio 0 and infinity
    "cosine->condot": (CosinePath(), CondOTPath(), (0.0, 0.999)),
    "vp->cosine": (VPPath(), CosinePath(), (0.0, 0.99)),
    "cosine->vp": (CosinePath(), VPPath(), (0.01, 0.99)),
    "ve->condot": (VEPath(sigma_min=0.01, sigma_max=10.0), CondOTPath(), (0.0, 1.0)),
    "condot-smin->vp": (CondOTPath(sigma_min=0.05), VPPath(), (0.02, 1.0)),
}


def _times(lo, hi, n=41):
    return torch.linspace(lo, hi, n, dtype=D64)


@pytest.mark.parametrize("name", list(PAIRS))
def test_same_signal_to_noise_ratio_and_scale(name):
    path, other, (lo, hi) = PAIRS[name]
    t = _times(lo, hi)
    c = scheduler_change(path, other, t)
    a, s = path.alpha(t), path.sigma(t)
    ab, sb = other.alpha(c.r), other.sigma(c.r)
    assert bool(((c.r >= 0) & (c.r <= 1)).all())
    assert torch.allclose(a, c.s * ab, atol=1e-12) and torch.allclose(s, c.s * sb, atol=1e-12)
    # x_t = s x_bar_r for every pair (x0, x1)
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(t.shape[0], 3, generator=g, dtype=D64), torch.randn(t.shape[0], 3, generator=g, dtype=D64)
    assert torch.allclose(path.sample_xt(x0, x1, t), c.s[:, None] * other.sample_xt(x0, x1, c.r), atol=1e-12)


def test_ends_where_a_schedule_vanishes_only_up_to_rounding():
    # cos(pi/2) = 6e-17, not 0: the CondOT path's infinite ratio at t = 1 must still map to r = 1
    c = scheduler_change("condot", "cosine", torch.tensor([0.0, 1.0], dtype=D64))
    assert c.r.tolist() == pytest.approx([0.0, 1.0], abs=1e-15) and c.s.tolist() == pytest.approx([1.0, 1.0])


def test_closed_form_condot_to_cosine():
    # t / (1 - t) = tan(pi r / 2)  =>  r = (2 / pi) atan(t / (1 - t)),  s = (1 - t) / cos(pi r / 2)
    t = _times(0.0, 0.99)
    c = scheduler_change("condot", "cosine", t)
    r = 2 / math.pi * torch.atan(t / (1 - t))
    assert torch.allclose(c.r, r, atol=1e-13)
    assert torch.allclose(c.s, (1 - t) / torch.cos(0.5 * math.pi * r), atol=1e-12)


def test_variance_preserving_paths_differ_by_time_alone():
    # alpha^2 + sigma^2 = 1 for both: the scale is one, and the time map is the identity for a path with itself
    t = _times(0.01, 0.99)
    c = scheduler_change("cosine", "vp", t)
    assert torch.allclose(c.s, torch.ones_like(t), atol=1e-12) and torch.allclose(c.ds, torch.zeros_like(t), atol=1e-9)
    same = scheduler_change("cosine", "cosine", t)
    assert torch.allclose(same.r, t, atol=1e-13) and torch.allclose(same.dr, torch.ones_like(t), atol=1e-9)


@pytest.mark.parametrize("name", list(PAIRS))
def test_derivatives_are_those_of_the_map(name):
    path, other, (lo, hi) = PAIRS[name]
    h = 1e-6
    t = _times(lo + 2 * h, hi - 2 * h, 17)
    c, cp, cm = (scheduler_change(path, other, t + e) for e in (0.0, h, -h))
    assert torch.allclose(c.dr, (cp.r - cm.r) / (2 * h), rtol=1e-6, atol=1e-7)
    assert torch.allclose(c.ds, (cp.s - cm.s) / (2 * h), rtol=1e-6, atol=1e-7)


def test_round_trip():
    t = _times(0.0, 0.99)
    there = scheduler_change("condot", "cosine", t)
    back = scheduler_change("cosine", "condot", there.r)
    assert torch.allclose(back.r, t, atol=1e-12) and torch.allclose(back.s * there.s, torch.ones_like(t), atol=1e-12)


@pytest.mark.parametrize("name", ["condot->cosine", "vp->cosine", "ve->condot"])
def test_marginal_density_and_field_of_a_mixture(name):
    # p_t(x) = s^-d p_bar_r(x / s) and u_t(x) = (ds / s) x + s dr u_bar_r(x / s), with the exact mixture marginals
    path, other, (lo, hi) = PAIRS[name]
    q = datasets.eight_gaussians().to(dtype=D64)
    mp, mo = analytic.Marginal(q, path), analytic.Marginal(q, other)
    g = torch.Generator().manual_seed(1)
    t = lo + (min(hi, 0.98) - lo) * torch.rand(200, generator=g, dtype=D64)
    x = 3 * torch.randn(200, 2, generator=g, dtype=D64)
    c = scheduler_change(path, other, t)
    y = x / c.s[:, None]
    assert torch.allclose(mp.log_prob(x, t), mo.log_prob(y, c.r) - 2 * torch.log(c.s), atol=1e-10)
    field = (c.ds / c.s)[:, None] * x + (c.s * c.dr)[:, None] * mo.field(y, c.r)
    assert torch.allclose(mp.field(x, t), field, atol=1e-10)


@pytest.fixture
def one_thread():
    """Tiny 2D solves run fastest (and do not stall on a busy machine) on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_trajectories_map_onto_each_other(one_thread):
    # integrate the exact marginal field of the cosine path; x(t) / s_t must be a trajectory of CondOT at r_t
    q = datasets.eight_gaussians().to(dtype=D64)
    cos, ot = CosinePath(), CondOTPath()
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(2), dtype=D64)
    ts = [0.0, 0.3, 0.6, 0.9]
    c = scheduler_change(cos, ot, torch.tensor(ts, dtype=D64))
    xs, ys = [x], [x / c.s[0]]
    for k in range(1, len(ts)):
        xs.append(solvers.odeint(analytic.Marginal(q, cos), xs[-1], ts[k - 1], ts[k], method="rk4", steps=100).x)
        ys.append(solvers.odeint(analytic.Marginal(q, ot), ys[-1], float(c.r[k - 1]), float(c.r[k]),
                                 method="rk4", steps=100).x)
    for k in range(len(ts)):
        assert torch.allclose(xs[k], c.s[k] * ys[k], atol=1e-7), ts[k]
    # the same particles at the same clock time are elsewhere: the naive map (r = t, s = 1) is wrong
    assert float((xs[2] - solvers.odeint(analytic.Marginal(q, ot), x, 0.0, 0.6, method="rk4", steps=100).x)
                 .abs().max()) > 0.1


def test_dtype_and_shape_follow_t():
    c = scheduler_change("condot", "cosine", 0.5)
    assert c.r.shape == () and c.r.dtype == torch.get_default_dtype()
    c = scheduler_change("condot", "cosine", torch.full((4, 1), 0.5, dtype=D64))
    assert c.r.shape == (4,) and c.s.dtype == D64  # (batch, 1) times give (batch,) results


def test_bad_input():
    with pytest.raises(ValueError, match="outside the range"):
        scheduler_change("condot", "ve", 0.0)  # the VE path never reaches signal-to-noise ratio 0
    with pytest.raises(ValueError, match="outside the range"):
        scheduler_change("cosine", VEPath(sigma_min=0.01), torch.tensor([0.5, 1.0]))  # nor ratio infinity
    with pytest.raises(ValueError, match=r"t must lie in \[0.0, 1.0\]"):
        scheduler_change("condot", "cosine", 1.5)
    with pytest.raises(TypeError, match="t must be a number or a tensor"):
        scheduler_change("condot", "cosine", "0.5")
    with pytest.raises(ValueError, match="unknown path .straight."):
        scheduler_change("straight", "cosine", 0.5)
    with pytest.raises(ValueError, match="iters"):
        scheduler_change("condot", "cosine", 0.5, iters=0)

    class NotGaussian(ProbabilityPath):
        pass

    with pytest.raises(TypeError, match="other must be an AffinePath"):
        scheduler_change("condot", NotGaussian(), 0.5)


def test_user_path_with_autograd_derivatives():
    class Quadratic(AffinePath):
        def alpha(self, t):
            return t**2

        def sigma(self, t):
            return 1.0 - t

    t = _times(0.05, 0.95, 9)
    c = scheduler_change(Quadratic(), CondOTPath(), t)
    # t^2 / (1 - t) = r / (1 - r)  =>  r = t^2 / (1 - t + t^2),  s = 1 - t + t^2
    assert torch.allclose(c.r, t**2 / (1 - t + t**2), atol=1e-13)
    assert torch.allclose(c.s, 1 - t + t**2, atol=1e-12) and torch.allclose(c.ds, 2 * t - 1, atol=1e-9)
