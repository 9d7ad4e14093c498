"""No solver outside its interval, no silent infinity at a path's end, nothing lost on a failing call.

* Every solve evaluates the field only inside the interval it integrates over: a field that refuses
  other times is solved with every method, forward and backward, and through the likelihood and
  sampling entry points (torchdiffeq's adaptive methods would otherwise step past the end and
  interpolate back).
* A path used where its field is infinite gives an error (the VP target at t = 1, checked in the
  bad-input table) or the finite limit (the analytic marginal field of the VP path at t = 1).
* A failing call leaves an existing checkpoint byte for byte unchanged.
"""
import numpy as np
import pytest
import torch

from cfmlib import analytic, checkpoint, likelihood, models, paths, solvers, training
from cfmlib.errors import NonFiniteLossError

D64 = torch.float64


class Refuses:
    """Wraps a field; raises when called at a time outside [lo, hi] and records the times seen."""

    def __init__(self, inner, lo, hi):
        self.inner, self.lo, self.hi, self.seen = inner, lo, hi, []

    def __call__(self, x, t, **kwargs):
        t_min, t_max = float(t.min()), float(t.max())
        self.seen.append((t_min, t_max))
        if t_min < self.lo or t_max > self.hi:
            raise AssertionError(f"the field was evaluated at t in [{t_min}, {t_max}], outside [{self.lo}, {self.hi}]")
        return self.inner(x, t, **kwargs)


def _mixture():
    means = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]], dtype=D64)
    return analytic.GaussianMixture(means, 0.4)


@pytest.mark.parametrize("method", solvers.ADAPTIVE_METHODS)
@pytest.mark.parametrize("t0, t1", [(0.0, 1.0), (1.0, 0.0), (0.2, 0.7)])
def test_every_solve_stays_inside_its_interval(method, t0, t1):
    marginal = analytic.Marginal(_mixture(), "condot")
    field = Refuses(marginal, min(t0, t1), max(t0, t1))
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=D64)
    sol = solvers.odeint(field, x, t0, t1, method=method, atol=1e-4, rtol=1e-4)
    reference = solvers.odeint(marginal, x, t0, t1, method="rk4", steps=200).x
    # a sanity check of the result (the exactness of the confined solve is tested with dopri5 below)
    assert float((sol.x - reference).abs().max()) < 0.1
    # and the whole interval was visited (up to the rounding of t0 + (t1 - t0))
    assert min(s[0] for s in field.seen) == pytest.approx(min(t0, t1), abs=1e-12)
    assert max(s[1] for s in field.seen) == pytest.approx(max(t0, t1), abs=1e-12)


@pytest.mark.parametrize("method", solvers.ADAPTIVE_METHODS)
@pytest.mark.parametrize("t0, t1", [(0.0, 0.999), (0.999, 0.0), (0.2, 0.7), (0.0, 1.0)])
def test_float32_solves_stay_inside_ends_that_float32_rounds(method, t0, t1):
    """0.999 and 0.7 round upwards in float32: the solve must still end on the grid's end point, not
    reach t1 a hair early and overshoot with one more, unconfined step (cfmlib raises if it does)."""
    torch.manual_seed(0)
    net = models.MLP(dim=2, hidden=32, depth=2)
    f32 = lambda v: float(torch.tensor(v, dtype=torch.float32))  # noqa: E731 - the times the float32 field sees
    field = Refuses(net, f32(min(t0, t1)), f32(max(t0, t1)))
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    sol = solvers.odeint(field, x, t0, t1, method=method, atol=1e-5, rtol=1e-5, trajectory=True, steps=4)
    reference = solvers.odeint(net, x, t0, t1, method="rk4", steps=400).x
    assert float((sol.x - reference).abs().max()) < 1e-2
    assert sol.trajectory.shape[0] == 5


def test_log_prob_with_dopri5_never_leaves_zero_to_one_and_is_exact():
    q = _mixture()
    marginal = analytic.Marginal(q, "condot")
    x1 = q.sample(32, generator=torch.Generator().manual_seed(1))
    res = likelihood.log_prob(Refuses(marginal, 0.0, 1.0), x1, atol=1e-7, rtol=1e-7)  # default method: dopri5
    assert torch.allclose(res.log_prob, q.log_prob(x1), atol=1e-4)
    fwd = likelihood.sample_with_log_prob(Refuses(marginal, 0.0, 1.0), res.x0, atol=1e-7, rtol=1e-7)
    assert torch.allclose(fwd.x1, x1, atol=1e-4)


@pytest.mark.parametrize("path", ["vp", "condot"])
def test_sampling_a_network_stops_at_the_paths_t_max(path):
    torch.manual_seed(0)
    net = models.MLP(dim=2, hidden=16, depth=1).double()
    t_max = paths.get_path(path).t_max
    field = Refuses(net, 0.0, t_max)
    solvers.sample(field, x0=torch.randn(32, 2, dtype=D64), path=path, method="dopri5")
    assert max(s[1] for s in field.seen) == pytest.approx(t_max, abs=1e-12)


def test_vp_marginal_field_at_t1_is_the_finite_limit():
    """At t = 1 the VP path has sigma = 0 and an infinite d_sigma; the marginal field of a mixture with
    widths > 0 still has a finite limit, which the library returns (not NaN)."""
    q = _mixture()
    marginal = analytic.Marginal(q, "vp")
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(3), dtype=D64) * 2
    at_one = marginal.field(x, 1.0)
    near_one = marginal.field(x, 1.0 - 1e-9)
    assert torch.isfinite(at_one).all()
    assert torch.allclose(at_one, near_one, atol=1e-6)
    # the limit is not trivially zero: the VP field at the data end is 0.5 beta(0) x - ... (beta_min > 0)
    assert float(at_one.abs().max()) > 1e-3
    # and the unstable form d_sigma * sigma * (...) would be NaN here: sigma_d_sigma is what keeps it finite
    p = paths.VPPath()
    one = torch.ones(1, dtype=D64)
    assert not torch.isfinite(p.d_sigma(one)).all() and torch.isfinite(p.sigma_d_sigma(one)).all()


# --- a failing call leaves an existing checkpoint untouched -----------------------------------------

def _mlp(hidden=8):
    torch.manual_seed(0)
    return models.MLP(dim=2, hidden=hidden, depth=1)


def _sampler(kind):
    def sample(n, generator=None):
        if kind == "numpy":
            return np.zeros((n, 2), dtype=np.float32)
        if kind == "wide":
            return torch.randn(n, 3, generator=generator)
        x = torch.randn(n, 2, generator=generator)
        if kind == "nan":
            x[0, 0] = float("nan")
        return x
    return sample


class Narrow(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 1)
        self.config = _mlp().config

    def forward(self, x, t, y=None):
        return self.lin(x)


def _train(*args, **kwargs):
    return training.train(*args, **dict(dict(batch_size=16, progress=False), **kwargs))


FAILING = {
    "bad lr": (lambda ck: _train(_mlp(), _sampler("ok"), lr=-1.0, checkpoint=ck), ValueError),
    "float64 data": (lambda ck: _train(_mlp(), torch.randn(64, 2, dtype=D64), checkpoint=ck), TypeError),
    "sampler returns numpy": (lambda ck: _train(_mlp(), _sampler("numpy"), checkpoint=ck), TypeError),
    "sampler wrong width": (lambda ck: _train(_mlp(), _sampler("wide"), checkpoint=ck), ValueError),
    "model of another size": (lambda ck: _train(_mlp(hidden=16), _sampler("ok"), checkpoint=ck), ValueError),
    "model output (batch, 1)": (lambda ck: _train(Narrow(), _sampler("ok"), checkpoint=ck), ValueError),
    "NaN data": (lambda ck: _train(_mlp(), _sampler("nan"), checkpoint=ck, checkpoint_every=1),
                 NonFiniteLossError),
    "fewer steps than the checkpoint": (lambda ck: _train(_mlp(), _sampler("ok"), steps=1, checkpoint=ck),
                                        ValueError),
    "vp path with a wrong-shaped model": (lambda ck: _train(Narrow(), _sampler("ok"), path="vp",
                                                                    checkpoint=ck), ValueError),
}


@pytest.mark.parametrize("name", list(FAILING))
def test_a_failing_call_leaves_the_checkpoint_byte_for_byte(name, tmp_path):
    ck = tmp_path / "run.pt"
    training.train(_mlp(), _sampler("ok"), steps=3, batch_size=16, progress=False, checkpoint=ck)
    before = ck.read_bytes()
    call, exc = FAILING[name]
    with pytest.raises(exc):
        call(ck)
    assert ck.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]  # no temporary file left behind
    checkpoint.load_checkpoint(ck)  # and it still loads


def test_gaussian_samplers_refuse_other_paths_and_name_the_right_sampler():
    from cfmlib import discrete, manifolds

    net = models.MLP(dim=3, hidden=8, depth=1)
    x = torch.randn(4, 3)
    for path, where in ((manifolds.GeodesicPath("sphere"), "cfmlib.manifolds.sample"),
                        (discrete.MixturePath(4), "cfmlib.discrete.sample")):
        for call in (lambda: solvers.sample(net, 4, path=path), lambda: likelihood.log_prob(net, x, path=path),
                     lambda: solvers.sdeint(net, x, path)):
            with pytest.raises(TypeError, match=where.replace(".", r"\.")):
                call()
    # a prediction path samples through the Gaussian path it wraps
    pp = paths.PredictionPath("condot", "x1")
    assert paths.gaussian_path(pp, "test") is pp.path
