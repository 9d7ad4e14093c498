"""Solvers: convergence orders on a linear ODE with a closed-form solution, backward inverts forward."""
import math

import numpy as np
import pytest
import torch

from cfmlib.solvers import odeint, sample
from cfmlib.models import MLP

# dx/dt = A x with A a rotation plus contraction: x(t) = expm(A t) x(0)
A = torch.tensor([[-0.5, -2.0], [2.0, -0.5]], dtype=torch.float64)


def field(x, t):
    assert t.shape == (x.shape[0],)
    return x @ A.T


def exact(x0, t):
    return x0 @ torch.linalg.matrix_exp(A * t).T


@pytest.mark.parametrize("method,order", [("euler", 1), ("midpoint", 2), ("rk4", 4)])
def test_convergence_order(method, order):
    x0 = torch.tensor([[1.0, 0.5], [-0.3, 2.0]], dtype=torch.float64)
    steps = np.array([16, 32, 64, 128])
    errs = [float((odeint(field, x0, 0.0, 1.0, method=method, steps=int(n)).x - exact(x0, 1.0)).abs().max())
            for n in steps]
    slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
    assert abs(slope - order) < 0.3, (method, slope)


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4", "dopri5"])
def test_nfe_counts(method):
    x0 = torch.randn(5, 2, dtype=torch.float64)
    sol = odeint(field, x0, method=method, steps=10)
    expected = {"euler": 10, "midpoint": 20, "rk4": 40}
    if method in expected:
        assert sol.nfe == expected[method]
    else:
        assert sol.nfe > 0
        assert torch.allclose(sol.x, exact(x0, 1.0), atol=1e-4)


@pytest.mark.parametrize("method", ["rk4", "dopri5"])
def test_backward_inverts_forward(method):
    x0 = torch.randn(20, 2, dtype=torch.float64)
    fwd = odeint(field, x0, 0.0, 1.0, method=method, steps=200, atol=1e-9, rtol=1e-9).x
    back = odeint(field, fwd, 1.0, 0.0, method=method, steps=200, atol=1e-9, rtol=1e-9).x
    assert torch.allclose(back, x0, atol=1e-7)


def test_trajectory_shapes():
    x0 = torch.randn(7, 2, dtype=torch.float64)
    for method in ("euler", "dopri5"):
        sol = odeint(field, x0, method=method, steps=8, trajectory=True)
        assert sol.trajectory.shape == (9, 7, 2)
        assert sol.times.shape == (9,)
        assert torch.equal(sol.trajectory[0], x0)
        assert torch.allclose(sol.trajectory[-1], sol.x)


def test_sample_from_model_shapes_and_kwargs():
    model = MLP(2, hidden=16, depth=1, num_classes=3)
    g = torch.Generator().manual_seed(0)
    sol = sample(model, 11, steps=3, generator=g, y=torch.zeros(11, dtype=torch.long))
    assert sol.x.shape == (11, 2) and sol.nfe == 3
    with pytest.raises(ValueError, match="n"):
        sample(model, None, steps=3)
