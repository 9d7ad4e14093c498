"""The parts of training a reader can call, each pinned to its formula: every option changes what it
says it changes (a parameter the tests never vary is a parameter that could silently do nothing).

Hutchinson's estimator, the EMA update and its warm-up, label dropout, the cap of training times at
the path's t_max, gradient clipping, the OT coupling of the path's source points (not its noise),
loss weights, weight decay, time samplers, the reader's own loop against ``train``.
"""
import itertools
import math

import pytest
import torch

import cfmlib
from cfmlib import couplings, likelihood, models, paths, timesteps, training

D64 = torch.float64


def _mlp(seed=0, **kw):
    torch.manual_seed(seed)
    return models.MLP(**{"dim": 2, "hidden": 16, "depth": 2, **kw})


# --- Hutchinson's estimator ------------------------------------------------------------------------

def test_hutchinson_is_eps_J_eps_and_averages_to_the_trace():
    """For a linear field v(x) = A x the estimate with probe eps is eps^T A eps; over all 2^d
    Rademacher probes the average is exactly tr(A) (the off-diagonal terms cancel)."""
    g = torch.Generator().manual_seed(0)
    d = 3
    A = torch.randn(d, d, generator=g, dtype=D64)
    x = torch.randn(2, d, generator=g, dtype=D64)
    field = lambda y, t: y @ A.T  # noqa: E731
    signs = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=d)), dtype=D64)  # (8, d)
    probes = signs[:, None, :].expand(-1, 2, -1).contiguous()  # (K, batch, d)
    est = likelihood.divergence(field, x, 0.5, method="hutchinson", probes=probes)
    assert torch.allclose(est, torch.full((2,), float(torch.trace(A)), dtype=D64), atol=1e-12)
    one = likelihood.divergence(field, x, 0.5, method="hutchinson", probes=probes[:1])
    assert torch.allclose(one, (signs[0] @ A @ signs[0]).expand(2), atol=1e-12)
    assert not torch.allclose(one, torch.full((2,), float(torch.trace(A)), dtype=D64))


def test_hutchinson_log_prob_is_unbiased_for_a_network():
    torch.manual_seed(1)
    net = models.MLP(dim=2, hidden=16, depth=2).double()
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(2), dtype=D64)
    exact = likelihood.divergence(net, x, 0.3)
    g = torch.Generator().manual_seed(3)
    probes = (torch.randint(0, 2, (4000, 3, 2), generator=g) * 2 - 1).to(D64)
    per_probe = torch.stack([likelihood.divergence(net, x, 0.3, method="hutchinson", probes=p[None]) for p in probes[:400]])
    mean, se = per_probe.mean(0), per_probe.std(0) / math.sqrt(per_probe.shape[0])
    assert bool(((mean - exact).abs() < 4 * se + 1e-12).all()), (mean, exact, se)


# --- EMA ---------------------------------------------------------------------------------------------

def test_ema_update_is_the_convex_combination_with_warm_up():
    model = torch.nn.Linear(2, 1)
    ema = training.EMA(model, decay=0.9)
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(5) == pytest.approx(6 / 15)
    assert ema.decay_at(10_000) == 0.9
    old = [p.detach().clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(10_000)  # decay 0.9: ema <- 0.9 ema + 0.1 model
    for e, o, p in zip(ema.model.parameters(), old, model.parameters()):
        assert torch.allclose(e, 0.9 * o + 0.1 * p)
        assert not e.requires_grad
    zero = training.EMA(model, decay=0.0)
    with torch.no_grad():
        next(model.parameters()).add_(5.0)
    zero.update(3)
    assert not torch.equal(next(zero.model.parameters()), next(model.parameters()))  # copied only on sync
    zero.sync()
    assert torch.equal(next(zero.model.parameters()), next(model.parameters()))


# --- batches: label dropout, the time cap, the coupling's source points ----------------------------------

def test_label_dropout_replaces_the_given_fraction_by_the_null_label():
    x = torch.randn(100, 2)
    y = torch.randint(0, 3, (100,))
    b = training.Batches((x, y), 20_000, label_dropout=0.3, num_classes=3, generator=torch.Generator().manual_seed(0))
    batch = next(b)
    frac = float((batch.y == 3).double().mean())
    assert abs(frac - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 20_000)
    kept = batch.y != 3
    assert bool((batch.y[kept] < 3).all())
    none = next(training.Batches((x, y), 5000, label_dropout=0.0, num_classes=3))
    assert not bool((none.y == 3).any())


@pytest.mark.parametrize("name", ["vp", "condot"])
def test_training_times_fill_zero_to_t_max(name):
    path = paths.get_path(name)
    b = next(training.Batches(torch.randn(10, 2), 20_000, path=path, generator=torch.Generator().manual_seed(1)))
    assert float(b.t.max()) <= path.t_max and float(b.t.min()) >= 0.0
    assert float(b.t.max()) > path.t_max - 1e-3 and abs(float(b.t.mean()) - path.t_max / 2) < 0.01
    if name == "vp":
        assert float(b.t.max()) < 1.0


class Recording(couplings.Coupling):
    """A coupling that records the source points it is given (and keeps the order)."""

    name = "recording"

    def __init__(self):
        self.sources = []

    def indices(self, source, x1):
        self.sources.append(source.clone())
        return None, None


def test_couplings_see_the_paths_source_points_not_its_noise():
    """The VE path's source is sigma_max x0: a coupling must be given sigma_max x0, in ``train``'s
    batches and in the public ``pair`` alike. (The exact OT plan with squared cost happens not to
    depend on a positive scale of the source, but a coupling in general does.)"""
    path = paths.VEPath(sigma_min=0.01, sigma_max=5.0)
    g = torch.Generator().manual_seed(2)
    x1 = torch.randn(64, 2, generator=g) * 0.5 + 2.0
    x0 = torch.randn(64, 2, generator=g)
    rec = Recording()
    couplings.pair(rec, x0, x1, path=path)
    assert torch.equal(rec.sources[-1], path.source_scale * x0)
    couplings.pair(rec, x0, x1)  # without a path, x0 are the source points themselves
    assert torch.equal(rec.sources[-1], x0)
    batch = next(training.Batches(torch.randn(100, 2), 16, path=path, coupling=rec, prefetch=False,
                                  generator=torch.Generator().manual_seed(3)))
    assert torch.equal(rec.sources[-1], path.source_scale * batch.x0)
    # exact OT with squared cost: sum |a_pi(i) - b_i|^2 = const - 2 sum a_pi(i) . b_i, so scaling a changes nothing
    assert torch.equal(couplings.ot_permutation(path.source_scale * x0, x1), couplings.ot_permutation(x0, x1))


# --- one step: clipping, weights, weight decay ----------------------------------------------------------------

def test_gradient_clipping_bounds_the_sgd_step():
    model = _mlp()
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    g = torch.Generator().manual_seed(4)
    batch = (torch.randn(32, 2, generator=g), 10 * torch.randn(32, 2, generator=g), torch.rand(32, generator=g))
    training.train_step(model, torch.optim.SGD(model.parameters(), lr=1.0), batch, grad_clip=1e-3)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert float((after - before).norm()) == pytest.approx(1e-3, rel=1e-4)


def test_train_clips_gradients(monkeypatch):
    norms = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *args, **kwargs):
        params = list(params)
        out = real(params, max_norm, *args, **kwargs)
        norms.append(float(torch.cat([p.grad.flatten() for p in params]).norm()))
        return out

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    cfmlib.train(_mlp(), torch.randn(64, 2) * 10, steps=3, batch_size=16, grad_clip=0.01, progress=False)
    assert len(norms) == 3 and max(norms) <= 0.01 * (1 + 1e-5)


def test_loss_weights_weight_each_sample():
    model = _mlp()
    g = torch.Generator().manual_seed(5)
    x0, x1, t = torch.randn(8, 2, generator=g), torch.randn(8, 2, generator=g), torch.rand(8, generator=g)
    w = torch.rand(8, generator=g)
    xt = t[:, None] * x1 + (1 - t[:, None]) * x0
    per_sample = ((model(xt, t) - (x1 - x0)) ** 2).sum(1)
    assert torch.allclose(training.cfm_loss(model, x0, x1, t, weight=w), (w * per_sample).mean())
    assert torch.allclose(training.cfm_loss(model, x0, x1, t), per_sample.mean())


def test_condot_target_uses_sigma_min():
    """Written out by hand, independent of the library's fused formula."""
    model = _mlp()
    smin = 0.1
    g = torch.Generator().manual_seed(6)
    x0, x1, t = torch.randn(8, 2, generator=g), torch.randn(8, 2, generator=g), torch.rand(8, generator=g)
    xt = t[:, None] * x1 + (1 - (1 - smin) * t[:, None]) * x0
    ut = x1 - (1 - smin) * x0
    expected = ((model(xt, t) - ut) ** 2).sum(1).mean()
    assert torch.allclose(training.cfm_loss(model, x0, x1, t, path=paths.CondOTPath(sigma_min=smin)), expected)
    xt_lib, ut_lib = paths.CondOTPath(sigma_min=smin).sample(x0, x1, t)
    assert torch.allclose(xt_lib, xt) and torch.allclose(ut_lib, ut)


def test_weight_decay_changes_the_weights():
    data = torch.randn(64, 2)
    kw = dict(steps=5, batch_size=16, lr=1e-2, progress=False, ema_decay=0.0)
    plain = cfmlib.train(_mlp(), data, **kw).model
    decayed = cfmlib.train(_mlp(), data, weight_decay=10.0, **kw).model
    w_plain = torch.cat([p.detach().flatten() for p in plain.parameters()])
    w_decayed = torch.cat([p.detach().flatten() for p in decayed.parameters()])
    assert float(w_decayed.norm()) < float(w_plain.norm())


# --- time samplers -------------------------------------------------------------------------------------

def test_time_samplers_have_their_laws():
    g = torch.Generator().manual_seed(7)
    t = timesteps.logit_normal(0.5, 2.0)(50_000, generator=g, dtype=D64)
    z = torch.log(t / (1 - t))
    assert abs(float(z.mean()) - 0.5) < 0.05 and abs(float(z.std()) - 2.0) < 0.05
    u = timesteps.uniform()(50_000, generator=g)
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.003
    m0 = timesteps.mode(0.0)(50_000, generator=g)  # s = 0 is uniform
    assert abs(float(m0.mean()) - 0.5) < 0.01
    m = timesteps.mode(1.29)(50_000, generator=g)  # heavier in the middle than uniform
    assert float(((m > 0.25) & (m < 0.75)).double().mean()) > 0.55
    for sampler in (timesteps.uniform(), timesteps.logit_normal(), timesteps.mode()):
        x = sampler(1000, generator=g)
        assert float(x.min()) >= 0 and float(x.max()) <= 1


def test_train_uses_the_time_sampler(monkeypatch):
    seen = []
    real = paths.AffinePath.loss

    def spy(self, model, x0, x1, t, y=None, weight=None):
        seen.append(t.detach().clone())
        return real(self, model, x0, x1, t, y, weight)

    monkeypatch.setattr(paths.AffinePath, "loss", spy)
    cfmlib.train(_mlp(), torch.randn(64, 2), steps=1, batch_size=4096, time_sampler=timesteps.logit_normal(0, 0.1),
                 progress=False)
    assert abs(float(seen[0].std()) - 0.025) < 0.005  # sigmoid(N(0, 0.1^2)) has spread 0.025


# --- the reader's own loop is train's loop ----------------------------------------------------------

@pytest.mark.parametrize("coupling", ["independent", "ot"])
def test_a_readers_loop_with_the_public_pieces_equals_train(coupling):
    data = cfmlib.get_dataset("moons")
    steps, batch = 6, 32
    reference = cfmlib.train(_mlp(), data, coupling=coupling, steps=steps, batch_size=batch, lr=1e-2,
                             ema_decay=0.9, seed=3, progress=False, device="cpu")
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ema = training.EMA(model, 0.9)
    batches = training.Batches(data, batch, coupling=coupling, generator=torch.Generator().manual_seed(3))
    history = []
    for step in range(steps):
        loss = training.train_step(model, opt, next(batches), ema=ema, step=step)
        history.append(float(loss))
    batches.close()
    assert history == pytest.approx(reference.history, abs=0, rel=0)
    for p, q in zip(ema.model.parameters(), reference.ema.parameters()):
        assert torch.equal(p, q)


def test_a_nan_stops_training_within_check_every_steps():
    calls = []

    def sampler(n, generator=None):
        calls.append(1)
        x = torch.randn(n, 2, generator=generator)
        if len(calls) == 3:
            x[0] = float("nan")
        return x

    with pytest.raises(cfmlib.errors.NonFiniteLossError, match="step 3"):
        cfmlib.train(_mlp(), sampler, steps=50, batch_size=8, check_every=2, progress=False)
    assert len(calls) <= 4  # stopped at the first check after the bad step, not at the end


def test_value_checks_run_every_call_on_cpu_and_on_calls_1_2_4_8_on_an_accelerator():
    from types import SimpleNamespace

    from cfmlib import _checks

    on_gpu = SimpleNamespace(device=torch.device("cuda", 0))
    due = [_checks.values_due("test-gpu-key", on_gpu) for _ in range(20)]
    assert [i + 1 for i, d in enumerate(due) if d] == [1, 2, 4, 8, 16]
    assert all(_checks.values_due("test-cpu-key", torch.zeros(1)) for _ in range(5))
    assert not _checks.values_due("test-meta-key", torch.zeros(1, device="meta"))
