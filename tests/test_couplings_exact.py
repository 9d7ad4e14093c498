"""The exact minibatch OT coupling: permutations with the optimal cost (scipy as the reference),
also on degenerate inputs, and training with the coupling prefetched in the background is bitwise
the same as without, and resumes exactly from a checkpoint."""
import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from cfmlib import _assignment, couplings, datasets, training
from cfmlib.models import MLP


def _opt_cost(cost):
    r, c = linear_sum_assignment(cost)
    return cost[r, c].sum()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 17, 64, 128, 255, 300])
def test_assignment_optimal_on_random_batches(n, dtype):
    """float64 and float32 cost matrices (float32 is what training passes, without a copy); the
    optimum is that of the given matrix, compared in float64."""
    rng = np.random.default_rng(n)
    for trial in range(4):
        if trial == 0:
            cost = rng.random((n, n))
        else:
            a, b = rng.normal(size=(n, 2)), rng.normal(size=(n, 2)) * (1 + trial)
            cost = ((a[:, None] - b[None]) ** 2).sum(-1)
        cost = cost.astype(dtype)
        col = _assignment.assignment(cost)
        assert sorted(col.tolist()) == list(range(n))
        exact = cost.astype(np.float64)
        got = exact[np.arange(n), col].sum()
        assert abs(got - _opt_cost(exact)) <= 1e-9 * max(1.0, abs(got))


def test_assignment_optimal_on_a_training_sized_batch():
    """n = 1024, the benchmark's large batch: 8 Gaussians against N(0, I), float32 as in training."""
    g = torch.Generator().manual_seed(0)
    cost = couplings.sq_cost(datasets.get_dataset("8gaussians")(1024, generator=g), torch.randn(1024, 2, generator=g))
    col = _assignment.assignment(cost)  # a tensor is accepted directly
    assert sorted(col.tolist()) == list(range(1024))
    exact = cost.double().numpy()
    assert abs(exact[np.arange(1024), col].sum() - _opt_cost(exact)) <= 1e-9 * exact.sum() / 1024


def test_assignment_non_finite_costs_go_to_scipy():
    """NaN is rejected (scipy's error), +inf marks a forbidden pair that the optimum avoids."""
    with pytest.raises(ValueError):
        _assignment.assignment(np.array([[0.0, np.nan], [1.0, 0.0]]))
    cost = np.array([[np.inf, 1.0], [1.0, 5.0]])
    assert _assignment.assignment(cost).tolist() == [1, 0]


def test_compiled_solver_is_keyed_by_processor(monkeypatch):
    """A build for this machine's vector instructions must not be reused on another processor (a home
    directory shared by several machines): the cache key includes the processor's flags."""
    assert _assignment._cpu_signature()
    here = _assignment._tag("cc", _assignment._FLAGS[0])
    assert here != _assignment._tag("cc", _assignment._FLAGS[1])
    monkeypatch.setattr(_assignment, "_cpu_signature", lambda: "flags : sse2")
    assert _assignment._tag("cc", _assignment._FLAGS[0]) != here


@pytest.mark.parametrize("kind", ["duplicated", "all_equal", "integer_ties", "one_point_repeated", "huge_offset"])
def test_assignment_degenerate_inputs(kind):
    rng = np.random.default_rng(0)
    n = 50
    if kind == "duplicated":
        a = np.repeat(rng.normal(size=(10, 2)), 5, axis=0)
        b = np.repeat(rng.normal(size=(5, 2)), 10, axis=0)
        cost = ((a[:, None] - b[None]) ** 2).sum(-1)
    elif kind == "all_equal":
        cost = np.full((n, n), 3.0)
    elif kind == "integer_ties":
        cost = rng.integers(0, 3, size=(n, n)).astype(float)
    elif kind == "one_point_repeated":
        a = np.zeros((n, 2))
        b = rng.normal(size=(n, 2))
        cost = ((a[:, None] - b[None]) ** 2).sum(-1)
    else:
        cost = rng.random((n, n)) + 1e6
    col = _assignment.assignment(cost)
    assert sorted(col.tolist()) == list(range(n))
    got = cost[np.arange(n), col].sum()
    assert abs(got - _opt_cost(cost)) <= 1e-9 * max(1.0, abs(got))


def test_assignment_rejects_non_square():
    with pytest.raises(ValueError, match="square"):
        _assignment.assignment(np.zeros((3, 4)))


def test_assignment_without_warm_start_is_also_optimal():
    rng = np.random.default_rng(1)
    cost = rng.random((40, 40))
    col = _assignment.assignment(cost, warm_start=False)
    assert abs(cost[np.arange(40), col].sum() - _opt_cost(cost)) <= 1e-9


@pytest.mark.parametrize("n", [2, 31, 256])
def test_ot_permutation_matches_scipy_cost(n):
    g = torch.Generator().manual_seed(n)
    x1 = datasets.get_dataset("8gaussians")(n, generator=g)
    x0 = torch.randn(n, 2, generator=g)
    perm = couplings.ot_permutation(x0, x1)
    assert couplings.is_permutation(perm, n)
    cost = couplings.sq_cost(x1, x0).double().numpy()
    assert abs(cost[np.arange(n), perm.numpy()].sum() - _opt_cost(cost)) <= 1e-9 * n


def _train(steps, **kw):
    torch.manual_seed(0)
    model = MLP(dim=2, hidden=32, depth=2)
    return training.train(model, datasets.get_dataset("moons"), coupling="ot", steps=steps, batch_size=64,
                          progress=False, device="cpu", seed=3, **kw)




def test_prefetched_coupling_draws_in_the_same_order():
    path = training.get_path("condot")
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    data = datasets.get_dataset("moons")
    pre = training.Batches(data, 64, path=path, coupling="ot", generator=gen_a)
    for _ in range(4):
        x0, x1, t, _ = next(pre)
        b = training.Batches(data, 64, path=path, coupling="independent", generator=gen_b)
        rx0, rx1, rt, _ = next(b)
        rx0 = rx0[couplings.ot_permutation(rx0, rx1)]
        assert torch.equal(x0, rx0) and torch.equal(x1, rx1) and torch.equal(t, rt)
        # between calls the generator holds the state at the step boundary
        assert torch.equal(gen_a.get_state(), gen_b.get_state())


def test_ot_training_resumes_bitwise_from_checkpoint(tmp_path):
    full = _train(12)
    ck = tmp_path / "ck.pt"
    _train(7, checkpoint=ck, checkpoint_every=7)
    resumed = _train(12, checkpoint=ck, checkpoint_every=7)
    assert resumed.history == full.history
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)
