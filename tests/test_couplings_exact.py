"""The exact minibatch OT coupling: permutations with the optimal cost (scipy as the reference),
and training with the coupling prefetched in the background is bitwise the same as without, and
resumes exactly from a checkpoint. The assignment solver itself: tests/test_assignment*.py."""
import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from cfmlib import couplings, datasets, training
from cfmlib.models import MLP


def _opt_cost(cost):
    r, c = linear_sum_assignment(cost)
    return cost[r, c].sum()


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
