"""Manifolds (chapter 13): exp and log, geodesics and their velocities, the Riemannian divergence and
log-densities against closed forms, solvers that stay on the manifold (and their orders), the
geodesic path with the training loop, the tangent-space model, the data distributions, the geodesic
W2, and argument checks."""
import itertools
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import cfmlib
from cfmlib import likelihood, manifolds, metrics, models, solvers, training
from cfmlib.manifolds import (FlatTorus, GeodesicPath, Sphere, TangentMLP, VonMisesFisherMixture,
                              WrappedNormalMixture, get_manifold)

D64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny networks: one thread is the fastest (and several threads crawl on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

MANIFOLDS = {"S2": Sphere(2), "S3": Sphere(3), "T2": FlatTorus(2), "T3": FlatTorus(3)}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _tangent(m, x, g, max_norm):
    """Random tangent vectors at x with norms uniform in [0, max_norm)."""
    u = m.proj_tangent(x, torch.randn(x.shape, generator=g, dtype=D64))
    return u / u.norm(dim=1, keepdim=True) * max_norm * torch.rand(x.shape[0], 1, generator=g, dtype=D64)


# --- exp, log, distance ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(MANIFOLDS))
def test_exp_and_log_invert_each_other_away_from_the_cut_locus(name):
    m, g = MANIFOLDS[name], _gen(0)
    x, y = m.uniform(2000, generator=g, dtype=D64), m.uniform(2000, generator=g, dtype=D64)
    xx = m.uniform(2000, generator=g, dtype=D64)
    if isinstance(m, Sphere):
        keep = m.dist(x, y) < math.pi - 1e-3  # the antipode is the cut locus
        u = _tangent(m, xx, g, math.pi - 1e-3)  # injectivity radius pi
    else:
        keep = (m.log(x, y).abs() < math.pi - 1e-3).all(1)
        u = (torch.rand(x.shape, generator=g, dtype=D64) * 2 - 1) * (math.pi - 1e-3)
    x, y = x[keep], y[keep]
    assert float(m.dist(m.exp(x, m.log(x, y)), y).max()) < 1e-12
    assert float((m.log(xx, m.exp(xx, u)) - u).norm(dim=1).max()) < 1e-12
    # exp lands on the manifold, log lands in the tangent space, |log_x y| = d(x, y)
    assert float(m.off_manifold(m.exp(xx, u)).max()) < 1e-14
    v = m.log(x, y)
    assert float((m.proj_tangent(x, v) - v).abs().max()) < 1e-14
    assert float((v.norm(dim=1) - m.dist(x, y)).abs().max()) < 1e-12


def test_log_takes_the_short_way_beyond_the_injectivity_radius():
    s, g = Sphere(2), _gen(1)
    x = s.uniform(500, generator=g, dtype=D64)
    u = _tangent(s, x, g, 1.0)
    u = u / u.norm(dim=1, keepdim=True) * 4.0  # |u| = 4 > pi: exp_x(u) is 2 pi - 4 away the other way
    back = s.log(x, s.exp(x, u))
    assert float((back.norm(dim=1) - (2 * math.pi - 4.0)).abs().max()) < 1e-10
    assert float((back / back.norm(dim=1, keepdim=True) + u / 4.0).norm(dim=1).max()) < 1e-10
    t = FlatTorus(1)
    a = torch.tensor([[3.0]], dtype=D64)
    assert float(t.log(a, t.exp(a, torch.tensor([[4.0]], dtype=D64)))) == pytest.approx(4.0 - 2 * math.pi)


@pytest.mark.parametrize("name", list(MANIFOLDS))
def test_distance_is_a_metric(name):
    m, g = MANIFOLDS[name], _gen(2)
    x, y, z = (m.uniform(500, generator=g, dtype=D64) for _ in range(3))
    assert float((m.dist(x, y) - m.dist(y, x)).abs().max()) < 1e-12
    assert float(m.dist(x, x).max()) < 1e-7
    assert bool((m.dist(x, z) <= m.dist(x, y) + m.dist(y, z) + 1e-12).all())
    if isinstance(m, Sphere):
        assert float((m.dist(x, y) - torch.arccos((x * y).sum(1).clamp(-1, 1))).abs().max()) < 1e-7
    pw = m.pairwise_dist(x[:7], y[:5])
    assert pw.shape == (7, 5) and float((pw[3, 2] - m.dist(x[3:4], y[2:3])).abs()) < 1e-14


def test_torus_distance_sees_across_the_seam():
    t = FlatTorus(2)
    a = torch.tensor([[math.pi - 0.01, 0.0]], dtype=D64)
    b = torch.tensor([[-math.pi + 0.01, 0.0]], dtype=D64)
    assert float(t.dist(a, b)) == pytest.approx(0.02, abs=1e-12)
    assert float(t.log(a, b)[0, 0]) == pytest.approx(0.02, abs=1e-12)  # forward, through the seam


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-50, 50), min_size=2, max_size=2))
def test_torus_projection_is_canonical_and_idempotent(vals):
    t = FlatTorus(2)
    x = torch.tensor([vals], dtype=D64)
    p = t.proj(x)
    assert float(t.off_manifold(p).max()) == 0.0
    assert torch.allclose(t.proj(p), p, atol=1e-12)
    # the same point: every coordinate differs by a multiple of 2 pi
    k = (x - p) / (2 * math.pi)
    assert torch.allclose(k, k.round(), atol=1e-9)


@pytest.mark.parametrize("name", ["S2", "S3", "T2"])
def test_uniform_is_uniform(name):
    m, g = MANIFOLDS[name], _gen(3)
    n = 40_000
    x = m.uniform(n, generator=g, dtype=D64)
    assert float(m.off_manifold(x).max()) < 1e-14
    if isinstance(m, Sphere):
        c = m.coord_dim
        se = 1 / math.sqrt(n)
        assert float(x.mean(0).abs().max()) < 5 * se
        second = (x.T @ x) / n
        assert float((second - torch.eye(c, dtype=D64) / c).abs().max()) < 5 * se
        assert m.log_volume == pytest.approx({2: math.log(4 * math.pi), 3: math.log(2 * math.pi**2)}[m.dim])
    else:
        assert float(x.min()) >= -math.pi and float(x.max()) < math.pi
        hist = torch.histc(x[:, 0], bins=8, min=-math.pi, max=math.pi) / n
        assert float((hist - 1 / 8).abs().max()) < 5 * math.sqrt(1 / 8 / n)


# --- geodesics -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(MANIFOLDS))
def test_geodesic_ends_velocity_and_speed(name):
    m, g = MANIFOLDS[name], _gen(4)
    x0, x1 = m.uniform(1000, generator=g, dtype=D64), m.uniform(1000, generator=g, dtype=D64)
    t = 0.05 + 0.9 * torch.rand(1000, generator=g, dtype=D64)
    xa, _ = m.geodesic(x0, x1, 0.0)
    xb, _ = m.geodesic(x0, x1, 1.0)
    assert float(m.dist(xa, x0).max()) < 1e-7 and float(m.dist(xb, x1).max()) < 1e-7
    xt, ut = m.geodesic(x0, x1, t)
    assert float(m.off_manifold(xt).max()) < 1e-14
    h = 1e-5
    # central difference in the tangent space at x_t (log also crosses the torus' seams correctly)
    fd = (m.log(xt, m.geodesic(x0, x1, t + h)[0]) - m.log(xt, m.geodesic(x0, x1, t - h)[0])) / (2 * h)
    assert float((fd - ut).norm(dim=1).max()) < 1e-7
    # u_t = log_{x_t}(x_1) / (1 - t) and constant speed d(x0, x1)
    assert float((ut - m.log(xt, x1) / (1 - t)[:, None]).norm(dim=1).max()) < 1e-9
    assert float((ut.norm(dim=1) - m.dist(x0, x1)).abs().max()) < 1e-9
    assert float((m.proj_tangent(xt, ut) - ut).abs().max()) < 1e-12
    path = GeodesicPath(m)
    assert torch.allclose(path.conditional_field(xt, x1, t), ut, atol=1e-9)


def test_geodesic_velocity_is_finite_at_both_ends_and_for_equal_points():
    s = Sphere(2)
    x = s.uniform(10, generator=_gen(5), dtype=D64)
    for t in (0.0, 1.0):
        xt, ut = s.geodesic(x, x, t)
        assert float(ut.abs().max()) < 1e-7 and torch.allclose(xt, x, atol=1e-12)
    y = s.uniform(10, generator=_gen(6), dtype=D64)
    x.requires_grad_(True)
    xt, ut = s.geodesic(x, x.detach().clone(), 0.5)
    (xt.sum() + ut.sum()).backward()
    assert bool(torch.isfinite(x.grad).all())
    _, u1 = s.geodesic(x.detach(), y, 1.0)
    assert bool(torch.isfinite(u1).all())


# --- divergence and log-densities ------------------------------------------------------------------

def test_sphere_divergence_against_closed_forms():
    g = _gen(7)
    for d in (2, 3):
        s = Sphere(d)
        x = s.uniform(500, generator=g, dtype=D64)
        a = torch.randn(d + 1, generator=g, dtype=D64)
        grad_field = lambda x, t: a.expand_as(x).clone()  # noqa: E731  (projected: the gradient of a.x)
        # a.x is a spherical harmonic of degree 1: its Laplacian is -d a.x
        div = manifolds.divergence(grad_field, x, 0.3, s)
        assert float((div + d * (x @ a)).abs().max()) < 1e-12
    s = Sphere(2)
    x = s.uniform(500, generator=g, dtype=D64)
    w = torch.tensor([0.3, -1.0, 2.0], dtype=D64)
    rot = lambda x, t: torch.linalg.cross(w.expand_as(x), x, dim=1)  # noqa: E731
    assert float(manifolds.divergence(rot, x, 0.0, s).abs().max()) < 1e-12
    # the ambient trace of the same projected field is wrong by the normal term: -4 a.x instead of -2 a.x
    proj = lambda x, t: a[:3] - (x @ a[:3])[:, None] * x  # noqa: E731
    naive = likelihood.divergence(proj, x, 0.3)
    assert float((naive + 4 * (x @ a[:3])).abs().max()) < 1e-12


def test_torus_divergence_is_the_flat_one():
    t, g = FlatTorus(2), _gen(8)
    x = t.uniform(300, generator=g, dtype=D64)
    f = lambda x, s: torch.stack([torch.sin(x[:, 0]), torch.cos(x[:, 1])], 1)  # noqa: E731
    div = manifolds.divergence(f, x, 0.5, t)
    assert float((div - (torch.cos(x[:, 0]) - torch.sin(x[:, 1]))).abs().max()) < 1e-12


def _sphere_flow_log_density(x, a, T=1.0):
    """Closed-form density at time T of the flow of u = P_x a (|a| = 1) from the uniform distribution:
    tan(theta/2) shrinks like e^{-T}, so p_T(x) = A / (pi ((1 + A) + (1 - A) a.x)^2) with A = e^{2T}."""
    A = math.exp(2 * T)
    return math.log(4 * A) - 2 * torch.log((1 + A) + (1 - A) * (x @ a)) - math.log(4 * math.pi)


def test_log_prob_on_the_sphere_matches_a_closed_form_and_converges_at_order_four():
    s, g = Sphere(2), _gen(9)
    a = torch.tensor([0.0, 0.6, 0.8], dtype=D64)
    field = lambda x, t: a.expand_as(x).clone()  # noqa: E731
    x = s.uniform(400, generator=g, dtype=D64)
    truth = _sphere_flow_log_density(x, a)
    errs = [float((manifolds.log_prob(field, x, s, steps=k).log_prob - truth).abs().max()) for k in (10, 20)]
    assert errs[1] < 2e-7
    assert 3.5 < math.log2(errs[0] / errs[1]) < 4.5
    # the density integrates to one: E_uniform[p / p_uniform] = 1
    assert float(torch.exp(truth + math.log(4 * math.pi)).mean()) == pytest.approx(1.0, abs=0.1)


def test_log_prob_on_the_torus_matches_a_closed_form():
    t, g = FlatTorus(2), _gen(10)
    field = lambda x, s: torch.stack([-torch.sin(x[:, 0]), torch.zeros_like(x[:, 0])], 1)  # noqa: E731
    x = t.uniform(400, generator=g, dtype=D64)
    # theta' = -sin(theta): tan(theta/2) shrinks like e^{-1}; p = e / (cos^2(x/2) + e^2 sin^2(x/2)) / (2 pi)^2
    truth = 1.0 - torch.log(torch.cos(x[:, 0] / 2) ** 2 + math.exp(2) * torch.sin(x[:, 0] / 2) ** 2) \
        - 2 * math.log(2 * math.pi)
    res = manifolds.log_prob(field, x, t, steps=40)
    assert float((res.log_prob - truth).abs().max()) < 1e-7 and res.nfe == 160
    assert float(t.off_manifold(res.x0).max()) == 0.0


# --- solvers ---------------------------------------------------------------------------------------

def _polar_error(s, x0, x1, a):
    """Error in the polar angle from a of the exact flow of u = P_x a at t = 1."""
    th0 = torch.atan2(s.proj_tangent(x0, a.expand_as(x0)).norm(dim=1), x0 @ a)
    th1 = 2 * torch.atan(math.exp(-1) * torch.tan(th0 / 2))
    got = torch.atan2(s.proj_tangent(x1, a.expand_as(x1)).norm(dim=1), x1 @ a)
    return float((got - th1).abs().max())


@pytest.mark.parametrize("method,retraction,order", [("euler", "project", 1), ("euler", "exp", 1),
                                                      ("midpoint", "project", 2), ("rk4", "project", 4)])
def test_solvers_stay_on_the_sphere_and_have_their_order(method, retraction, order):
    s = Sphere(2)
    a = torch.tensor([0.0, 0.0, 1.0], dtype=D64)
    field = lambda x, t: a.expand_as(x).clone()  # noqa: E731
    x0 = s.uniform(1000, generator=_gen(11), dtype=D64)
    errs = []
    for k in (16, 32):
        sol = manifolds.odeint(field, x0, s, method=method, steps=k, retraction=retraction)
        assert float(s.off_manifold(sol.x).max()) < 1e-14
        assert sol.nfe == k * {"euler": 1, "midpoint": 2, "rk4": 4}[method]
        errs.append(_polar_error(s, x0, sol.x, a))
    assert order - 0.2 < math.log2(errs[0] / errs[1]) < order + 0.2


def test_plain_euler_leaves_the_sphere():
    s = Sphere(2)
    a = torch.tensor([0.0, 0.0, 1.0], dtype=D64)
    field = lambda x, t: a - (x @ a)[:, None] * x  # noqa: E731
    x0 = s.uniform(1000, generator=_gen(12), dtype=D64)
    flat = solvers.odeint(field, x0, method="euler", steps=20).x
    assert float(s.off_manifold(flat).max()) > 1e-2
    on = manifolds.odeint(field, x0, s, method="euler", steps=20).x
    assert float(s.off_manifold(on).max()) < 1e-14


def test_odeint_backward_and_trajectory():
    s = Sphere(2)
    w = torch.tensor([0.0, 0.0, 1.0], dtype=D64)
    rot = lambda x, t: torch.linalg.cross(w.expand_as(x), x, dim=1)  # noqa: E731
    x0 = s.uniform(50, generator=_gen(13), dtype=D64)
    fwd = manifolds.odeint(rot, x0, s, 0.0, 1.0, method="rk4", steps=20, trajectory=True)
    assert fwd.trajectory.shape == (21, 50, 3) and float(fwd.times[-1]) == 1.0
    # a rotation by one radian about the z axis
    c, sn = math.cos(1.0), math.sin(1.0)
    R = torch.tensor([[c, -sn, 0], [sn, c, 0], [0, 0, 1]], dtype=D64)
    assert float((fwd.x - x0 @ R.T).abs().max()) < 1e-7
    back = manifolds.odeint(rot, fwd.x, s, 1.0, 0.0, method="rk4", steps=20)
    assert float((back.x - x0).abs().max()) < 1e-7


# --- the path, the loss and the training loop ------------------------------------------------------

def test_loss_is_the_riemannian_cfm_loss():
    s, g = Sphere(2), _gen(14)
    path = GeodesicPath("sphere")
    torch.manual_seed(0)
    net = TangentMLP("sphere", hidden=16, depth=2).double()
    x1, x0 = s.uniform(64, generator=g, dtype=D64), s.uniform(64, generator=g, dtype=D64)
    t = torch.rand(64, generator=g, dtype=D64)
    w = torch.rand(64, generator=g, dtype=D64)
    xt, ut = path.sample(x0, x1, t)
    v = net(xt, t)
    by_hand = (w * (v - (v * xt).sum(1, keepdim=True) * xt - ut).pow(2).sum(1)).mean()
    assert torch.allclose(training.cfm_loss(net, x0, x1, t, path=path, weight=w), by_hand, atol=1e-12)
    # a model whose output is not tangent is projected first: adding a normal component changes nothing
    normal = lambda x, t: net(x, t) + 5.0 * x  # noqa: E731
    assert torch.allclose(path.loss(normal, x0, x1, t), path.loss(net, x0, x1, t), atol=1e-12)


@pytest.mark.parametrize("name", ["sphere", "torus"])
def test_train_uses_the_geodesic_path(name):
    m = get_manifold(name)
    q = VonMisesFisherMixture([[0, 0, 1.0], [1.0, 0, 0]], [30.0, 30.0]) if name == "sphere" else \
        WrappedNormalMixture([[3.0, 3.0], [-1.0, 0.5]], torch.eye(2).repeat(2, 1, 1) * 0.05)
    path = GeodesicPath(name)
    torch.manual_seed(0)
    net = TangentMLP(name, hidden=32, depth=2)
    # the first recorded loss is the loss of the first batch, drawn as the loop draws it
    g = torch.Generator().manual_seed(0)
    x1 = q(128, generator=g)
    x0 = path.draw_x0(x1, g)
    t = torch.rand(128, generator=g)
    with torch.no_grad():
        first = float(training.cfm_loss(net, x0, x1, t, path=path))
    res = cfmlib.train(net, q, path=path, steps=400, batch_size=128, lr=3e-3, seed=0, progress=False,
                       device="cpu")
    assert res.history[0] == pytest.approx(first, rel=1e-5)
    assert sum(res.history[-50:]) < 0.85 * sum(res.history[:50])  # the loss fell (its floor is far from 0)
    out = manifolds.sample(res.ema, 500, steps=20, method="midpoint", generator=torch.Generator().manual_seed(1))
    assert float(m.off_manifold(out.x).max()) < 1e-5
    # the samples went where the data are: closer (geodesic W2) than uniform points are
    data = q(500, generator=torch.Generator().manual_seed(2))
    uni = m.uniform(500, generator=torch.Generator().manual_seed(3))
    assert metrics.geodesic_w2(out.x, data, m) < 0.5 * metrics.geodesic_w2(uni, data, m)


def test_tangent_mlp_is_tangent_periodic_and_rebuilds_from_its_config():
    g = _gen(15)
    torch.manual_seed(0)
    sphere_net = TangentMLP("sphere", hidden=16, depth=2, time_features=8)
    x = Sphere(2).uniform(100, generator=g)
    with torch.no_grad():
        v = sphere_net(x, torch.rand(100, generator=g))
    assert float((v * x).sum(1).abs().max()) < 1e-6
    torus_net = TangentMLP("torus", hidden=16, depth=2)
    y = FlatTorus(2).uniform(100, generator=g)
    shift = torch.tensor([2 * math.pi, -4 * math.pi])
    assert torch.allclose(torus_net(y, 0.3), torus_net(y + shift, 0.3), atol=1e-5)
    for net in (sphere_net, torus_net):
        twin = models.build_model(net.config)
        twin.load_state_dict(net.state_dict())
        assert models.data_shape(twin) == (net.dim,)
        assert torch.equal(twin(x if net is sphere_net else y, 0.5), net(x if net is sphere_net else y, 0.5))


# --- data ------------------------------------------------------------------------------------------

def test_von_mises_fisher_sampler_matches_its_density():
    kappa = 7.0
    q = VonMisesFisherMixture([[1.0, 2.0, 2.0]], [kappa], dtype=D64)
    n = 100_000
    x = q(n, generator=_gen(16))
    mu = torch.tensor([1.0, 2.0, 2.0], dtype=D64) / 3.0
    c = x @ mu
    # E[mu.x] = coth(kappa) - 1/kappa and the direction around mu is uniform
    assert float(c.mean()) == pytest.approx(1 / math.tanh(kappa) - 1 / kappa, abs=4 * float(c.std()) / math.sqrt(n))
    perp = x - c[:, None] * mu
    assert float(perp.mean(0).abs().max()) < 4 * float(perp.std()) / math.sqrt(n)
    # the density integrates to one (uniform importance sampling) and matches the closed form
    u = Sphere(2).uniform(200_000, generator=_gen(17), dtype=D64)
    assert float(torch.exp(q.log_prob(u)).mean() * 4 * math.pi) == pytest.approx(1.0, abs=0.02)
    lp = kappa / (4 * math.pi * math.sinh(kappa)) * torch.exp(kappa * (u[:5] @ mu))
    assert torch.allclose(q.log_prob(u[:5]), torch.log(lp), atol=1e-12)


def test_von_mises_fisher_mixture_weights():
    q = VonMisesFisherMixture([[0, 0, 1.0], [0, 0, -1.0]], [50.0, 50.0], weights=[0.8, 0.2])
    x = q(20_000, generator=_gen(18))
    frac = float((x[:, 2] > 0).float().mean())
    assert frac == pytest.approx(0.8, abs=4 * math.sqrt(0.16 / 20_000))


def test_wrapped_normal_mixture_integrates_to_one_and_matches_its_samples():
    q = WrappedNormalMixture([[3.0, -3.0], [0.0, 1.0]], [[[0.3, 0.1], [0.1, 0.2]], [[0.1, 0.0], [0.0, 0.4]]],
                             weights=[0.6, 0.4], dtype=D64)
    k = 200
    grid = -math.pi + 2 * math.pi * (torch.arange(k, dtype=D64) + 0.5) / k
    pts = torch.cartesian_prod(grid, grid)
    mass = float(torch.exp(q.log_prob(pts)).sum()) * (2 * math.pi / k) ** 2
    assert mass == pytest.approx(1.0, abs=1e-6)
    x = q(100_000, generator=_gen(19))
    assert float(FlatTorus(2).off_manifold(x).max()) == 0.0
    # the first component straddles the corner (pi, -pi): E[cos x] of the wrapped law, against the grid
    e_cos = float((torch.cos(pts[:, 0]) * torch.exp(q.log_prob(pts))).sum()) * (2 * math.pi / k) ** 2
    assert float(torch.cos(x[:, 0]).mean()) == pytest.approx(e_cos, abs=4 / math.sqrt(100_000))


# --- the geodesic W2 -------------------------------------------------------------------------------

def test_geodesic_w2_is_exact_and_sees_the_seam():
    t, g = FlatTorus(2), _gen(20)
    a = t.uniform(6, generator=g, dtype=D64)
    b = t.uniform(6, generator=g, dtype=D64)
    cost = t.pairwise_dist(a, b) ** 2
    best = min(sum(float(cost[i, p[i]]) for i in range(6)) / 6 for p in itertools.permutations(range(6)))
    assert metrics.geodesic_w2(a, b, t) == pytest.approx(math.sqrt(best), abs=1e-12)
    assert metrics.geodesic_w2(a, a, "torus") == pytest.approx(0.0, abs=1e-12)
    left = torch.tensor([[math.pi - 0.05, 0.0]], dtype=D64).repeat(4, 1)
    right = torch.tensor([[-math.pi + 0.05, 0.0]], dtype=D64).repeat(4, 1)
    assert metrics.geodesic_w2(left, right, t) == pytest.approx(0.1, abs=1e-12)
    assert metrics.w2(left, right) == pytest.approx(2 * math.pi - 0.1, abs=1e-12)
    # unequal sizes: duplicating every point changes nothing
    assert metrics.geodesic_w2(a, torch.cat([b, b]), t) == pytest.approx(math.sqrt(best), abs=1e-9)


def test_geodesic_w2_on_the_sphere_of_a_rotation():
    s = Sphere(2)
    phi = torch.linspace(0, 2 * math.pi, 50, dtype=D64)[:-1]
    ring = torch.stack([torch.cos(phi), torch.sin(phi), torch.zeros_like(phi)], 1)
    alpha = 0.3  # tilt the equator about the x axis: each point moves at most alpha
    R = torch.tensor([[1, 0, 0], [0, math.cos(alpha), -math.sin(alpha)], [0, math.sin(alpha), math.cos(alpha)]],
                     dtype=D64)
    d = metrics.geodesic_w2(ring, ring @ R.T, s)
    assert 0 < d <= alpha + 1e-12
    assert d > metrics.w2(ring, ring @ R.T)  # the geodesic is longer than the chord


# --- argument checks -------------------------------------------------------------------------------

def test_bad_input_is_named_and_explained():
    s, t = Sphere(2), FlatTorus(2)
    with pytest.raises(ValueError, match="does not lie on Sphere.*proj"):
        s.log(torch.ones(3, 3), torch.ones(3, 3))
    with pytest.raises(ValueError, match=r"shape \(batch, 3\)"):
        s.exp(torch.ones(3, 2), torch.ones(3, 2))
    with pytest.raises(ValueError, match="deg2rad"):
        GeodesicPath(t).check_data("data", torch.tensor([[170.0, -60.0]]))
    with pytest.raises(ValueError, match="not tangent"):
        s.exp(s.uniform(4), torch.ones(4, 3))
    with pytest.raises(ValueError, match="zero row"):
        s.proj(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="retraction='exp' is the geodesic Euler step"):
        manifolds.odeint(lambda x, t: x, s.uniform(4), s, method="rk4", retraction="exp")
    with pytest.raises(ValueError, match="unknown retraction"):
        manifolds.odeint(lambda x, t: x, s.uniform(4), s, retraction="wrap")
    with pytest.raises(ValueError, match="t < 1"):
        GeodesicPath(s).conditional_field(s.uniform(4), s.uniform(4), 1.0)
    with pytest.raises(ValueError, match="pass manifold"):
        manifolds.sample(models.MLP(dim=3), 4)
    with pytest.raises(ValueError, match="unknown manifold"):
        get_manifold("cylinder")
    with pytest.raises(ValueError, match="not dim=4"):
        TangentMLP(Sphere(2), dim=4)
    with pytest.raises(ValueError, match="lie in"):
        training.cfm_loss(TangentMLP("sphere", hidden=8, depth=1), s.uniform(4), s.uniform(4), 1.5,
                          path=GeodesicPath(s))
    with pytest.raises(TypeError, match="same dtype"):
        s.exp(s.uniform(4, dtype=D64), torch.zeros(4, 3))
    bad = lambda x, t: torch.zeros(x.shape[0], 2)  # noqa: E731
    with pytest.raises(ValueError, match="state's shape"):
        manifolds.odeint(bad, s.uniform(4), s)
    with pytest.raises(ValueError, match="does not lie on"):
        cfmlib.train(TangentMLP("sphere", hidden=8, depth=1), torch.randn(10, 3), path=GeodesicPath(s), steps=1,
                     progress=False)
    with pytest.raises(ValueError, match="covs must have shape"):
        WrappedNormalMixture([[0.0, 0.0]], [[1.0, 0.0]])
    with pytest.raises(ValueError, match="kappas"):
        VonMisesFisherMixture([[0, 0, 1.0]], [-1.0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda():
    q = VonMisesFisherMixture([[0, 0, 1.0]], [20.0])
    res = cfmlib.train(TangentMLP("sphere", hidden=32, depth=2), q, path=GeodesicPath("sphere"), steps=50,
                       batch_size=64, progress=False, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    out = manifolds.sample(res.ema, 64, steps=5, generator=g)
    assert out.x.device.type == "cuda" and float(Sphere(2).off_manifold(out.x).max()) < 1e-5
    lp = manifolds.log_prob(res.ema, out.x, steps=4)
    assert lp.log_prob.device.type == "cuda" and bool(torch.isfinite(lp.log_prob).all())
