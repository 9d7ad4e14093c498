"""Couplings (chapter 8): the exact minibatch OT permutation and reflow pairs."""
import itertools
import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from cfmlib.couplings import is_permutation, ot_pair, ot_permutation, pair, reflow_pairs, sq_cost
from cfmlib.metrics import straightness
from cfmlib.models import MLP
from cfmlib.solvers import odeint, sample
from cfmlib.training import cfm_loss, train


def _cost(x0, x1, perm):
    return float((x0[perm] - x1).pow(2).sum(1).sum())


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_ot_permutation_matches_brute_force(n):
    g = torch.Generator().manual_seed(n)
    for _ in range(5):
        x0 = torch.randn(n, 2, generator=g, dtype=torch.float64)
        x1 = torch.randn(n, 2, generator=g, dtype=torch.float64) * 2 + 1
        perm = ot_permutation(x0, x1)
        assert is_permutation(perm, n)
        best = min(_cost(x0, x1, torch.tensor(p)) for p in itertools.permutations(range(n)))
        assert _cost(x0, x1, perm) == pytest.approx(best, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("n,d", [(64, 2), (200, 5), (256, 2)])
def test_ot_permutation_matches_scipy_on_larger_batches(n, d):
    g = torch.Generator().manual_seed(n + d)
    x0 = torch.randn(n, d, generator=g, dtype=torch.float64)
    x1 = torch.randn(n, d, generator=g, dtype=torch.float64) + 0.5
    perm = ot_permutation(x0, x1)
    assert is_permutation(perm, n)
    c = sq_cost(x1, x0).numpy()  # rows: data, columns: noise
    r, col = linear_sum_assignment(c)
    assert _cost(x0, x1, perm) == pytest.approx(float(c[r, col].sum()), rel=1e-10)
    # and never worse than the identity (independent) pairing
    assert _cost(x0, x1, perm) <= _cost(x0, x1, torch.arange(n)) + 1e-9


def test_ot_permutation_never_duplicates_or_drops_even_with_ties():
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 17, 100):
        x = torch.randn(n, 3, generator=g)
        x_dup = torch.cat([x[: n // 2 + 1]] * 2)[:n]  # repeated points: many optimal plans
        for a, b in ((x, x), (x_dup, x), (torch.zeros(n, 3), x)):
            assert is_permutation(ot_permutation(a, b), n)
    x0, x1 = torch.randn(50, 2, generator=g), torch.randn(50, 2, generator=g)
    p0, p1 = ot_pair(x0, x1)
    assert torch.equal(p1, x1) and torch.equal(torch.sort(p0[:, 0]).values, torch.sort(x0[:, 0]).values)
    assert pair("independent", x0, x1)[0] is x0


def test_ot_permutation_identity_for_equal_sets_and_images():
    x = torch.randn(30, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    shuffle = torch.randperm(30, generator=torch.Generator().manual_seed(4))
    perm = ot_permutation(x[shuffle], x)
    assert torch.equal(x[shuffle][perm], x)


def test_label_aware_coupling_matches_within_labels_and_is_optimal():
    g = torch.Generator().manual_seed(5)
    n = 40
    y1 = torch.arange(n) % 4
    y0 = y1[torch.randperm(n, generator=g)]
    x0, x1 = torch.randn(n, 2, generator=g, dtype=torch.float64), torch.randn(n, 2, generator=g, dtype=torch.float64)
    perm = ot_permutation(x0, x1, labels0=y0, labels1=y1)
    assert is_permutation(perm, n)
    assert torch.equal(y0[perm], y1)
    # optimal: equals solving each label's block separately
    total = 0.0
    for k in range(4):
        i1, i0 = (y1 == k).nonzero()[:, 0], (y0 == k).nonzero()[:, 0]
        c = sq_cost(x1[i1], x0[i0]).numpy()
        r, col = linear_sum_assignment(c)
        total += float(c[r, col].sum())
    assert _cost(x0, x1, perm) == pytest.approx(total, rel=1e-10)
    with pytest.raises(ValueError, match="labels0"):
        ot_permutation(x0, x1, labels0=y0)
    with pytest.raises(ValueError, match="equally often"):
        ot_permutation(x0, x1, labels0=torch.zeros(n, dtype=torch.long), labels1=y1)


def test_ot_permutation_argument_errors():
    with pytest.raises(ValueError):
        ot_permutation(torch.randn(4, 2), torch.randn(5, 2))
    with pytest.raises(ValueError):
        ot_permutation(torch.randn(4), torch.randn(4))


def test_reflow_pairs_are_the_flow_of_the_model():
    torch.manual_seed(0)
    model = MLP(2, hidden=16, depth=1).eval()
    x0, x1 = reflow_pairs(model, 300, method="rk4", steps=10, generator=torch.Generator().manual_seed(1),
                          batch_size=128)
    assert x0.shape == x1.shape == (300, 2)
    # x0 is the seeded source draw, x1 its image under the model's flow (chunking changes nothing)
    assert torch.equal(x0, torch.randn(300, 2, generator=torch.Generator().manual_seed(1)))
    ref = odeint(model, x0, 0.0, 1.0, method="rk4", steps=10).x
    assert torch.allclose(x1, ref, atol=1e-6)
    again = reflow_pairs(model, 300, method="rk4", steps=10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again[0], x0) and torch.allclose(again[1], x1, atol=1e-6)
    with pytest.raises(ValueError, match="n"):
        reflow_pairs(model, 0)
    with pytest.raises(TypeError, match="model"):
        reflow_pairs(3, 10)


def test_training_on_reflow_pairs_straightens_the_flow():
    """One round of reflow: the new field's trajectories are straighter than the old one's."""
    from cfmlib.datasets import eight_gaussians

    q = eight_gaussians()
    base = train(MLP(2, hidden=64, depth=2), q, steps=400, batch_size=256, lr=3e-3, progress=False).ema
    x0, x1 = reflow_pairs(base, 4000, method="rk4", steps=20, generator=torch.Generator().manual_seed(2))
    res = train(MLP(2, hidden=64, depth=2), pairs=(x0, x1), steps=400, batch_size=256, lr=3e-3, progress=False)
    # the loss is the CFM loss on the given pairs
    assert math.isfinite(res.history[-1])
    assert float(cfm_loss(res.ema, x0[:512], x1[:512], torch.rand(512))) < 2.0
    z = torch.randn(500, 2, generator=torch.Generator().manual_seed(3))
    s_base = straightness(sample(base, x0=z, method="rk4", steps=20, trajectory=True).trajectory)
    s_reflow = straightness(sample(res.ema, x0=z, method="rk4", steps=20, trajectory=True).trajectory)
    assert s_reflow < 0.5 * s_base


def test_pairs_with_ot_coupling_is_rejected():
    x = torch.randn(20, 2)
    with pytest.raises(ValueError, match="pairs"):
        train(MLP(2, hidden=8, depth=1), pairs=(x, x), coupling="ot", steps=1, progress=False)


def test_straightness_of_a_quarter_circle_and_nonuniform_grids():
    # x_t = (cos(pi t / 2), sin(pi t / 2)): speed pi/2, chord length sqrt(2), S = pi^2/4 - 2
    for grid in (torch.linspace(0, 1, 2001, dtype=torch.float64),
                 torch.linspace(0, 1, 2001, dtype=torch.float64) ** 2):
        ang = grid * math.pi / 2
        traj = torch.stack([torch.cos(ang), torch.sin(ang)], -1)[:, None, :]
        assert straightness(traj, grid) == pytest.approx(math.pi**2 / 4 - 2, abs=1e-4)
    # coarse grids underestimate (Jensen), never overestimate
    coarse = torch.linspace(0, 1, 5, dtype=torch.float64)
    ang = coarse * math.pi / 2
    assert straightness(torch.stack([torch.cos(ang), torch.sin(ang)], -1)[:, None, :], coarse) < math.pi**2 / 4 - 2
    with pytest.raises(ValueError, match="increasing"):
        straightness(torch.zeros(3, 1, 2), torch.tensor([0.0, 0.5, 0.5]))
    back = torch.linspace(1, 0, 11)
    line = back[:, None, None] * torch.ones(1, 3, 2)
    assert straightness(line, back) == pytest.approx(0.0, abs=1e-10)
