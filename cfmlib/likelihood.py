r"""Log-densities by the instantaneous change of variables (chapters 2 and 7).

Along a trajectory of :math:`\dot x_t = v(x_t, t)`,

.. math::  \frac{d}{dt} \log p_t(x_t) = -\nabla\cdot v(x_t, t),
           \qquad \log p_1(x_1) = \log p_0(x_0) - \int_0^1 \nabla\cdot v(x_t, t)\, dt .

:func:`log_prob` integrates the state and the accumulated divergence together,
backward from data to noise, in one ODE solve.  The divergence is either
exact (the trace of the Jacobian, all ``D`` diagonal entries in one batched
backward pass through ``vmap``, not a Python loop over dimensions) or
Hutchinson's unbiased estimate :math:`\varepsilon^\top \frac{\partial v}{\partial x}\varepsilon`
with probes :math:`\varepsilon` fixed for the whole solve.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from . import _checks
from .paths import gaussian_path
from .solvers import ADAPTIVE_METHODS, FIXED_METHODS, METHODS, integrate
from .training import LossMonitor, draw_data

__all__ = ["divergence", "jacobian_trace", "log_prob", "sample_with_log_prob", "LogProbResult", "gaussian_log_prob",
           "train_cnf"]

#: Divergence estimators: the exact trace of the Jacobian, or Hutchinson's estimate.
DIVERGENCES = ("exact", "hutchinson")


def _basis(x: torch.Tensor) -> torch.Tensor:
    """``(D, batch, ...)``: the D unit vectors, each repeated over the batch."""
    d = x[0].numel()
    eye = torch.eye(d, dtype=x.dtype, device=x.device).reshape(d, 1, *x.shape[1:])
    return eye.expand(d, *x.shape)


def jacobian_trace(out: torch.Tensor, x: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    r"""The exact trace of :math:`\partial\,\mathrm{out} / \partial x` per sample, ``(batch,)``, for ``out``
    computed from ``x`` (which requires grad) sample by sample: all ``D`` diagonal entries from one
    batched backward pass. The building block of :func:`divergence`, without its argument checks,
    for code that evaluates the field itself (the solvers here, :mod:`cfmlib.manifolds`)."""
    basis = _basis(x)
    (jac_rows,) = torch.autograd.grad(out, x, grad_outputs=basis, is_grads_batched=True,
                                      create_graph=create_graph)  # (D, batch, ...): row i = e_i^T J
    d = basis.shape[0]
    return torch.einsum("ibi->b", jac_rows.reshape(d, x.shape[0], d))


def _div_hutchinson(out, x, eps, create_graph):
    # eps: (K, batch, ...) probes; one batched vector-Jacobian product for all of them
    (vjp,) = torch.autograd.grad(out, x, grad_outputs=eps, is_grads_batched=True, create_graph=create_graph)
    return (vjp * eps).flatten(2).sum(-1).mean(0)


def divergence(v, x: torch.Tensor, t, *, method: str = "exact", probes: torch.Tensor | None = None,
               create_graph: bool = False, **kwargs) -> torch.Tensor:
    r""":math:`\nabla\cdot v(x, t)` for each sample, shape ``(batch,)``.

    ``method='exact'`` takes the trace of the Jacobian; ``'hutchinson'`` averages
    :math:`\varepsilon^\top J \varepsilon` over ``probes`` of shape ``(K, batch, ...)``
    (default: one Rademacher probe).  ``v`` is called as ``v(x, t, **kwargs)``.
    """
    _checks.function("v", v)
    _checks.tensor("x", x)
    if x.ndim < 2:
        raise ValueError(f"x must be batched with shape (batch, ...), got shape {tuple(x.shape)}")
    _checks.choice("divergence method", method, DIVERGENCES)
    t = _checks.time("t", t, x.shape[0], like=x)
    if probes is not None:
        _checks.tensor("probes", probes)
        if probes.shape[1:] != x.shape:
            raise ValueError(f"probes must have shape (K, *x.shape) = (K, {', '.join(map(str, x.shape))}), "
                             f"got {tuple(probes.shape)}")
    with torch.enable_grad():
        xg = x if x.requires_grad else x.detach().requires_grad_(True)
        out = v(xg, t, **kwargs)
        _checks.field_output("v", out, xg)
        if method == "exact":
            return jacobian_trace(out, xg, create_graph)
        eps = probes if probes is not None else (torch.randint(0, 2, (1, *x.shape), device=x.device) * 2 - 1).to(x.dtype)
        return _div_hutchinson(out, xg, eps, create_graph)


def gaussian_log_prob(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    r""":math:`\log \mathcal N(x; 0, \mathrm{scale}^2 I)` per sample, shape ``(batch,)``."""
    _checks.tensor("x", x, finite=False)
    if x.ndim < 2:
        raise ValueError(f"x must be batched with shape (batch, ...), got shape {tuple(x.shape)}")
    _checks.number("scale", scale, lo=0.0, lo_open=True)
    d = x[0].numel()
    return -0.5 * x.flatten(1).pow(2).sum(1) / scale**2 - d * math.log(scale) - 0.5 * d * math.log(2 * math.pi)


@dataclass
class LogProbResult:
    """``log_prob``: :math:`\\log p_1` of each point ``(batch,)``; ``x0``: the other end of each
    trajectory; ``x1``: the data end; ``nfe``: evaluations of the field in the solve."""

    log_prob: torch.Tensor
    x0: torch.Tensor
    x1: torch.Tensor
    nfe: int


def _dynamics(v, batch, method, eps, create_graph, kwargs):
    def f(t, state):
        x, _ = state
        tb = t.expand(batch)
        with torch.enable_grad():
            xg = x if (create_graph and x.requires_grad) else x.detach().requires_grad_(True)
            out = v(xg, tb, **kwargs)
            if method == "exact":
                div = jacobian_trace(out, xg, create_graph)
            else:
                div = _div_hutchinson(out, xg, eps, create_graph)
        if not create_graph:
            out, div = out.detach(), div.detach()
        return out, div
    return f


def _check_solve(v, x, method, steps, divergence_method, n_probes, atol, rtol, generator):
    _checks.function("v", v)
    _checks.tensor("x", x)
    if x.ndim < 2:
        raise ValueError(f"x must be batched with shape (batch, ...), got shape {tuple(x.shape)}")
    _checks.choice("method", method, METHODS)
    _checks.positive_int("steps", steps)
    _checks.choice("divergence", divergence_method, DIVERGENCES)
    _checks.positive_int("n_probes", n_probes)
    if method in ADAPTIVE_METHODS:
        _checks.number("atol", atol, lo=0.0, lo_open=True)
        _checks.number("rtol", rtol, lo=0.0, lo_open=True)
    _checks.generator("generator", generator)
    _checks.module_device("model", v, x=x)
    _checks.module_dtype("model", v, x=x)


def _probes(x, divergence_method, n_probes, generator):
    if divergence_method == "exact":
        return None
    dev = generator.device if generator is not None else x.device
    r = torch.randint(0, 2, (n_probes, *x.shape), generator=generator, device=dev)
    return (r * 2 - 1).to(device=x.device, dtype=x.dtype)


def log_prob(v, x1: torch.Tensor, *, path="condot", method: str = "dopri5", steps: int = 100, atol: float = 1e-5,
             rtol: float = 1e-5, divergence: str = "exact", n_probes: int = 1,
             generator: torch.Generator | None = None, create_graph: bool = False, **kwargs) -> LogProbResult:
    r""":math:`\log p_1(x_1)` under the flow of ``v`` with source :math:`N(0, \sigma_0^2 I)` of ``path``.

    Integrates :math:`(x_t, \ell_t)` backward from ``t = path.t_max`` to ``0`` with
    :math:`\dot\ell = \nabla\cdot v`, then :math:`\log p_1(x_1) = \log p_0(x_0) + \ell_0`.

    Args:
        v: the field, called as ``v(x, t, **kwargs)`` (a model or :class:`~cfmlib.analytic.Marginal`).
        x1: points ``(batch, ...)``.
        method, steps, atol, rtol: the ODE solver (see :func:`cfmlib.solvers.odeint`).
        divergence: ``'exact'`` or ``'hutchinson'`` (with ``n_probes`` Rademacher probes drawn from
            ``generator`` and fixed for the whole solve).
        create_graph: keep the graph for backpropagation (maximum-likelihood training of a CNF).
    """
    _check_solve(v, x1, method, steps, divergence, n_probes, atol, rtol, generator)
    path = gaussian_path(path, "cfmlib.likelihood.log_prob")
    eps = _probes(x1, divergence, n_probes, generator)
    f = _dynamics(v, x1.shape[0], divergence, eps, create_graph, kwargs)
    ell = torch.zeros(x1.shape[0], dtype=x1.dtype, device=x1.device)
    sol = integrate(f, (x1, ell), path.t_max, 0.0, method=method, steps=steps, atol=atol, rtol=rtol)
    x0, ell0 = sol.x
    return LogProbResult(gaussian_log_prob(x0, path.source_scale) + ell0, x0, x1, sol.nfe)


def sample_with_log_prob(v, x0: torch.Tensor, *, path="condot", method: str = "dopri5", steps: int = 100,
                         atol: float = 1e-5, rtol: float = 1e-5, divergence: str = "exact", n_probes: int = 1,
                         generator: torch.Generator | None = None, **kwargs) -> LogProbResult:
    r"""Sample and score in the same solve: integrate forward from ``x0`` (noise) and return the
    samples ``x1`` with :math:`\log p_1(x_1) = \log p_0(x_0) - \int_0^1 \nabla\cdot v\,dt`."""
    _check_solve(v, x0, method, steps, divergence, n_probes, atol, rtol, generator)
    path = gaussian_path(path, "cfmlib.likelihood.sample_with_log_prob")
    eps = _probes(x0, divergence, n_probes, generator)
    f = _dynamics(v, x0.shape[0], divergence, eps, False, kwargs)
    ell = torch.zeros(x0.shape[0], dtype=x0.dtype, device=x0.device)
    sol = integrate(f, (x0, ell), 0.0, path.t_max, method=method, steps=steps, atol=atol, rtol=rtol)
    x1, ell1 = sol.x
    return LogProbResult(gaussian_log_prob(x0, path.source_scale) - ell1, x0, x1, sol.nfe)


def train_cnf(model, data, *, steps: int, batch_size: int = 256, lr: float = 1e-3, method: str = "rk4",
              ode_steps: int = 4, divergence: str = "exact", seed: int = 0, progress: bool = False) -> dict:
    r"""Train a continuous normalizing flow by maximum likelihood, the classical way (Chapter 2).

    Each step draws a minibatch :math:`x_1^{(1)}, \dots, x_1^{(n)}` and takes one Adam step on

    .. math::  \mathcal L_{\mathrm{ML}}(\theta) = -\frac1n \sum_{i=1}^n \log p_1^\theta(x_1^{(i)}),
               \qquad \log p_1^\theta(x_1) = \log p_0(x_0) - \int_0^1 \nabla\cdot v_\theta(x_t, t)\, dt ,

    where the log-density comes from :func:`log_prob` with a fixed-step solver and
    ``create_graph=True``: the backward pass goes through every solver step and through the
    divergence (a second-order derivative of the network).  Unlike flow matching
    (:func:`cfmlib.training.train`) every step simulates the ODE; this function exists to measure that cost.

    Args:
        model: the field :math:`v_\theta`, an ``nn.Module`` called as ``model(x, t)``; trained in place.
        data: a sampler ``data(n, generator=g)`` (every cfmlib 2D dataset) or a tensor ``(N, ...)``
            from which minibatches are drawn with replacement.
        steps: number of Adam steps; batch_size: points per step; lr: Adam's learning rate.
        method: a fixed-step solver (``'euler'``, ``'midpoint'``, ``'rk4'``), so that the cost per
            step is known in advance; ode_steps: its number of steps.
        divergence: ``'exact'`` or ``'hutchinson'`` (one Rademacher probe per point, fixed per solve).
        seed: seeds a CPU ``torch.Generator`` that draws every minibatch (and the probes), so a run
            sees the same data on every device.  The weights are initialized by the caller.

    Returns:
        ``dict(history=[loss per step], nfe_per_step=int, seconds=float)``; ``nfe_per_step`` counts the
        forward evaluations of the field in one solve (``4 * ode_steps`` for RK4).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {_checks.describe(model)}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    _checks.positive_int("steps", steps)
    _checks.positive_int("batch_size", batch_size)
    _checks.number("lr", lr, lo=0.0, lo_open=True)
    if method not in FIXED_METHODS:
        raise ValueError(f"method must be a fixed-step solver ({', '.join(FIXED_METHODS)}) so that the "
                         f"NFE per step is fixed, got {method!r}")
    _checks.positive_int("ode_steps", ode_steps)
    _checks.choice("divergence", divergence, DIVERGENCES)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {_checks.describe(seed)}")
    if isinstance(data, torch.Tensor):
        _checks.tensor("data", data)
        if data.ndim < 2 or data.shape[0] == 0:
            raise ValueError(f"data must be a non-empty tensor of shape (N, ...), got shape {tuple(data.shape)}")
    elif not callable(data):
        raise TypeError(f"data must be a sampler called as data(n, generator=...) or a tensor (N, ...), "
                        f"got {_checks.describe(data)}")

    device = params[0].device
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(params, lr=lr)
    monitor = LossMonitor(steps, device=device, check_every=1, progress=progress, desc="ML training",
                          what="the maximum-likelihood loss",
                          hint=f"Try a smaller lr (now {lr}) or more ode_steps (now {ode_steps}).")
    model.train()
    nfe = 0
    start = time.perf_counter()
    try:
        for step in range(steps):
            x1, _ = draw_data(data, batch_size, gen)
            if step == 0:
                _checks.module_dtype("model", model, data=x1)
            x1 = x1.to(device)
            out = log_prob(model, x1, method=method, steps=ode_steps, divergence=divergence, generator=gen,
                           create_graph=True)
            loss = -out.log_prob.mean()
            monitor.record(step, loss.detach())  # stops on NaN before the step is taken
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            nfe = out.nfe
    finally:
        monitor.close()
    return dict(history=monitor.history.cpu().tolist(), nfe_per_step=int(nfe), seconds=time.perf_counter() - start)
