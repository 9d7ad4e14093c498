"""The SDE sampler (chapter 10): on Gaussian data, where the marginal field is closed form, every
diffusion coefficient g reaches the target moments; g = 0 is Euler on the ODE; argument checks."""
import math

import pytest
import torch

from cfmlib.analytic import GaussianMixture, Marginal
from cfmlib.paths import CondOTPath, CosinePath, VEPath, VPPath
from cfmlib.solvers import odeint, sdeint

MEAN = torch.tensor([1.5, -0.5], dtype=torch.float64)
STD = torch.tensor([0.5, 0.8], dtype=torch.float64)
Q = GaussianMixture(MEAN[None], STD[None])


@pytest.fixture(autouse=True)
def one_thread():
    """These small problems run fastest on one thread (and do not oversubscribe a shared CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("path", [CondOTPath(), CosinePath(), VPPath(), VEPath(sigma_min=0.01, sigma_max=4.0)],
                         ids=["condot", "cosine", "vp", "ve"])
@pytest.mark.parametrize("g", [0.5, 1.5, "sigma"])
def test_sde_reaches_target_moments(path, g):
    field = Marginal(Q, path)
    gen = torch.Generator().manual_seed(0)
    n = 10000
    # start from the exact p_0 (for VE it is N(m, std^2 + sigma_max^2), not quite the source N(0, sigma_max^2))
    t0 = torch.zeros(1, dtype=torch.float64)
    a0, s0 = path.alpha(t0), path.sigma(t0)
    x0 = a0 * MEAN + torch.sqrt(a0**2 * STD**2 + s0**2) * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    g_arg = (lambda t: 2.0 * float(path.sigma(t.reshape(1)))) if g == "sigma" else g
    sol = sdeint(field, x0, path, steps=200, g=g_arg, generator=gen)
    assert sol.nfe == 200
    x = sol.x
    tol = 4 * float(STD.max()) / math.sqrt(n) + 0.02  # sampling noise + discretisation
    assert (x.mean(0) - MEAN).abs().max() < tol
    assert (x.std(0) - STD).abs().max() < 0.03


def test_g_zero_is_euler_on_the_ode():
    path = CondOTPath()
    field = Marginal(Q, path)
    x0 = torch.randn(100, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    a = sdeint(field, x0, path, steps=50, g=0.0)
    b = odeint(field, x0, 0.0, 1.0, method="euler", steps=50)
    assert torch.allclose(a.x, b.x) and a.nfe == b.nfe == 50


def test_noise_is_seeded_and_trajectory_shape():
    path = CosinePath()
    field = Marginal(Q, path)
    x0 = torch.randn(10, 2, dtype=torch.float64)
    a = sdeint(field, x0, path, steps=20, generator=torch.Generator().manual_seed(3), trajectory=True)
    b = sdeint(field, x0, path, steps=20, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.x, b.x)
    assert a.trajectory.shape == (21, 10, 2) and a.times.shape == (21,)
    assert torch.isfinite(a.trajectory).all()


def test_large_g_stays_finite_near_data_end():
    """The cap g_eff = min(g, sigma_t / sqrt(h)) keeps the step stable where sigma_t -> 0."""
    path = CondOTPath()
    field = Marginal(Q, path)
    x0 = torch.randn(2000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    x = sdeint(field, x0, path, steps=100, g=20.0, generator=torch.Generator().manual_seed(5)).x
    assert torch.isfinite(x).all()
    assert (x.mean(0) - MEAN).abs().max() < 0.1


def test_argument_checks():
    path = CondOTPath()
    field = Marginal(Q, path)
    x = torch.zeros(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="g must lie"):
        sdeint(field, x, path, g=-1.0)
    with pytest.raises(ValueError, match="t0 < t1"):
        sdeint(field, x, path, t0=0.5, t1=0.5)
    with pytest.raises(ValueError, match="steps"):
        sdeint(field, x, path, steps=0)
    with pytest.raises(TypeError, match="callable"):
        sdeint(None, x, path)
    with pytest.raises(ValueError, match="batched"):
        sdeint(field, torch.zeros(2), path)
    with pytest.raises(ValueError, match="unknown path"):
        sdeint(field, x, "nope")
    with pytest.raises(ValueError, match="non-negative"):
        sdeint(field, x, path, g=lambda t: -1.0, steps=2)
