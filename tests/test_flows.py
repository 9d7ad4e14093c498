"""Tests for cfmlib.flows: the affine-coupling flow of chapter 1."""
import math

import pytest
import torch

from cfmlib import datasets, flows


def _random_flow(dim=2, n_layers=4, hidden=16, dtype=torch.float64, seed=0):
    """A flow whose output heads are randomised, so that it is far from the identity."""
    torch.manual_seed(seed)
    flow = flows.AffineCouplingFlow(dim=dim, n_layers=n_layers, hidden=hidden).to(dtype)
    for layer in flow.layers:
        torch.nn.init.normal_(layer.net[-1].weight, std=0.5)
        torch.nn.init.normal_(layer.net[-1].bias, std=0.3)
    return flow


@pytest.mark.parametrize("dim", [2, 3, 5])
def test_inverse_of_forward_is_identity(dim):
    flow = _random_flow(dim=dim)
    x = 3 * torch.randn(200, dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        z, _ = flow(x)
        assert torch.allclose(flow.inverse(z), x, atol=1e-10)
        assert torch.allclose(flow(flow.inverse(x))[0], x, atol=1e-10)


def test_new_flow_is_identity():
    flow = flows.AffineCouplingFlow(dim=3, n_layers=2, hidden=8)
    x = torch.randn(10, 3)
    z, logdet = flow(x)
    assert torch.equal(z, x) and torch.equal(logdet, torch.zeros(10))


@pytest.mark.parametrize("dim", [2, 4])
def test_logdet_matches_autograd(dim):
    flow = _random_flow(dim=dim)
    x = torch.randn(32, dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: flow(v)[0].sum(0), x).permute(1, 0, 2)
    sign, logdet_autograd = torch.linalg.slogdet(jac)
    _, logdet = flow(x)
    assert bool((sign > 0).all())  # coupling layers preserve orientation
    assert torch.allclose(logdet, logdet_autograd, atol=1e-10)


def test_log_prob_is_change_of_variables():
    flow = _random_flow()
    x = torch.randn(16, 2, dtype=torch.float64)
    z, logdet = flow(x)
    expected = -0.5 * z.pow(2).sum(1) - math.log(2 * math.pi) + logdet
    assert torch.allclose(flow.log_prob(x), expected)


def test_density_integrates_to_one_on_grid():
    flow = _random_flow(n_layers=3)
    grid = torch.linspace(-10, 10, 401, dtype=torch.float64)
    dx = (grid[1] - grid[0]).item()
    gx, gy = torch.meshgrid(grid, grid, indexing="xy")
    with torch.no_grad():
        mass = flow.log_prob(torch.stack([gx.flatten(), gy.flatten()], 1)).exp().sum().item() * dx**2
    assert abs(mass - 1) < 1e-2


def test_sample_is_seeded_and_has_right_shape():
    flow = _random_flow(dtype=torch.float32)
    a = flow.sample(50, generator=torch.Generator().manual_seed(3))
    b = flow.sample(50, generator=torch.Generator().manual_seed(3))
    assert a.shape == (50, 2) and torch.equal(a, b)


def test_training_decreases_nll():
    torch.manual_seed(0)
    flow = flows.AffineCouplingFlow(dim=2, n_layers=4, hidden=32)
    data = datasets.eight_gaussians()
    x = data(2000, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = -flow.log_prob(x).mean().item()
    history = flows.train_flow(flow, data, steps=200, batch_size=128, lr=3e-3, seed=0, progress=False)
    with torch.no_grad():
        after = -flow.log_prob(x).mean().item()
    assert len(history) == 200 and all(math.isfinite(h) for h in history)
    assert after < before - 0.5


def test_training_from_tensor_is_reproducible():
    x = datasets.get_dataset("moons")(500, generator=torch.Generator().manual_seed(5))
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        flow = flows.AffineCouplingFlow(dim=2, n_layers=2, hidden=16)
        runs.append(flows.train_flow(flow, x, steps=20, batch_size=64, seed=1, progress=False))
    assert runs[0] == runs[1]


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(dim=1), ValueError, "dim must be at least 2"),
    (dict(dim=2.0), TypeError, "dim"),
    (dict(n_layers=0), ValueError, "n_layers"),
    (dict(hidden=-3), ValueError, "hidden"),
    (dict(scale_bound=0.0), ValueError, "scale_bound"),
])
def test_constructor_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        flows.AffineCouplingFlow(**kwargs)


def test_bad_inputs_raise_clear_errors():
    flow = flows.AffineCouplingFlow(dim=2, n_layers=2, hidden=8)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        flow.log_prob([[0.0, 1.0]])
    with pytest.raises(ValueError, match=r"shape \(batch, 2\)"):
        flow.log_prob(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="dimensions"):
        flow.log_prob(torch.zeros(4))
    with pytest.raises(TypeError, match="dtype"):
        flow.log_prob(torch.zeros(4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN"):
        flow.inverse(torch.tensor([[float("nan"), 0.0]]))
    with pytest.raises(ValueError, match="n must be a positive int"):
        flow.sample(0)
    with pytest.raises(ValueError, match="mask"):
        flows.AffineCoupling(torch.tensor([1.0, 1.0]))


def test_train_flow_rejects_bad_arguments():
    flow = flows.AffineCouplingFlow(dim=2, n_layers=2, hidden=8)
    data = datasets.get_dataset("moons")
    with pytest.raises(TypeError, match="flow must be an AffineCouplingFlow"):
        flows.train_flow(torch.nn.Linear(2, 2), data, steps=1)
    with pytest.raises(ValueError, match="steps"):
        flows.train_flow(flow, data, steps=0)
    with pytest.raises(ValueError, match="lr"):
        flows.train_flow(flow, data, steps=1, lr=-1.0)
    with pytest.raises(TypeError, match="data must be a sampler"):
        flows.train_flow(flow, "moons", steps=1)
    with pytest.raises(ValueError, match=r"shape \(batch, 2\)"):
        flows.train_flow(flow, torch.zeros(10, 3), steps=1)
