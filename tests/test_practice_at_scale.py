"""Chapter 11's library pieces: time densities, prediction targets, time grids, Heun and exponential
integrators, the Fréchet distance, the autoencoder and the classifier."""
import math

import numpy as np
import pytest
import scipy.linalg
import torch

import cfmlib
from cfmlib import analytic, metrics, models, paths, solvers, timesteps

PATH_NAMES = ["condot", "vp", "cosine", "ve"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny networks: one thread is the fastest (and several threads crawl on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def mixture(dtype=torch.float64):
    return analytic.GaussianMixture(torch.tensor([[1.0, 2.0], [-2.0, 0.0], [0.5, -1.5]], dtype=dtype),
                                    torch.tensor([0.3, 0.5, 0.2], dtype=dtype))


# ------------------------------------------------------------------------------------------ timesteps
@pytest.mark.parametrize("name", ["uniform", "logit_normal", "mode"])
def test_density_is_the_law_of_the_draws(name):
    sampler = timesteps.get_time_sampler(name)
    t = torch.linspace(0, 1, 20001, dtype=torch.float64)
    dens = sampler.density(t)
    assert abs(float(torch.trapezoid(dens, t)) - 1) < 1e-4
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumulative_trapezoid(dens, t)])
    draws = sampler(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = torch.linspace(0.02, 0.98, 49, dtype=torch.float64)
    empirical = (draws[None, :] <= grid[:, None]).double().mean(1)
    model = torch.from_numpy(np.interp(grid.numpy(), t.numpy(), cdf.numpy()))
    assert float((empirical - model).abs().max()) < 0.005  # Kolmogorov distance, n = 200,000


def test_density_values_and_bad_times():
    ln, md = timesteps.logit_normal(0.5, 0.8), timesteps.mode(0.0)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    z = (math.log(0.3 / 0.7) - 0.5) / 0.8
    assert torch.allclose(ln.density(t), torch.tensor([0.0, math.exp(-z * z / 2) / (0.8 * math.sqrt(2 * math.pi) * 0.21), 0.0],
                                                      dtype=torch.float64))
    assert torch.allclose(md.density(t), torch.ones(3, dtype=torch.float64))  # s = 0 is uniform
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        ln.density(torch.tensor([1.5]))


def test_density_as_weighting_in_train():
    ln = timesteps.logit_normal()
    torch.manual_seed(0)
    res = cfmlib.train(models.MLP(dim=2, hidden=16, depth=1), torch.randn(64, 2), steps=30, batch_size=16,
                       weighting=ln.density, progress=False, device="cpu")
    assert len(res.history) == 30 and all(math.isfinite(v) for v in res.history)


# ------------------------------------------------------------------------------------------ paths
@pytest.mark.parametrize("name", PATH_NAMES)
def test_x1_to_velocity_inverts_velocity_to_x1(name):
    path = paths.get_path(name)
    g = torch.Generator().manual_seed(1)
    t = (0.05 + 0.9 * torch.rand(200, generator=g, dtype=torch.float64)) * path.t_max
    x, v = torch.randn(200, 3, generator=g, dtype=torch.float64), torch.randn(200, 3, generator=g, dtype=torch.float64)
    assert torch.allclose(path.x1_to_velocity(path.velocity_to_x1(v, x, t), x, t), v, atol=1e-9)
    x1 = torch.randn(200, 3, generator=g, dtype=torch.float64)
    assert torch.allclose(path.velocity_to_x1(path.x1_to_velocity(x1, x, t), x, t), x1, atol=1e-9)


def test_x1_to_velocity_of_the_exact_posterior_mean_is_the_marginal_field():
    q = mixture()
    for name in PATH_NAMES:
        path = paths.get_path(name)
        m = analytic.Marginal(q, path)
        g = torch.Generator().manual_seed(2)
        t = (0.1 + 0.8 * torch.rand(300, generator=g, dtype=torch.float64)) * path.t_max
        x = path.sample_xt(torch.randn(300, 2, generator=g, dtype=torch.float64), q.sample(300, generator=g), t)
        u = m.field(x, t)
        post = m.posterior(x, t)                              # (n, K); hat x1 = sum_k gamma_k hat x1_k
        a, s = path.alpha(t)[:, None, None], path.sigma(t)[:, None, None]
        mk, tau2 = q.means[None], q.stds.pow(2)[None]
        x1_k = mk + a * tau2 * (x[:, None] - a * mk) / (a**2 * tau2 + s**2)
        x1_hat = (post[..., None] * x1_k).sum(1)
        assert torch.allclose(path.x1_to_velocity(x1_hat, x, t), u, rtol=1e-8, atol=1e-8), name


def test_x1_to_velocity_needs_sigma_positive():
    with pytest.raises(ValueError, match="sigma_t = 0"):
        paths.get_path("condot").x1_to_velocity(torch.zeros(2, 2), torch.zeros(2, 2), 1.0)


@pytest.mark.parametrize("name", ["condot", "vp", "cosine", "ve"])
def test_log_snr_and_its_inverse(name):
    path = paths.get_path(name)
    t = torch.linspace(0.02, 0.98, 49, dtype=torch.float64) * path.t_max
    lam = path.log_snr(t)
    assert bool((lam[1:] > lam[:-1]).all())
    assert torch.allclose(lam, torch.log(path.alpha(t) / path.sigma(t)))
    assert torch.allclose(path.time_of_log_snr(lam), t, atol=1e-10)
    ends = path.time_of_log_snr(torch.tensor([-math.inf, math.inf]))
    assert ends.tolist() == pytest.approx([0.0, 1.0], abs=1e-12)


@pytest.mark.parametrize("target", ["x1", "x0", "velocity"])
@pytest.mark.parametrize("name", ["condot", "vp", "cosine"])
def test_prediction_loss_is_a_weighted_velocity_loss(target, name):
    pred = paths.PredictionPath(name, target)
    torch.manual_seed(0)
    net = models.MLP(dim=3, hidden=16, depth=2).double()
    g = torch.Generator().manual_seed(3)
    x1, x0 = torch.randn(128, 3, generator=g, dtype=torch.float64), torch.randn(128, 3, generator=g, dtype=torch.float64)
    t = (0.05 + 0.9 * torch.rand(128, generator=g, dtype=torch.float64)) * pred.t_max
    with torch.no_grad():
        direct = cfmlib.cfm_loss(net, x0, x1, t, path=pred)
        goal = {"x1": x1, "x0": x0, "velocity": pred.path.target(x0, x1, t)}[target]
        by_hand = (net(pred.path.sample_xt(x0, x1, t), t) - goal).pow(2).sum(1).mean()
        as_velocity = cfmlib.cfm_loss(pred.velocity(net), x0, x1, t, path=name, weight=pred.velocity_weight(t))
    assert torch.allclose(direct, by_hand, rtol=1e-12)
    assert torch.allclose(direct, as_velocity, rtol=1e-9)


def test_prediction_weights_on_condot():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.allclose(paths.PredictionPath("condot", "x1").velocity_weight(t), (1 - t) ** 2)
    assert torch.allclose(paths.PredictionPath("condot", "x0").velocity_weight(t), t**2)
    assert torch.allclose(paths.PredictionPath("condot", "velocity").velocity_weight(t), torch.ones_like(t))


def test_predicted_velocity_of_exact_predictions_is_the_marginal_field():
    q, path = mixture(), paths.get_path("cosine")
    m = analytic.Marginal(q, path)

    class ExactX0(torch.nn.Module):          # the exact noise prediction, derived from the marginal field
        config = dict(dim=2)

        def forward(self, x, t):
            return path.velocity_to_noise(m.field(x, t), x, t)

    field = paths.PredictionPath(path, "x0").velocity(ExactX0())
    g = torch.Generator().manual_seed(4)
    t = 0.1 + 0.8 * torch.rand(100, generator=g, dtype=torch.float64)
    x = torch.randn(100, 2, generator=g, dtype=torch.float64)
    assert torch.allclose(field(x, t), m.field(x, t), atol=1e-9)
    with pytest.raises(ValueError, match="alpha_t = 0"):
        field(x, torch.zeros(100, dtype=torch.float64))


def test_data_predictor_learns_a_single_point_and_samples_it():
    point = torch.tensor([[0.7, -1.2]])
    pred = paths.PredictionPath("condot", "x1")
    torch.manual_seed(0)
    res = cfmlib.train(models.MLP(dim=2, hidden=32, depth=2), point.expand(256, 2).contiguous(), path=pred,
                       steps=300, batch_size=64, lr=3e-3, progress=False, device="cpu")
    with torch.no_grad():
        out = res.ema(torch.randn(50, 2), torch.rand(50) * 0.9)
        x = solvers.odeint_grid(pred.velocity(res.ema), torch.randn(50, 2), solvers.time_grid(10), method="midpoint").x
    assert float((out - point).abs().max()) < 0.1
    assert float((x - point).abs().max()) < 0.1


def test_prediction_path_bad_input():
    with pytest.raises(ValueError, match="target"):
        paths.PredictionPath("condot", "eps")
    with pytest.raises(TypeError, match="AffinePath"):
        paths.PredictionPath(paths.ProbabilityPath(), "x1")
    with pytest.raises(TypeError, match="PredictionPath"):
        paths.PredictedVelocity(models.MLP(dim=2), paths.get_path("condot"))


# ------------------------------------------------------------------------------------------ solvers
A = torch.tensor([[-0.5, -2.0], [2.0, -0.5]], dtype=torch.float64)


def linear(x, t):
    return x @ A.T


def shrinking(x, t):
    """A field that depends on time: dx/dt = -2 t x, so x(1) = x(0) / e."""
    return -2 * t[:, None] * x


EXACT = {linear: lambda x0: x0 @ torch.linalg.matrix_exp(A).T, shrinking: lambda x0: x0 * math.exp(-1.0)}


def test_time_grids():
    for kind in solvers.GRIDS:
        for name in ("condot", "vp", "cosine"):
            path = paths.get_path(name)
            g = solvers.time_grid(8, kind, path=path)
            assert g.shape == (9,) and g.dtype == torch.float64
            assert float(g[0]) == 0.0 and float(g[-1]) == path.t_max and bool((g[1:] > g[:-1]).all())
    assert torch.equal(solvers.time_grid(4, t0=0.2, t1=0.6), torch.linspace(0.2, 0.6, 5, dtype=torch.float64))
    # interior EDM points: the noise-to-signal ratio follows Karras et al.'s rho-spacing
    g = solvers.time_grid(6, "edm", rho=7.0)
    r = (1 - g) / g
    i = torch.arange(7, dtype=torch.float64) / 6
    want = (80 ** (1 / 7) + i * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert torch.allclose(r[1:-1], want[1:-1], rtol=1e-8)
    lam = paths.get_path("vp").log_snr(solvers.time_grid(5, "logsnr", path="vp"))
    steps = lam[1:-1].diff()
    assert torch.allclose(steps, steps.mean().expand_as(steps), rtol=1e-8)


def test_time_grid_bad_input():
    with pytest.raises(ValueError, match="kind"):
        solvers.time_grid(4, "karras")
    with pytest.raises(ValueError, match="t0 < t1"):
        solvers.time_grid(4, t0=0.5, t1=0.5)
    with pytest.raises(ValueError, match="steps"):
        solvers.time_grid(0)
    with pytest.raises(ValueError, match="overlap"):
        solvers.time_grid(4, "edm", path="vp", sigma_min=1e-4, sigma_max=1e-3)   # VP ends at ratio 0.01


@pytest.mark.parametrize("method,order", [("euler", 1), ("midpoint", 2), ("heun", 2), ("rk4", 4)])
@pytest.mark.parametrize("kind", ["uniform", "edm"])
@pytest.mark.parametrize("field", [linear, shrinking], ids=["linear", "time-dependent"])
def test_odeint_grid_convergence_order(method, order, kind, field):
    x0 = torch.tensor([[1.0, 0.5], [-0.3, 2.0]], dtype=torch.float64)
    exact = EXACT[field](x0)
    steps = np.array([16, 32, 64, 128])
    errs = [float((solvers.odeint_grid(field, x0, solvers.time_grid(int(n), kind), method=method).x - exact).abs().max())
            for n in steps]
    slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
    assert abs(slope - order) < 0.3, (method, kind, slope)


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4"])
def test_odeint_grid_matches_odeint_on_even_grids(method):
    x0 = torch.randn(5, 2, dtype=torch.float64)
    a = solvers.odeint_grid(linear, x0, solvers.time_grid(7), method=method)
    b = solvers.odeint(linear, x0, 0.0, 1.0, method=method, steps=7)
    assert torch.allclose(a.x, b.x, rtol=1e-12, atol=1e-12) and a.nfe == b.nfe


def test_odeint_grid_nfe_backward_and_trajectory():
    x0 = torch.randn(4, 2, dtype=torch.float64)
    grid = solvers.time_grid(20, "edm")
    fwd = solvers.odeint_grid(linear, x0, grid, method="heun", trajectory=True)
    assert fwd.nfe == 40 and fwd.trajectory.shape == (21, 4, 2) and torch.equal(fwd.times, grid)
    end = x0 @ torch.linalg.matrix_exp(A).T
    back = solvers.odeint_grid(linear, end, solvers.time_grid(40).flip(0), method="rk4")   # backward in time
    assert torch.allclose(back.x, x0, atol=1e-5)
    with pytest.raises(ValueError, match="strictly"):
        solvers.odeint_grid(linear, x0, [0.0, 0.5, 0.5, 1.0])
    with pytest.raises(ValueError, match="method"):
        solvers.odeint_grid(linear, x0, grid, method="dopri5")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        solvers.odeint_grid(linear, x0, [0.0, 1.5])


@pytest.mark.parametrize("kind", ["uniform", "edm", "logsnr"])
def test_first_order_exponential_integrator_is_euler_on_condot(kind):
    m = analytic.Marginal(mixture(), "condot")
    x0 = torch.randn(100, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    grid = solvers.time_grid(7, kind)
    a = solvers.exponential_integrator(m, x0, "condot", grid, order=1)
    b = solvers.odeint_grid(m, x0, grid, method="euler")
    assert torch.allclose(a.x, b.x, atol=1e-12) and a.nfe == 7


@pytest.mark.parametrize("name", ["vp", "cosine", "condot", "ve"])
def test_exponential_integrator_is_exact_for_one_data_point(name):
    path = paths.get_path(name)
    point = torch.tensor([[1.5, -0.5]], dtype=torch.float64)
    m = analytic.Marginal(analytic.EmpiricalDistribution(point), path)
    noise = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    start = path.sample_xt(noise, point.expand(6, 2), 0.0)
    grid = solvers.time_grid(3, "logsnr" if name != "ve" else "uniform", path=path)
    for order in (1, 2):
        out = solvers.exponential_integrator(m, start, path, grid, order=order).x
        end = path.sample_xt(noise, point.expand(6, 2), float(grid[-1]))
        assert torch.allclose(out, end, atol=1e-10), (name, order)


@pytest.mark.parametrize("order", [1, 2])
def test_exponential_integrator_convergence_order_on_vp(order):
    path = paths.get_path("vp")
    m = analytic.Marginal(mixture(), path)
    x0 = path.sample_source((100, 2), dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    ref = solvers.odeint(m, x0, 0.0, path.t_max, method="dopri5", atol=1e-10, rtol=1e-10).x
    steps = np.array([16, 32, 64, 128])
    errs = [float((solvers.exponential_integrator(m, x0, path, solvers.time_grid(int(n), "logsnr", path=path),
                                                  order=order).x - ref).norm(dim=1).mean()) for n in steps]
    slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
    assert abs(slope - order) < 0.3, slope


def test_exponential_integrator_bad_input():
    x = torch.randn(3, 2, dtype=torch.float64)
    m = analytic.Marginal(mixture(), "vp")
    with pytest.raises(ValueError, match="order"):
        solvers.exponential_integrator(m, x, "vp", [0.0, 0.5], order=3)
    with pytest.raises(ValueError, match="increasing"):
        solvers.exponential_integrator(m, x, "vp", [0.5, 0.1])
    with pytest.raises(TypeError, match="Gaussian paths"):
        solvers.exponential_integrator(m, x, paths.ProbabilityPath(), [0.0, 0.5])
    class Pinched(paths.AffinePath):   # sigma_t = 0 at t = 0.5, inside the grid
        def alpha(self, t):
            return 0.5 + 0.5 * t

        def sigma(self, t):
            return (t - 0.5).abs() + 0.0 * t

    with pytest.raises(ValueError, match="sigma_t = 0 at t = 0.5"):
        solvers.exponential_integrator(lambda x, t: x, x, Pinched(), [0.0, 0.5, 0.9])


# ------------------------------------------------------------------------------------------ metrics
def test_frechet_distance_against_scipy_and_closed_forms():
    g = torch.Generator().manual_seed(8)
    a = torch.randn(400, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 5, generator=g, dtype=torch.float64)
    b = torch.randn(300, 5, generator=g, dtype=torch.float64) + 0.3
    ca, cb = np.cov(a.numpy().T), np.cov(b.numpy().T)
    ref = ((a.mean(0) - b.mean(0)).pow(2).sum().item()
           + np.trace(ca + cb - 2 * scipy.linalg.sqrtm(ca @ cb).real))
    assert metrics.frechet_distance(a, b) == pytest.approx(ref, rel=1e-9)
    assert metrics.frechet_distance(a, b) == pytest.approx(metrics.frechet_distance(b, a), rel=1e-9)
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    c, m = 0.4, torch.tensor([1.0, -2.0, 0.0, 0.5, 3.0], dtype=torch.float64)
    closed = ((c - 1) * a.mean(0) + m).pow(2).sum() + (1 - c) ** 2 * torch.cov(a.T).trace()
    assert metrics.frechet_distance(a, c * a + m) == pytest.approx(float(closed), rel=1e-9)


def test_frechet_distance_of_gaussian_samples_approaches_the_gaussian_w2():
    g = torch.Generator().manual_seed(9)
    sa, sb = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64), torch.tensor([1.5, 1.0, 0.5], dtype=torch.float64)
    a = torch.randn(100_000, 3, generator=g, dtype=torch.float64) * sa
    b = torch.randn(100_000, 3, generator=g, dtype=torch.float64) * sb + 1.0
    exact = 3.0 + float((sa - sb).pow(2).sum())
    assert metrics.frechet_distance(a, b) == pytest.approx(exact, rel=0.01)


def test_frechet_distance_features_band_and_errors():
    g = torch.Generator().manual_seed(10)
    x = torch.randn(2000, 4, generator=g)
    lift = torch.nn.Linear(4, 3)
    with torch.no_grad():
        direct = metrics.frechet_distance(lift(x[:500]), lift(x[500:1000]))
    assert metrics.frechet_distance(x[:500], x[500:1000], features=lift) == pytest.approx(direct, rel=1e-9)
    small = metrics.data_band(x, 100, metric="frechet", repeats=10, generator=torch.Generator().manual_seed(1))
    large = metrics.data_band(x, 800, metric="frechet", repeats=10, generator=torch.Generator().manual_seed(1))
    assert small.metric == "frechet" and large.mean < 0.5 * small.mean and min(small.values) > 0
    with pytest.raises(ValueError, match="two samples"):
        metrics.frechet_distance(x[:1], x[:5])
    with pytest.raises(ValueError, match="same dimension"):
        metrics.frechet_distance(x[:5], x[:5, :2])
    with pytest.raises(TypeError, match="features"):
        metrics.frechet_distance(x[:5], x[:5], features=3)


# ------------------------------------------------------------------------------------------ models
def test_autoencoder_shapes_scale_and_rebuild():
    torch.manual_seed(0)
    ae = models.Autoencoder((1, 4, 4), latent=3, hidden=16)
    x = torch.randn(50, 1, 4, 4) * 2 + 1
    assert ae.encode(x).shape == (50, 3) and ae.decode(ae.encode(x)).shape == (50, 1, 4, 4) and ae(x).shape == x.shape
    ae.fit_latent_scale(x)
    z = ae.encode(x)
    assert torch.allclose(z.mean(0), torch.zeros(3), atol=1e-5) and torch.allclose(z.std(0), torch.ones(3), atol=1e-5)
    twin = models.build_model(ae.config)
    twin.load_state_dict(ae.state_dict())
    assert torch.allclose(twin(x), ae(x)) and torch.allclose(twin.encode(x), z)
    with pytest.raises(ValueError, match="shape"):
        ae.encode(torch.randn(5, 16))
    with pytest.raises(ValueError, match="z must have shape"):
        ae.decode(torch.randn(5, 4))
    with pytest.raises(ValueError, match="data_shape"):
        models.Autoencoder((1, 0, 4))


def test_classifier_shapes_and_rebuild():
    torch.manual_seed(0)
    clf = models.Classifier((1, 8, 8), num_classes=10, hidden=32, features=12)
    x = torch.randn(7, 1, 8, 8)
    assert clf.features(x).shape == (7, 12) and clf(x).shape == (7, 10)
    assert sum(p.numel() for p in clf.parameters()) == 64 * 32 + 32 + 32 * 12 + 12 + 12 * 10 + 10
    twin = models.build_model(clf.config)
    twin.load_state_dict(clf.state_dict())
    assert torch.allclose(twin(x), clf(x))
    with pytest.raises(ValueError, match="shape"):
        clf(torch.randn(7, 64))


def test_autoencoder_learns_a_low_dimensional_set():
    g = torch.Generator().manual_seed(11)
    codes = torch.randn(512, 2, generator=g)
    x = (codes @ torch.randn(2, 16, generator=g)).reshape(512, 1, 4, 4)   # data on a 2-dimensional plane
    torch.manual_seed(0)
    ae = models.Autoencoder((1, 4, 4), latent=2, hidden=32, depth=1)
    opt = torch.optim.Adam(ae.parameters(), lr=3e-3)
    for _ in range(600):
        opt.zero_grad()
        loss = (ae(x) - x).pow(2).mean()
        loss.backward()
        opt.step()
    assert loss.item() < 0.02 * x.pow(2).mean().item()
