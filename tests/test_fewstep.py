"""Few-step generation (chapter 14): the closed-form Gaussian flow map against the exact marginal field
and an accurate ODE solve, the MeanFlow identity on closed-form and integrated flows (and wrong average
velocities failing it), the three losses against their formulas and at the exact average velocity, the
time pairs they draw, the sampler, the networks, training through cfmlib.train, and argument checks."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import cfmlib
from cfmlib import analytic, fewstep
from cfmlib.checkpoint import load_model
from cfmlib.models import MODELS, UNet, build_model, data_shape
from cfmlib.training import cfm_loss

D64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny networks: one thread is the fastest (and several threads crawl on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gaussian(path="condot", dim=2):
    mean = torch.tensor([2.0, -1.0, 0.5][:dim], dtype=D64)
    std = torch.tensor([0.3, 1.7, 0.8][:dim], dtype=D64)
    return fewstep.GaussianFlowMap(mean, std, path=path)


def pairs(n, seed=0, lo=0.0):
    """Random time pairs r <= t in [lo, 1] and standard-normal points."""
    g = torch.Generator().manual_seed(seed)
    r = lo + (1 - lo) * torch.rand(n, generator=g, dtype=D64)
    t = r + (1 - r) * torch.rand(n, generator=g, dtype=D64)
    return torch.randn(n, 2, generator=g, dtype=D64), r, t


def uniform(n, generator=None, device=None, dtype=None):
    return torch.rand(n, generator=generator, device=device, dtype=dtype)


PATHS = ["condot", "cosine", cfmlib.paths.CondOTPath(sigma_min=0.05)]


# ----------------------------------------------------------------------------------------- ground truth
@pytest.mark.parametrize("path", PATHS + ["vp"])
def test_gaussian_field_is_the_marginal_field(path):
    gm = gaussian(path)
    marginal = analytic.Marginal(analytic.GaussianMixture(gm.mean[None], gm.std[None]), path)
    x, r, _ = pairs(300, lo=0.0)
    r = r * gm.path.t_max
    assert torch.allclose(gm.field(x, r), marginal.field(x, r), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("path", PATHS)
def test_gaussian_flow_map_solves_the_ode_and_composes(path):
    gm = gaussian(path)
    x, r, t = pairs(300, seed=1)
    exact = gm.flow_map(x, r, t)
    assert torch.allclose(fewstep.flow_map(gm.field, x, r, t, steps=200), exact, atol=1e-8)
    s = r + 0.3 * (t - r)
    assert torch.allclose(gm.flow_map(gm.flow_map(x, r, s), s, t), exact, atol=1e-12)  # semigroup
    assert torch.allclose(gm.flow_map(x, r, r), x, atol=1e-14)
    # the average velocity is the chord, and tends to the field as t -> r
    assert torch.allclose(x + (t - r)[:, None] * gm.average_velocity(x, r, t), exact, atol=1e-12)
    assert torch.equal(gm.average_velocity(x, r, r), gm.field(x, r))
    near = gm.average_velocity(x, r, r + 1e-7)
    assert torch.allclose(near, gm.field(x, r), atol=1e-5)


def test_one_euler_step_collapses_one_jump_does_not():
    gm = gaussian()
    x0 = torch.randn(4000, 2, generator=torch.Generator().manual_seed(2), dtype=D64)
    euler = x0 + gm.field(x0, 0.0)
    jump = x0 + gm.average_velocity(x0, 0.0, 1.0)
    assert torch.allclose(euler, gm.mean.expand_as(euler), atol=1e-12)   # every sample lands on E[x1]
    assert torch.allclose(jump, gm.mean + gm.std * x0, atol=1e-12)       # the data distribution


# ----------------------------------------------------------------------------------------- the identity
@pytest.mark.parametrize("path", PATHS)
def test_meanflow_identity_holds_for_the_closed_form(path):
    gm = gaussian(path)
    x, r, t = pairs(500, seed=3)
    res = fewstep.meanflow_residual(gm.average_velocity, gm.field, x, r, t)
    assert res.shape == x.shape and float(res.abs().max()) < 1e-11


def test_meanflow_identity_fails_for_wrong_average_velocities():
    gm = gaussian()
    x, r, t = pairs(500, seed=4)
    scale = float(gm.average_velocity(x, r, t).abs().max())
    wrong = {
        "instantaneous field": lambda x, r, t: gm.field(x, r),
        "field at the end": lambda x, r, t: gm.field(x, t),
        "half the jump": lambda x, r, t: 0.5 * gm.average_velocity(x, r, t),
        "backward average": lambda x, r, t: (x - gm.flow_map(x, r, torch.clamp(2 * r - t, min=0))) / (t - r)[:, None],
    }
    for name, ubar in wrong.items():
        res = fewstep.meanflow_residual(ubar, gm.field, x, r, t)
        assert float(res.abs().max()) > 0.05 * scale, name


def test_untranslated_identity_fails():
    """The paper's identity read literally in this book's time (u = v - (t - r) d/dr u) is not satisfied
    by the average velocity: its residual is 2 (t - r) d/dr u, not zero."""
    gm = gaussian()
    x, r, t = pairs(300, seed=5)
    ok = fewstep.meanflow_residual(gm.average_velocity, gm.field, x, r, t)
    u = gm.field(x, r)
    _, d_dr = torch.func.jvp(lambda x_, r_: gm.average_velocity(x_, r_, t), (x, r), (u, torch.ones_like(r)))
    literal = gm.average_velocity(x, r, t) - u + (t - r)[:, None] * d_dr
    assert float(ok.abs().max()) < 1e-11
    assert torch.allclose(literal, 2 * (t - r)[:, None] * d_dr, atol=1e-11)
    assert float(literal.abs().max()) > 0.1


def test_meanflow_identity_for_a_mixture_integrated_accurately():
    q = analytic.GaussianMixture(torch.tensor([[2.0, 0.0], [-1.5, 1.0], [0.0, -2.5]], dtype=D64), 0.6,
                                 torch.tensor([0.5, 0.3, 0.2], dtype=D64))
    field = analytic.Marginal(q, "condot")
    x, r, t = pairs(60, seed=6, lo=0.0)
    t = torch.minimum(t, torch.full_like(t, 0.95))
    r = torch.minimum(r, t - 0.05)

    res = {}
    for steps in (20, 40):
        def ubar(x, r, t):
            return fewstep.average_velocity(field, x, r, t, steps=steps)
        res[steps] = float(fewstep.meanflow_residual(ubar, field, x, r, t).abs().max())
    wrong = fewstep.meanflow_residual(lambda x, r, t: field(x, r), field, x, r, t)
    # the residual is the solver's error: small, and falling like h^4 (RK4) as the steps double
    assert res[40] < 1e-5 and res[20] / res[40] > 10
    assert float(wrong.abs().max()) > 0.1


# ----------------------------------------------------------------------------------------- losses
class Perturbed(torch.nn.Module):
    """A closed-form average velocity plus theta times a fixed function: the loss gradient in theta at 0."""

    def __init__(self, base):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.zeros(3, dtype=D64))
        self.base = base
        self.config = dict(dim=2)

    def forward(self, x, r, t, y=None):
        r, t = fewstep._two_times(r, t, x)
        feats = torch.stack([x[:, 0] * r, torch.sin(x[:, 1]) * (t - r), t * r], 1)
        return self.base(x, r, t) + (feats @ self.theta)[:, None] * torch.tensor([1.0, -0.5], dtype=D64)


def _grad(path, base, n=60_000, seed=0):
    gm = gaussian()
    g = torch.Generator().manual_seed(seed)
    x1, x0 = gm.sample(n, g), torch.randn(n, 2, generator=g, dtype=D64)
    t = path.draw_t(n, uniform, g, "cpu", D64)
    model = Perturbed(base)
    path.loss(model, x0, x1, t).backward()
    return model.theta.grad


def test_exact_average_velocity_is_stationary_for_meanflow_and_shortcut():
    gm = gaussian()
    inst = lambda x, r, t: gm.field(x, r)  # noqa: E731
    for path in (fewstep.MeanFlowPath(ratio=1.0, p=0.0), fewstep.ShortcutPath(fraction=1.0)):
        g_exact = _grad(path, gm.average_velocity)
        g_wrong = _grad(path, inst)
        assert float(g_exact.abs().max()) < 0.1 * float(g_wrong.abs().max()), type(path).__name__
    # the shortcut targets of the exact flow map are exact (jumps longer than the shortest, whose half
    # jumps are Euler steps of the field): its loss is zero there, and not for the instantaneous field
    g = torch.Generator().manual_seed(1)
    x1, x0 = gm.sample(500, g), torch.randn(500, 2, generator=g, dtype=D64)
    D = torch.tensor([0.5, 0.25], dtype=D64)[torch.randint(0, 2, (500,), generator=g)]
    r = torch.floor(torch.rand(500, generator=g, dtype=D64) * (2 / D - 1)) * D / 2
    t = torch.stack([r, r + D], 1)
    path = fewstep.ShortcutPath(fraction=1.0, max_steps=8)
    with torch.no_grad():
        assert float(path.loss(Perturbed(gm.average_velocity), x0, x1, t)) < 1e-24
        assert float(path.loss(Perturbed(inst), x0, x1, t)) > 1e-3


def test_consistency_bias_at_the_exact_map_shrinks_with_delta():
    """The conditional step makes the consistency target biased by O(delta): at the exact map the loss
    gradient, relative to the instantaneous field's, falls with delta."""
    gm = gaussian()
    inst = lambda x, r, t: gm.field(x, r)  # noqa: E731
    rel = []
    for delta in (0.1, 0.02):
        path = fewstep.ConsistencyPath(delta=delta)
        rel.append(float(_grad(path, gm.average_velocity).norm() / _grad(path, inst).norm()))
    assert rel[0] < 0.3 and rel[1] < 0.4 * rel[0], rel


def test_consistency_training_tends_to_meanflow_at_the_end_time():
    """Delta times the consistency gradient -> the MeanFlow gradient at t = 1 with weight 1 - r, with an
    error proportional to delta."""
    model, x0, x1, g = _model_and_batch(n=256)
    r = 0.9 * torch.rand(256, generator=g, dtype=D64)

    def grad(loss):
        model.zero_grad()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()]).clone()

    mf = grad(fewstep.MeanFlowPath(ratio=1.0).loss(model, x0, x1, torch.stack([r, torch.ones_like(r)], 1), weight=1 - r))
    rel = []
    for delta in (1e-2, 1e-3):
        ct = grad(fewstep.ConsistencyPath(delta=delta).loss(model, x0, x1, torch.stack([r, r + delta], 1)))
        rel.append(float((delta * ct - mf).norm() / mf.norm()))
    assert rel[1] < 1e-3 and 7 < rel[0] / rel[1] < 13, rel
    wrong = grad(fewstep.MeanFlowPath(ratio=1.0).loss(model, x0, x1, torch.stack([r, torch.ones_like(r)], 1)))
    assert float((1e-3 * ct - wrong).norm() / wrong.norm()) > 0.1  # the weight 1 - r matters


def _model_and_batch(n=64, seed=0):
    torch.manual_seed(seed)
    model = fewstep.FlowMapMLP(dim=2, hidden=16, depth=2).double()
    g = torch.Generator().manual_seed(seed)
    x1, x0 = 2 + torch.randn(n, 2, generator=g, dtype=D64), torch.randn(n, 2, generator=g, dtype=D64)
    return model, x0, x1, g


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_meanflow_loss_matches_its_formula(p):
    model, x0, x1, g = _model_and_batch()
    path = fewstep.MeanFlowPath(ratio=0.5, p=p)
    t = path.draw_t(64, uniform, g, "cpu", D64)
    r, tt = t[:, 0], t[:, 1]
    xr, v = (r[:, None] * x1 + (1 - r[:, None]) * x0), x1 - x0
    out = model(xr, r, tt)
    h = 1e-6  # the derivative along (v, 1, 0) by a central difference
    d_dr = (model(xr + h * v, r + h, tt) - model(xr - h * v, r - h, tt)) / (2 * h)
    target = v + (tt - r)[:, None] * d_dr
    err = (out - target.detach()).pow(2).sum(1)
    want = (err / (err.detach() + 1e-3) ** p).mean()
    assert torch.allclose(path.loss(model, x0, x1, t), want, rtol=1e-7)
    assert ((tt > r).float().mean() - 0.5).abs() < 0.2 and bool((tt == r).any())


def test_meanflow_without_jumps_is_flow_matching():
    model, x0, x1, g = _model_and_batch()
    path = fewstep.MeanFlowPath(ratio=0.0, p=0.0)
    t = path.draw_t(64, uniform, g, "cpu", D64)
    assert torch.equal(t[:, 0], t[:, 1])
    field = lambda x, s: model(x, s, s)  # noqa: E731
    assert torch.allclose(path.loss(model, x0, x1, t), cfm_loss(field, x0, x1, t[:, 0]), rtol=1e-12)


def test_shortcut_loss_matches_its_formula():
    model, x0, x1, g = _model_and_batch(n=256)
    path = fewstep.ShortcutPath(fraction=0.5, max_steps=4)
    t = path.draw_t(256, uniform, g, "cpu", D64)
    r, tt = t[:, 0], t[:, 1]
    xr, v = (r[:, None] * x1 + (1 - r[:, None]) * x0), x1 - x0
    target = v.clone()
    for i in torch.nonzero(tt > r)[:, 0].tolist():
        D = float(tt[i] - r[i])
        d = D / 2
        a, m = float(r[i]), float(r[i]) + d
        end1, end2 = (a, m) if D <= 1 / 4 + 1e-9 else (m, a + D)
        s1 = model(xr[i:i + 1], a, end1)
        s2 = model(xr[i:i + 1] + d * s1, m, end2)
        target[i] = (0.5 * (s1 + s2))[0]
    want = (model(xr, r, tt) - target.detach()).pow(2).sum(1).mean()
    assert torch.allclose(path.loss(model, x0, x1, t), want, rtol=1e-10)


def test_consistency_loss_matches_its_formula():
    model, x0, x1, g = _model_and_batch()
    path = fewstep.ConsistencyPath(delta=0.1)
    t = path.draw_t(64, uniform, g, "cpu", D64)
    r, s = t[:, 0], t[:, 1]
    f = lambda x, a: x + (1 - a)[:, None] * model(x, a, torch.ones_like(a))  # noqa: E731
    xr, xs = r[:, None] * x1 + (1 - r[:, None]) * x0, s[:, None] * x1 + (1 - s[:, None]) * x0
    want = ((f(xr, r) - f(xs, s).detach()) / 0.1).pow(2).sum(1).mean()
    assert torch.allclose(path.loss(model, x0, x1, t), want, rtol=1e-10)
    one = torch.ones(5, dtype=D64)
    x = torch.randn(5, 2, dtype=D64)
    assert torch.equal(path.consistency_function(model, x, one), x)  # the boundary condition f(x, 1) = x


# ----------------------------------------------------------------------------------------- time pairs
@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 300), seed=st.integers(0, 10_000), k=st.sampled_from([1, 2, 8, 128]))
def test_time_pairs(n, seed, k):
    g = torch.Generator().manual_seed(seed)
    mf = fewstep.MeanFlowPath(ratio=0.3).draw_t(n, uniform, g, "cpu", D64)
    sc = fewstep.ShortcutPath(max_steps=k).draw_t(n, uniform, g, "cpu", D64)
    ct = fewstep.ConsistencyPath(delta=0.05).draw_t(n, uniform, g, "cpu", D64)
    for t in (mf, sc, ct):
        assert t.shape == (n, 2) and bool((t[:, 0] <= t[:, 1]).all()) and bool((t >= 0).all() & (t <= 1).all())
    jump = sc[:, 1] > sc[:, 0]
    D, r = (sc[:, 1] - sc[:, 0])[jump], sc[jump, 0]
    level = torch.log2(D)
    assert torch.allclose(level, level.round(), atol=1e-9) and bool((D >= 1 / k - 1e-12).all())
    assert torch.allclose(r / (D / 2), (r / (D / 2)).round(), atol=1e-9)  # starts on the grid of half jumps
    assert torch.allclose(ct[:, 1] - ct[:, 0], torch.full((n,), 0.05, dtype=D64), atol=1e-12)


def test_time_pair_fractions_and_grid_times():
    g = torch.Generator().manual_seed(0)
    mf = fewstep.MeanFlowPath(ratio=0.3).draw_t(20_000, uniform, g, "cpu", D64)
    assert abs(float((mf[:, 1] > mf[:, 0]).double().mean()) - 0.3) < 0.02
    sc = fewstep.ShortcutPath(fraction=0.25, max_steps=4).draw_t(20_000, uniform, g, "cpu", D64)
    jump = sc[:, 1] > sc[:, 0]
    assert abs(float(jump.double().mean()) - 0.25) < 0.02
    assert set(torch.round((sc[jump, 1] - sc[jump, 0]) * 4).long().tolist()) == {1, 2, 4}
    times = fewstep.grid_times(4)(10_000, generator=g, dtype=D64)
    assert set(torch.round(times * 4).long().tolist()) == {0, 1, 2, 3} and torch.equal(times * 4, torch.round(times * 4))


# ----------------------------------------------------------------------------------------- sampling
class Exact(torch.nn.Module):
    """The closed-form average velocity as a model."""

    def __init__(self, gm):
        super().__init__()
        self.gm, self.config = gm, dict(dim=gm.dim)
        self.p = torch.nn.Parameter(torch.zeros(1, dtype=D64))

    def forward(self, x, r, t):
        return self.gm.average_velocity(x, r, t)


def test_sampler_with_the_exact_flow_map_is_exact_in_any_number_of_jumps():
    gm = gaussian()
    x0 = torch.randn(500, 2, generator=torch.Generator().manual_seed(7), dtype=D64)
    for steps in (1, 2, 5):
        sol = fewstep.sample(Exact(gm), x0=x0, steps=steps, trajectory=True)
        assert sol.nfe == steps and sol.trajectory.shape == (steps + 1, 500, 2)
        assert torch.allclose(sol.x, gm.flow_map(x0, 0.0, 1.0), atol=1e-12)
    times = [0.0, 0.1, 0.7, 1.0]
    sol = fewstep.sample(Exact(gm), x0=x0, times=times, trajectory=True)
    for k, s in enumerate(times):
        assert torch.allclose(sol.trajectory[k], gm.flow_map(x0, 0.0, s), atol=1e-12)


def test_sampler_steps_and_renoising():
    model = fewstep.FlowMapMLP(dim=2, hidden=8, depth=1)
    x0 = torch.randn(30, 2, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        one = x0 + model(x0, 0.0, 1.0)
        half = x0 + 0.5 * model(x0, 0.0, 0.5)
        two = half + 0.5 * model(half, 0.5, 1.0)
    assert torch.allclose(fewstep.sample(model, x0=x0, steps=1).x, one)
    assert torch.allclose(fewstep.sample(model, x0=x0, steps=2).x, two)
    assert torch.allclose(fewstep.sample(model, x0=x0, steps=1, renoise=True).x, one)
    g = torch.Generator().manual_seed(9)
    renoised = fewstep.sample(model, x0=x0, steps=2, renoise=True, generator=g).x
    g = torch.Generator().manual_seed(9)
    z = torch.randn(30, 2, generator=g)
    with torch.no_grad():
        mid = 0.5 * one + 0.5 * z
        want = mid + 0.5 * model(mid, 0.5, 1.0)
    assert torch.allclose(renoised, want, atol=1e-6)
    drawn = fewstep.sample(model, 12, steps=3, generator=torch.Generator().manual_seed(1))
    assert drawn.x.shape == (12, 2) and drawn.nfe == 3


# ----------------------------------------------------------------------------------------- networks
def test_networks_shapes_registry_and_checkpoints(tmp_path):
    mlp = fewstep.FlowMapMLP(dim=3, hidden=16, depth=2, time_features=8, num_classes=4)
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 3, 4])
    assert mlp(x, 0.2, 0.7, y).shape == (5, 3) and data_shape(mlp) == (3,)
    assert torch.equal(mlp(x, 0.2, 0.7), mlp(x, 0.2, 0.7, torch.full((5,), 4)))  # no label = the null label
    unet = fewstep.FlowMapUNet(image_shape=(1, 8, 8), base=8, num_classes=10)
    xi = torch.randn(3, 1, 8, 8)
    assert unet(xi, torch.rand(3), torch.ones(3), torch.tensor([1, 2, 3])).shape == xi.shape
    assert data_shape(unet) == (1, 8, 8)
    for model in (mlp, unet):
        assert model.config["kind"] in MODELS
        rebuilt = build_model(model.config)
        assert type(rebuilt) is type(model) and rebuilt.config == model.config
    result = cfmlib.train(fewstep.FlowMapMLP(dim=2, hidden=8, depth=1), torch.randn(64, 2),
                          path=fewstep.ShortcutPath(), steps=3, batch_size=16, progress=False,
                          checkpoint=tmp_path / "ck.pt")
    loaded = load_model(tmp_path / "ck.pt")
    assert isinstance(loaded, fewstep.FlowMapMLP)
    assert torch.equal(loaded(x[:, :2], 0.1, 0.3), result.ema(x[:, :2], 0.1, 0.3))  # the EMA weights


def test_flowmap_unet_is_the_unet_when_the_jump_embedding_vanishes():
    torch.manual_seed(0)
    fm = fewstep.FlowMapUNet(image_shape=(1, 8, 8), base=8, num_classes=3, time_scale=1.0)
    torch.nn.init.zeros_(fm.gap_mlp[2].weight)
    torch.nn.init.zeros_(fm.gap_mlp[2].bias)
    for block in (fm.down1, fm.mid1, fm.mid2, fm.up1):  # make the blocks depend on the embedding
        torch.nn.init.normal_(block.conv2.weight, std=0.1)
    plain = UNet(image_shape=(1, 8, 8), base=8, num_classes=3)
    missing = plain.load_state_dict(fm.state_dict(), strict=False)
    assert not missing.missing_keys
    x, t, y = torch.randn(4, 1, 8, 8), torch.rand(4), torch.tensor([0, 1, 2, 3])
    assert torch.allclose(fm(x, t, torch.rand(4), y), plain(x, t, y), atol=1e-6)


def test_flowmap_unet_embeds_the_start_and_the_jump_length():
    torch.manual_seed(1)
    fm = fewstep.FlowMapUNet(image_shape=(1, 8, 8), base=8, num_classes=3, time_scale=0.05)
    seen = {}
    fm.down1.register_forward_hook(lambda module, args, out: seen.update(e=args[1]))
    x, r, y = torch.randn(4, 1, 8, 8), torch.rand(4), torch.tensor([0, 1, 2, 3])
    t = r + (1 - r) * torch.rand(4)
    fm(x, r, t, y)
    emb = cfmlib.models.sinusoidal_embedding
    want = fm.time_mlp(emb(0.05 * r, 64)) + fm.gap_mlp(emb(0.05 * (t - r), 64)) + fm.label(y)
    assert torch.allclose(seen["e"], want, atol=1e-6)


# ----------------------------------------------------------------------------------------- training
def test_training_learns_a_one_step_map_better_than_one_euler_step():
    """A few hundred steps of each loss beat one Euler step of the exact field (which lands on the mean)."""
    gm = fewstep.GaussianFlowMap(torch.tensor([2.0, -1.0]), torch.tensor([0.4, 0.4]))
    x0 = torch.randn(2000, 2, generator=torch.Generator().manual_seed(3))
    exact = gm.flow_map(x0, 0.0, 1.0)
    euler_err = float((x0 + gm.field(x0, 0.0) - exact).norm(dim=1).mean())
    for path, renoise in ((fewstep.MeanFlowPath(ratio=0.5, p=0.0), False), (fewstep.ShortcutPath(), False),
                          (fewstep.ConsistencyPath(delta=0.05), True)):
        torch.manual_seed(0)
        result = cfmlib.train(fewstep.FlowMapMLP(dim=2, hidden=32, depth=2), gm.sample, path=path, steps=400,
                              batch_size=256, lr=3e-3, progress=False, seed=1)
        x = fewstep.sample(result.ema, x0=x0, steps=1, renoise=renoise).x
        err = float((x - exact).norm(dim=1).mean())
        assert err < 0.5 * euler_err, (type(path).__name__, err, euler_err)


def test_training_is_seeded():
    data = torch.randn(200, 2, generator=torch.Generator().manual_seed(0))
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(cfmlib.train(fewstep.FlowMapMLP(dim=2, hidden=8, depth=1), data, path=fewstep.MeanFlowPath(),
                                 steps=5, batch_size=32, progress=False, seed=3).history)
    assert runs[0] == runs[1] and all(math.isfinite(v) for v in runs[0])


def test_distillation_on_grid_times_reproduces_a_map():
    """Pairs of a deterministic map, trained only at the grid times of a two-step sampler: two Euler
    steps reproduce the map far better than the same budget at uniform times."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4000, 2, generator=g)
    x1 = torch.stack([x0[:, 0] + 2 * torch.tanh(x0[:, 1]), 0.5 * x0[:, 1] - 1.0], 1)
    errs = {}
    for name, sampler in (("grid", fewstep.grid_times(2)), ("uniform", "uniform")):
        torch.manual_seed(0)
        result = cfmlib.train(cfmlib.MLP(dim=2, hidden=64, depth=2), pairs=(x0, x1), steps=600, batch_size=256,
                              lr=3e-3, time_sampler=sampler, progress=False)
        test = torch.randn(1000, 2, generator=g)
        want = torch.stack([test[:, 0] + 2 * torch.tanh(test[:, 1]), 0.5 * test[:, 1] - 1.0], 1)
        got = cfmlib.solvers.sample(result.ema, x0=test, steps=2).x
        errs[name] = float((got - want).norm(dim=1).mean())
    assert errs["grid"] < 0.5 * errs["uniform"], errs


# ----------------------------------------------------------------------------------------- bad input
def test_bad_input():
    model, x0, x1, g = _model_and_batch()
    path = fewstep.MeanFlowPath()
    with pytest.raises(ValueError, match=r"t must be a \(batch, 2\)"):
        cfm_loss(model, x0, x1, torch.rand(64, dtype=D64), path=path)
    bad = torch.stack([torch.full((64,), 0.8, dtype=D64), torch.full((64,), 0.2, dtype=D64)], 1)
    with pytest.raises(ValueError, match="r <= t"):
        cfm_loss(model, x0, x1, bad, path=path)
    with pytest.raises(ValueError, match="power of two"):
        fewstep.ShortcutPath(max_steps=12)
    with pytest.raises(ValueError, match="t_max"):
        fewstep.ConsistencyPath(path="vp")
    with pytest.raises(TypeError, match="AffinePath"):
        fewstep.MeanFlowPath(path=cfmlib.manifolds.GeodesicPath("sphere"))
    with pytest.raises(ValueError, match="unknown path 0.05"):
        fewstep.ConsistencyPath(0.05)  # the step is keyword-only: a number is not a path
    with pytest.raises(ValueError, match="ratio"):
        fewstep.MeanFlowPath(ratio=1.5)
    with pytest.raises(ValueError, match="x must have shape"):
        fewstep.FlowMapMLP(dim=2)(torch.randn(3, 3), 0.0, 1.0)
    with pytest.raises(ValueError, match="time_features"):
        fewstep.FlowMapMLP(time_features=3)
    with pytest.raises(ValueError, match="times must rise"):
        fewstep.sample(model, x0=x0, times=[0.0, 0.5, 0.5, 1.0])
    with pytest.raises(ValueError, match="n=3 disagrees"):
        fewstep.sample(model, 3, x0=x0)
    with pytest.raises(ValueError, match="t > r"):
        fewstep.average_velocity(gaussian().field, x0, 0.5, 0.5)
    with pytest.raises(ValueError, match="std must be positive"):
        fewstep.GaussianFlowMap(torch.zeros(2), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="field must return"):
        fewstep.meanflow_residual(gaussian().average_velocity, lambda x, t: x[:, :1], x0, 0.2, 0.6)
    with pytest.raises(TypeError, match="dtype"):
        cfmlib.train(fewstep.FlowMapMLP(dim=2), torch.randn(10, 2, dtype=D64), path=path, steps=1, progress=False)
