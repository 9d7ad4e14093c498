"""cfmlib.likelihood.train_cnf: maximum-likelihood CNF training (Chapter 2)."""
import pytest
import torch

from cfmlib import likelihood, models


def _gaussian(n, generator=None):
    return 0.5 * torch.randn(n, 2, generator=generator) + torch.tensor([1.0, -0.5])


def _model():
    torch.manual_seed(0)
    return models.MLP(dim=2, hidden=16, depth=2)


def test_nll_decreases_and_nfe():
    out = likelihood.train_cnf(_model(), _gaussian, steps=30, batch_size=128, lr=1e-2, ode_steps=2)
    h = out["history"]
    assert len(h) == 30 and out["seconds"] > 0
    assert sum(h[-5:]) / 5 < sum(h[:5]) / 5 - 0.2
    assert out["nfe_per_step"] == 4 * 2


def test_same_as_the_loop_of_chapter_2():
    data = _gaussian(500, torch.Generator().manual_seed(3))
    a, b = _model(), _model()
    lib = likelihood.train_cnf(a, data, steps=3, batch_size=64, lr=1e-3, method="midpoint", ode_steps=3, seed=5)
    opt, g, mine = torch.optim.Adam(b.parameters(), lr=1e-3), torch.Generator().manual_seed(5), []
    for _ in range(3):
        x1 = data[torch.randint(0, 500, (64,), generator=g)]
        loss = -likelihood.log_prob(b, x1, method="midpoint", steps=3, create_graph=True).log_prob.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        mine.append(loss.item())
    assert lib["history"] == mine and lib["nfe_per_step"] == 6
    assert all(torch.equal(p, r) for p, r in zip(a.parameters(), b.parameters()))


def test_hutchinson_runs():
    out = likelihood.train_cnf(_model(), _gaussian, steps=2, batch_size=32, divergence="hutchinson",
                               method="euler", ode_steps=3)
    assert out["nfe_per_step"] == 3 and len(out["history"]) == 2


@pytest.mark.parametrize("kwargs, err, word", [
    (dict(model=lambda x, t: x), TypeError, "model"),
    (dict(data=3), TypeError, "data"),
    (dict(data=torch.zeros(0, 2)), ValueError, "data"),
    (dict(steps=0), ValueError, "steps"),
    (dict(steps=2.5), TypeError, "steps"),
    (dict(batch_size=-1), ValueError, "batch_size"),
    (dict(lr=0.0), ValueError, "lr"),
    (dict(method="dopri5"), ValueError, "method"),
    (dict(ode_steps=0), ValueError, "ode_steps"),
    (dict(divergence="trace"), ValueError, "divergence"),
    (dict(seed="0"), TypeError, "seed"),
])
def test_bad_input(kwargs, err, word):
    args = dict(model=_model(), data=_gaussian, steps=1)
    args.update(kwargs)
    model, data = args.pop("model"), args.pop("data")
    with pytest.raises(err, match=word):
        likelihood.train_cnf(model, data, **args)
