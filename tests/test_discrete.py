"""Discrete flow matching (chapter 12): mixture paths and their schedulers, the conditional velocity
solving the one-token Kolmogorov equation, the exact marginal velocity solving it on an enumerable
space (and wrong velocities failing), the discrete Theorem 2 (conditional and marginal losses have
the same gradient), the losses against their formulas, the Euler-jump sampler against its exact law
and against the data, training through cfmlib.train, the total-variation metric, and argument checks."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import cfmlib
from cfmlib import discrete as D
from cfmlib import metrics
from cfmlib.checkpoint import load_model
from cfmlib.models import MODELS, build_model, data_shape

D64 = torch.float64
V, L = 4, 3


class Quadratic(D.MixturePath):
    """A scheduler written only as kappa (derivative by autograd, inverse by bisection)."""

    def kappa(self, t):
        return t * t


def _paths():
    for source in D.SOURCES:
        yield D.PolynomialMixturePath(V, source)
        yield D.PolynomialMixturePath(V, source, exponent=2.5)
        yield D.CosineMixturePath(V, source)
        yield Quadratic(V, source)


PATHS = list(_paths())
IDS = [f"{type(p).__name__}-{getattr(p, 'exponent', '')}-{p.source}" for p in PATHS]


def toy(path=None):
    """Sequences of 3 tokens over 4 values: x3 = x1 + x2 (mod 4) with probability 0.85. Every token's
    marginal is uniform, so everything the data hold is in the correlations."""
    allx = D.enumerate_states(V, L)
    good = allx[:, 2] == (allx[:, 0] + allx[:, 1]) % V
    w = torch.where(good, torch.tensor(0.85 / 16, dtype=D64), torch.tensor(0.15 / 48, dtype=D64))
    return allx, w


def q_on_states(path, w):
    """The data law as a vector over the path's states (zero where a token is the mask)."""
    states = D.enumerate_states(path.num_states, L)
    place = V ** torch.arange(L - 1, -1, -1)
    ok = (states < V).all(1)
    q = torch.zeros(states.shape[0], dtype=D64)
    q[ok] = w[(states[ok] * place).sum(1)]
    return q


# ----------------------------------------------------------------------------------------- schedulers
@pytest.mark.parametrize("path", PATHS, ids=IDS)
def test_scheduler_ends_derivative_and_inverse(path):
    t = torch.linspace(0, 1, 21, dtype=D64)
    k = path.kappa(t)
    assert float(k[0]) == 0.0 and math.isclose(float(k[-1]), 1.0, abs_tol=1e-12)
    assert bool((k[1:] > k[:-1]).all())
    auto = D.MixturePath.d_kappa(path, t[1:-1])  # the base class's autograd derivative
    assert torch.allclose(path.d_kappa(t[1:-1]), auto, rtol=1e-10, atol=1e-12)
    assert torch.allclose(path.kappa_inverse(k), t, atol=1e-9)
    tm = t[:-1]
    assert torch.allclose(path.rate(tm), path.d_kappa(tm) / (1 - path.kappa(tm)))


def test_rate_of_linear_scheduler_and_jump_probability():
    p = D.PolynomialMixturePath(V)
    t = torch.tensor([0.0, 0.5, 0.75], dtype=D64)
    assert torch.allclose(p.rate(t), 1 / (1 - t))
    assert torch.allclose(p.jump_probability(t, 0.25), torch.tensor([0.25, 0.5, 1.0], dtype=D64))


# ----------------------------------------------------------------------------------------- the conditional path
@pytest.mark.parametrize("path", PATHS, ids=IDS)
def test_conditional_prob_ends_and_normalisation(path):
    x1 = torch.randint(0, V, (5, L), generator=torch.Generator().manual_seed(0))
    for t in (0.0, 0.3, 1.0):
        p = path.conditional_prob(x1, t)
        assert p.shape == (5, L, path.num_states) and torch.allclose(p.sum(-1), torch.ones(5, L, dtype=D64))
    assert torch.allclose(path.conditional_prob(x1, 0.0), path.source_probs(D64).expand(5, L, -1))
    assert torch.allclose(path.conditional_prob(x1, 1.0), torch.nn.functional.one_hot(x1, path.num_states).double())


@pytest.mark.parametrize("path", PATHS, ids=IDS)
def test_conditional_velocity_solves_the_one_token_kolmogorov_equation(path):
    """d/dt p_t(a | x1) = sum_b p_t(b | x1) u_t(a | b, x1) for every token value a, at several times."""
    x1 = torch.arange(V)[:, None]  # one token, every data value
    S = path.num_states
    for t in (0.1, 0.45, 0.8):
        tt = torch.tensor(t, dtype=D64)
        p = path.conditional_prob(x1, tt)[:, 0]  # (x1, b)
        dp = torch.autograd.functional.jacobian(lambda s: path.conditional_prob(x1, s)[:, 0], tt)  # (x1, a)
        b = torch.arange(S).repeat_interleave(V)[:, None]  # every current value b, for every x1
        u = path.conditional_velocity(b, x1.repeat(S, 1), t).reshape(S, V, S)  # (b, x1, a)
        flow = torch.einsum("xb,bxa->xa", p, u)  # (x1, a)
        assert float(dp.abs().max()) > 1e-2 and torch.allclose(flow, dp, atol=1e-12), (t, flow, dp)
        assert torch.allclose(u.sum(-1), torch.zeros(S, V, dtype=D64), atol=1e-12)  # rows sum to zero


def test_conditional_sample_switches_with_probability_kappa():
    path = D.PolynomialMixturePath(V, "uniform", exponent=2.0)
    g = torch.Generator().manual_seed(1)
    x1 = torch.randint(0, V, (4000, 8), generator=g)
    z = path.draw_x0(x1, g)
    assert z.shape == (4000, 2, 8) and z.dtype == torch.get_default_dtype()
    src, u = path.split(z)
    for t in (0.3, 0.7):
        xt = path.sample_xt(z, x1, t)
        switched = (u < t**2)
        assert torch.equal(xt[switched], x1[switched]) and torch.equal(xt[~switched], src[~switched])
        frac = float(switched.double().mean())
        sd = math.sqrt(t**2 * (1 - t**2) / switched.numel())
        assert abs(frac - t**2) < 5 * sd
    # the switching time of each token is kappa^{-1}(u): a token shows its data value from then on
    tau = path.switch_times(z)
    assert torch.allclose(path.kappa(tau), u, atol=1e-6)
    masked = D.PolynomialMixturePath(V).sample_xt(D.PolynomialMixturePath(V).draw_x0(x1, g), x1, 0.5)
    assert set(masked.unique().tolist()) <= set(range(V + 1)) and bool((masked == V).any())


# ----------------------------------------------------------------------------------------- exact marginal
@pytest.mark.parametrize("path", PATHS, ids=IDS)
def test_marginal_velocity_solves_the_kolmogorov_equation_and_wrong_ones_do_not(path):
    data, w = toy()
    m = D.Marginal(data, path, w)
    S = path.num_states

    def independent(x, t):  # ignores the other tokens: the per-token data marginals instead of the posterior
        return path.posterior_to_velocity(m._marginal[None].expand(x.shape[0], L, V), x, t)

    def halved(x, t):
        return 0.5 * m.velocity(x, t)

    for t in (0.5, 0.8):
        r, dp, flux = D.kolmogorov_residual(m.prob, m.velocity, t, num_states=S, length=L, return_terms=True)
        scale = float(dp.abs().max())
        assert scale > 1e-3 and float(r.abs().max()) < 1e-13 * scale
        for wrong in (independent, halved):
            rw = D.kolmogorov_residual(m.prob, wrong, t, num_states=S, length=L)
            assert float(rw.abs().max()) > 1e-3 * scale, (wrong.__name__, t, float(rw.abs().max()) / scale)
    probs = m.prob(D.enumerate_states(S, L), 0.4)
    assert math.isclose(float(probs.sum()), 1.0, rel_tol=1e-12)


def test_marginal_ends_and_posterior():
    data, w = toy()
    path = D.PolynomialMixturePath(V)
    m = D.Marginal(data, path, w)
    states = D.enumerate_states(path.num_states, L)
    assert torch.allclose(m.prob(states, 1.0), q_on_states(path, w))
    p0 = m.prob(states, 0.0)
    assert float(p0[-1]) == 1.0 and float(p0[:-1].abs().sum()) == 0.0  # all mask
    # at the all-mask state the posterior is the data's per-token marginal; with the first two tokens
    # shown, the third is their sum mod 4 with probability 0.85
    post = m.posterior(torch.tensor([[V, V, V], [1, 2, V]]), 0.5)
    assert torch.allclose(post[0], torch.full((L, V), 0.25, dtype=D64))
    assert math.isclose(float(post[1, 2, 3]), 0.85, rel_tol=1e-12)
    assert torch.allclose(post[1, 0], torch.nn.functional.one_hot(torch.tensor(1), V).double())


# ----------------------------------------------------------------------------------------- Theorem 2, discrete
def _tabular(path, theta):
    """A data prediction with one free logit per (state, position, value)."""
    S = path.num_states
    place = S ** torch.arange(L - 1, -1, -1)

    def model(x, t):
        return theta[(x * place).sum(1)]
    return model


@pytest.mark.parametrize("source", D.SOURCES)
def test_conditional_and_marginal_losses_have_the_same_gradient(source):
    """Cross-entropy: the conditional loss E_{x1, x_t} -log p(x1^i | x_t) and the marginal loss
    E_{x_t} KL(p_{1|t}(.|x_t) || p_theta(.|x_t)) differ by a constant, so their gradients agree; the
    squared log-loss, which is not linear in the target, has another gradient."""
    path = D.PolynomialMixturePath(V, source)
    data, w = toy()
    m = D.Marginal(data, path, w)
    S = path.num_states
    states = D.enumerate_states(S, L)
    t = 0.6
    cond = path.conditional_prob(data, t)  # (M, L, S): p_t(x^i | x1^i)
    pxx1 = torch.stack([cond[:, i, states[:, i]] for i in range(L)], -1).prod(-1)  # (M, N): p_t(x | x1)
    joint = w[:, None] * pxx1  # q(x1) p_t(x | x1)
    pt = m.prob(states, t)
    post = m.posterior(states, t)
    assert torch.allclose(joint.sum(0), pt)
    diffs, grads = [], []
    for seed in range(3):
        theta = torch.randn(states.shape[0], L, V, dtype=D64, generator=torch.Generator().manual_seed(seed),
                            requires_grad=True)
        logp = torch.log_softmax(_tabular(path, theta)(states, t), -1)  # (N, L, V)
        lp_x1 = torch.stack([logp[:, i, data[:, i]] for i in range(L)], -1)  # (N, M, L)
        l_cond = -(joint.T[..., None] * lp_x1).sum() / L
        kl = (post * (post.clamp_min(1e-300).log() - logp)).sum(-1)  # (N, L)
        l_marg = (pt[:, None] * kl).sum() / L
        g_cond, = torch.autograd.grad(l_cond, theta, retain_graph=True)
        g_marg, = torch.autograd.grad(l_marg, theta, retain_graph=True)
        assert torch.allclose(g_cond, g_marg, atol=1e-14)
        diffs.append(float(l_cond - l_marg))
        l_sq = (joint.T[..., None] * lp_x1**2).sum() / L
        l_sq_marg = (pt[:, None] * ((post * -logp).sum(-1)) ** 2).sum() / L
        g_sq, = torch.autograd.grad(l_sq, theta, retain_graph=True)
        g_sq_marg, = torch.autograd.grad(l_sq_marg, theta)
        grads.append(float((g_sq - g_sq_marg).abs().max()))
    assert max(diffs) - min(diffs) < 1e-12 and min(diffs) > 0  # the constant: a conditional entropy
    assert min(grads) > 1e-4


# ----------------------------------------------------------------------------------------- losses
def _batch(path, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randint(0, V, (n, L), generator=g)
    return path.draw_x0(x1, g), x1, torch.rand(n, generator=g) * path.t_max


@pytest.mark.parametrize("source", D.SOURCES)
def test_cross_entropy_loss_is_the_formula(source):
    path = D.PolynomialMixturePath(V, source)
    model = D.TokenMLP(L, V, hidden=32, depth=1)
    x0, x1, t = _batch(path)
    xt = path.sample_xt(x0, x1, t)
    logp = torch.log_softmax(model(xt, t), -1).gather(-1, x1[..., None])[..., 0]
    counted = (xt == V) if source == "mask" else torch.ones_like(xt, dtype=torch.bool)
    want = -(logp * counted).sum(1).div(L).mean()
    assert torch.allclose(cfmlib.cfm_loss(model, x0, x1, t, path=path), want)
    weight = torch.rand(64, generator=torch.Generator().manual_seed(3))
    want_w = (-(logp * counted).sum(1).div(L) * weight).mean()
    assert torch.allclose(cfmlib.cfm_loss(model, x0, x1, t, path=path, weight=weight), want_w)


@pytest.mark.parametrize("source", D.SOURCES)
def test_generalised_kl_loss_is_the_formula(source):
    """Lipman et al. (2024): -lambda_t [p(x_t|x_t) - delta + (1 - delta) log p(x1|x_t)], with the tokens
    whose value is known (unmasked tokens of a masked source) counted as zero."""
    path = D.CosineMixturePath(V, source, loss="gkl")
    assert path.t_max < 1
    model = D.TokenMLP(L, V, hidden=32, depth=1)
    x0, x1, t = _batch(path)
    xt = path.sample_xt(x0, x1, t)
    p = torch.softmax(model(xt, t), -1)
    p_x1 = p.gather(-1, x1[..., None])[..., 0]
    p_xt = torch.where(xt < V, p.gather(-1, xt.clamp(max=V - 1)[..., None])[..., 0], torch.zeros(()))
    same = (xt == x1).float()
    rate = (0.5 * math.pi * torch.tan(0.5 * math.pi * t))[:, None]
    per = -rate * (p_xt - same + (1 - same) * p_x1.log())
    if source == "mask":
        per = per * (xt == V)
    assert torch.allclose(cfmlib.cfm_loss(model, x0, x1, t, path=path), per.mean(1).mean(), rtol=1e-5)


def test_unmasked_tokens_are_known_in_loss_posterior_and_sampler():
    path = D.PolynomialMixturePath(V)
    logits = torch.randn(2, L, V)
    x = torch.tensor([[2, V, V], [V, 0, 3]])
    p = path.posterior(logits, x)
    assert torch.equal(p[0, 0], torch.nn.functional.one_hot(torch.tensor(2), V).float())
    assert torch.allclose(p[0, 1], torch.softmax(logits[0, 1], -1))
    # the loss does not depend on the logits of tokens whose value is known
    model = D.TokenMLP(L, V, hidden=16, depth=1)
    x0, x1, t = _batch(path, n=32)
    loss = cfmlib.cfm_loss(model, x0, x1, t, path=path)
    loss.backward()
    assert torch.isfinite(loss)
    # with only known tokens (t = 1) the loss is exactly zero
    assert float(cfmlib.cfm_loss(model, x0, x1, 1.0, path=path).detach()) == 0.0


# ----------------------------------------------------------------------------------------- the sampler
@pytest.mark.parametrize("source", D.SOURCES)
def test_exact_marginal_carries_the_source_to_the_data_and_steps_shrink_the_error(source):
    path = D.PolynomialMixturePath(V, source)
    data, w = toy()
    m = D.Marginal(data, path, w)
    q = q_on_states(path, w)
    tvs = []
    for k in (1, 2, 4, 8, 16, 64, 256):
        dist = D.sampler_distribution(m, path, L, k)
        assert math.isclose(float(dist.sum()), 1.0, rel_tol=1e-9) and float(dist.min()) > -1e-12
        tvs.append(0.5 * float((dist - q).abs().sum()))
    assert all(b < a for a, b in zip(tvs, tvs[1:])), tvs
    # one step draws every token independently from its marginal (uniform here): TV to q is 0.6
    assert math.isclose(tvs[0], 0.6, abs_tol=1e-9)
    # Euler is first order: four times the steps, a quarter of the error, once it is small
    assert 3.2 < tvs[-2] / tvs[-1] < 4.8 and tvs[-1] < 0.006, tvs


@pytest.mark.parametrize("source", D.SOURCES)
def test_sample_draws_from_the_exact_law_of_the_sampler(source):
    """The empirical distribution of sample() is as close to sampler_distribution() as two draws of that
    law are to each other (band of 20 pairs of draws), for a few-step sampler that is far from the data."""
    path = D.PolynomialMixturePath(V, source, exponent=2.0)
    data, w = toy()
    m = D.Marginal(data, path, w)
    law = D.sampler_distribution(m, path, L, 4)
    states = D.enumerate_states(path.num_states, L)
    n = 3000

    def draw(k, generator=None):
        return states[torch.multinomial(law, k, replacement=True, generator=generator)]
    band = metrics.data_band(draw, n, metric="tv", repeats=20, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(5)
    got = [metrics.tv(D.sample(m, n, path=path, steps=4, generator=g, x0=path.sample_source((n, L), generator=g)).x,
                      draw(n, g)) for _ in range(3)]
    assert band.compare(got).above == 0, (band, got)
    # a sampler that is not this one (one step more) sits above the band
    other = [metrics.tv(D.sample(m, n, path=path, steps=2, generator=g,
                                 x0=path.sample_source((n, L), generator=g)).x, draw(n, g)) for _ in range(3)]
    assert band.compare(other).verdict == "worse", (band, other)


def test_sample_trajectory_masked_tokens_only_unmask():
    path = D.PolynomialMixturePath(V)
    data, w = toy()
    m = D.Marginal(data, path, w)
    sol = D.sample(m, 200, path=path, steps=8, trajectory=True, generator=torch.Generator().manual_seed(0))
    traj = sol.trajectory
    assert traj.shape == (9, 200, L) and sol.nfe == 8 and torch.allclose(sol.times, torch.linspace(0, 1, 9, dtype=D64))
    assert bool((traj[0] == V).all()) and bool((traj[-1] < V).all())
    shown = traj[:-1] != V
    assert torch.equal(traj[1:][shown], traj[:-1][shown])  # a token, once shown, never changes
    # with kappa = t^2 Euler's last jump probability h * lambda is below one: the last step must still
    # reveal every token (the rate is infinite at t = 1)
    quad = D.PolynomialMixturePath(V, exponent=2.0)
    assert float(quad.jump_probability(torch.tensor([1 - 1 / 8]), 1 / 8)) < 0.95
    x = D.sample(D.Marginal(data, quad, w), 1000, path=quad, steps=8, generator=torch.Generator().manual_seed(1)).x
    assert bool((x < V).all())


def test_sample_seeded_and_on_the_models_device():
    model = D.TokenMLP(L, V, hidden=16, depth=1)
    path = D.PolynomialMixturePath(V, "uniform")
    a = D.sample(model, 10, path=path, steps=5, generator=torch.Generator().manual_seed(3)).x
    b = D.sample(model, 10, path=path, steps=5, generator=torch.Generator().manual_seed(3)).x
    assert torch.equal(a, b) and a.shape == (10, L) and a.dtype == torch.long and int(a.max()) < V


# ----------------------------------------------------------------------------------------- training
def test_train_learns_the_toy_distribution():
    """cfmlib.train with a mixture path: the trained model, sampled exactly with 32 steps, lands much closer
    to the data than the one-step sampler (whose TV is 0.6) and than an untrained model."""
    path = D.PolynomialMixturePath(V)
    data, w = toy()
    tokens = data[torch.multinomial(w, 4000, replacement=True, generator=torch.Generator().manual_seed(0))]
    torch.manual_seed(0)
    model = D.TokenMLP(L, V, hidden=128, depth=2)
    untrained = D.sampler_distribution(model, path, L, 32)
    res = cfmlib.train(model, tokens, path=path, steps=1500, batch_size=128, lr=3e-3, ema_decay=0.0, seed=0,
                       progress=False, device="cpu")
    q = q_on_states(path, w)
    tv_trained = 0.5 * float((D.sampler_distribution(res.model, path, L, 32) - q).abs().sum())
    tv_untrained = 0.5 * float((untrained - q).abs().sum())
    assert tv_trained < 0.15 and tv_untrained > 0.4, (tv_trained, tv_untrained)
    assert sum(res.history[-100:]) < 0.95 * sum(res.history[:100])


def test_train_step_and_batches_with_a_mixture_path():
    path = D.CosineMixturePath(V, "uniform", loss="gkl")
    data, w = toy()
    model = D.TokenMLP(L, V, hidden=16, depth=1, mask=False)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    batches = cfmlib.training.Batches(data, 32, path=path, generator=torch.Generator().manual_seed(0))
    b = batches.next()
    assert b.x0.shape == (32, 2, L) and b.x1.dtype == torch.long and float(b.t.max()) <= path.t_max
    loss = cfmlib.train_step(model, opt, b, path)
    assert torch.isfinite(loss)


def test_checkpoint_rebuilds_the_token_model(tmp_path):
    assert MODELS["token_mlp"] is D.TokenMLP
    model = D.TokenMLP(L, V, hidden=16, depth=1, time_features=0)
    assert data_shape(model) == (L,) and build_model(model.config).config == model.config
    res = cfmlib.train(model, toy()[0], path=D.PolynomialMixturePath(V), steps=3, batch_size=8, progress=False,
                       device="cpu", checkpoint=tmp_path / "m.pt")
    again = load_model(tmp_path / "m.pt")
    x, t = toy()[0][:5], torch.full((5,), 0.3)
    assert torch.allclose(again(x, t), res.ema(x, t))


# ----------------------------------------------------------------------------------------- metrics and tokens
def test_tv_metric():
    a = torch.tensor([[0, 1], [0, 1], [1, 1], [2, 0]])
    b = torch.tensor([[0, 1], [1, 1], [1, 1], [3, 3]])
    assert metrics.tv(a, b) == 0.5 and metrics.tv(a, a) == 0.0 and metrics.tv(a, a[[3, 2, 1, 0]]) == 0.0
    assert metrics.tv(a, torch.tensor([[9, 9]])) == 1.0
    assert math.isclose(metrics.tv(a, a[:2]), 0.5)  # unequal sizes: {01: 1/2, 11: 1/4, 20: 1/4} vs {01: 1}
    with pytest.raises(ValueError, match="same shape"):
        metrics.tv(a, a[:, :1])


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 9), st.integers(0, 10_000))
def test_quantise_roundtrip(levels, seed):
    x = torch.rand(50, 7, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    tok = D.quantise(x, levels)
    assert tok.dtype == torch.long and int(tok.min()) >= 0 and int(tok.max()) < levels
    assert float((D.dequantise(tok, levels) - x).abs().max()) <= 1.0 / levels + 1e-6
    assert torch.equal(D.quantise(D.dequantise(tok, levels), levels), tok)


# ----------------------------------------------------------------------------------------- bad input
def test_bad_input_gets_clear_errors():
    path = D.PolynomialMixturePath(V)
    model = D.TokenMLP(L, V, hidden=16, depth=1)
    data = toy()[0]
    with pytest.raises(ValueError, match="source"):
        D.PolynomialMixturePath(V, "gaussian")
    with pytest.raises(ValueError, match="loss"):
        D.PolynomialMixturePath(V, loss="mse")
    with pytest.raises(TypeError, match="data must hold integer"):
        cfmlib.train(model, data.float(), path=path, steps=1, progress=False)
    with pytest.raises(ValueError, match=r"data must hold data tokens in \[0, 3\]"):
        cfmlib.train(model, data + 1, path=path, steps=1, progress=False)
    with pytest.raises(ValueError, match="coupling='independent'"):
        cfmlib.train(model, data, path=path, coupling="ot", steps=1, progress=False)
    with pytest.raises(ValueError, match="vocab_size=5"):
        cfmlib.train(model, data, path=D.PolynomialMixturePath(5), steps=1, progress=False)
    with pytest.raises(ValueError, match="mask=True"):
        cfmlib.cfm_loss(D.TokenMLP(L, V, mask=False), *_batch(path), path=path)
    x0, x1, t = _batch(path)
    with pytest.raises(ValueError, match="draw of path.draw_x0"):
        cfmlib.cfm_loss(model, x0[:, 0], x1, t, path=path)
    with pytest.raises(ValueError, match="source tokens of this path"):
        cfmlib.cfm_loss(model, D.PolynomialMixturePath(V, "uniform").draw_x0(x1), x1, t, path=path)
    with pytest.raises(ValueError, match=r"t must lie in \[0.0, 0.999\]"):
        cfmlib.cfm_loss(model, x0, x1, 1.0, path=D.PolynomialMixturePath(V, loss="gkl"))
    with pytest.raises(ValueError, match="logits must have shape"):
        path.posterior(torch.randn(2, L, V + 1), data[:2])
    with pytest.raises(ValueError, match="infinite"):
        path.conditional_velocity(data[:2], data[:2], 1.0)
    with pytest.raises(TypeError, match="MixturePath"):
        D.sample(model, 3, path=cfmlib.get_path("condot"))
    with pytest.raises(ValueError, match="the model's output must have shape"):
        D.sample(lambda x, t: torch.zeros(x.shape[0], L, V + 1), path=path, x0=path.sample_source((2, L)))
    with pytest.raises(ValueError, match="pass either n"):
        D.sample(model, path=path)
    with pytest.raises(ValueError, match="too many to enumerate"):
        D.enumerate_states(10, 10)
    with pytest.raises(ValueError, match="weights must be"):
        D.Marginal(data, path, torch.ones(3))
    with pytest.raises(ValueError, match="integer tokens of shape"):
        model(data.float(), 0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda():
    path = D.PolynomialMixturePath(V)
    data, w = toy()
    res = cfmlib.train(D.TokenMLP(L, V, hidden=32, depth=1), data, path=path, steps=20, batch_size=32,
                       progress=False, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = D.sample(res.ema, 16, path=path, steps=4, generator=g).x
    assert x.device.type == "cuda" and bool((x < V).all())
    m = D.Marginal(data.cuda(), path, w.cuda())
    assert m.posterior(x, 0.5).device.type == "cuda"
