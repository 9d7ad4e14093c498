r"""Discrete flow matching: mixture paths on sequences of tokens (chapter 12).

The state space is the set of sequences :math:`x = (x^1, \dots, x^L)` whose tokens take one of
``vocab_size`` = :math:`V` data values :math:`\{0, \dots, V-1\}`; a *masked* source adds one more
state, the mask token :math:`m = V`.  A mixture path is fixed by its scheduler
:math:`\kappa_t` (increasing, :math:`\kappa_0 = 0`, :math:`\kappa_1 = 1`) and its source
:math:`p_0` (all mask, or uniform over the :math:`V` data values), one token at a time:

.. math::  p_t(x^i \mid x_1^i) = \kappa_t\,\delta_{x_1^i}(x^i) + (1 - \kappa_t)\, p_0(x^i),
           \qquad p_t(x \mid x_1) = \prod_i p_t(x^i \mid x_1^i).

Token :math:`i` of :math:`x_t` is :math:`x_1^i` when a uniform coin :math:`u^i` falls below
:math:`\kappa_t`, and its source value :math:`x_0^i` otherwise: it switches from source to data at
the random time :math:`\kappa^{-1}(u^i)`.  Everything else is derived from :math:`\kappa_t` in the
base class :class:`MixturePath`: samples ``xt``, the conditional probability velocity
:math:`u_t^i(\cdot \mid x, x_1) = \frac{\dot\kappa_t}{1 - \kappa_t}(\delta_{x_1^i} - \delta_{x^i})`,
the marginal velocity from a data prediction (the posterior :math:`p_{1|t}`), the losses
(cross-entropy, or the generalised KL of Lipman et al., 2024), and one Euler jump.  Adding a
scheduler means writing :meth:`MixturePath.kappa` (and, for speed, its derivative).

Around the path: :class:`TokenMLP`, a network mapping tokens ``(batch, L)`` and times ``(batch,)``
to logits ``(batch, L, V)`` of :math:`p_{1|t}`; :func:`sample`, the Euler-jump sampler;
:class:`Marginal`, the exact marginal path and velocity of a finite data distribution (state
spaces small enough to enumerate); :func:`kolmogorov_residual`, the Kolmogorov forward equation
checked state by state; :func:`sampler_distribution`, the exact law of :func:`sample`'s output on
an enumerable space; :func:`quantise` / :func:`dequantise` between grey levels and tokens.

A path object trains with :func:`cfmlib.training.train` like any other path:
``train(TokenMLP(L, V), tokens, path=PolynomialMixturePath(V))`` with ``tokens`` a long tensor
``(N, L)``.  Shapes: ``x``, ``x1``, ``xt`` are long tensors ``(batch, ...)`` of tokens; the source
draw ``x0`` of :meth:`MixturePath.draw_x0` is a float tensor ``(batch, 2, ...)`` holding the source
tokens and the coins; ``t`` is a number or a ``(batch,)`` tensor in ``[0, 1]``.
"""
from __future__ import annotations

import math

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.nn import functional as F

from . import _checks
from .device import get_device
from .models import MODELS, data_shape, sinusoidal_embedding, time_as_batch
from .paths import ProbabilityPath
from .solvers import Solution

__all__ = ["MixturePath", "PolynomialMixturePath", "CosineMixturePath", "SOURCES", "LOSSES", "TokenMLP",
           "sample", "Marginal", "enumerate_states", "kolmogorov_residual", "sampler_distribution",
           "quantise", "dequantise"]

#: The source distributions of a mixture path: all mask tokens, or uniform over the data values.
SOURCES = ("mask", "uniform")
#: The training losses of a mixture path (:meth:`MixturePath.loss`).
LOSSES = ("ce", "gkl")

_MAX_STATES = 2**24  # tokens are stored exactly in the float32 source draw up to this many states


def _bc(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a ``(batch,)`` value to broadcast against ``x`` ``(batch, ...)``."""
    return s.reshape(-1, *([1] * (x.ndim - 1)))


def _tokens(name: str, x, hi: int, *, values: bool = True, what: str = "tokens") -> torch.Tensor:
    """Check a batched long tensor of tokens with values in ``[0, hi)``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer {what}, got {_checks.describe(x)}")
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer {what} (torch.long), got dtype {x.dtype}; discrete data are "
                        f"token indices, e.g. cfmlib.discrete.quantise(images, levels)")
    if x.ndim < 2:
        raise ValueError(f"{name} must be batched with shape (batch, L, ...), got shape {tuple(x.shape)}")
    if values and x.numel() and x.device.type != "meta":
        lo, top = int(x.min()), int(x.max())
        if lo < 0 or top >= hi:
            raise ValueError(f"{name} must hold {what} in [0, {hi - 1}], got values in [{lo}, {top}]")
    return x


class MixturePath(ProbabilityPath):
    r"""Base class: the mixture path :math:`p_t(x^i \mid x_1^i) = \kappa_t \delta_{x_1^i} + (1 - \kappa_t) p_0`
    of a scheduler :math:`\kappa_t` (chapter 12).

    Subclasses implement :meth:`kappa` (an increasing function of a ``(batch,)`` tensor ``t`` with
    :math:`\kappa_0 = 0`, :math:`\kappa_1 = 1`); :meth:`d_kappa` defaults to automatic differentiation
    and :meth:`kappa_inverse` to bisection, and both may be overridden with closed forms.

    Args:
        vocab_size: :math:`V`, the number of data values of a token.
        source: ``'mask'`` (every token starts as the mask token ``V``) or ``'uniform'`` (every token
            starts uniform over the ``V`` data values).
        loss: ``'ce'`` (default): the cross-entropy of the data prediction
            :math:`-\log p^\theta_{1|t}(x_1^i \mid x_t)`, averaged over tokens; ``'gkl'``: the generalised
            KL divergence of Lipman et al. (2024) between the conditional and the model's velocity,
            whose weight :math:`\dot\kappa_t / (1 - \kappa_t)` grows without bound at ``t = 1``, so
            that training times stop at ``t_max = 1 - 1e-3``.

    With the masked source a token that is no longer masked already holds its data value, so the
    posterior there is known exactly: :meth:`posterior` returns it whatever the network says, the
    loss ignores those tokens, and the sampler never changes them.
    """

    name = "mixture"
    loss_name = "the discrete flow-matching loss"
    sampler = "cfmlib.discrete.sample"

    def __init__(self, vocab_size: int, source: str = "mask", loss: str = "ce"):
        self.vocab_size = _checks.positive_int("vocab_size", vocab_size)
        self.source = _checks.choice("source", source, SOURCES)
        self.loss_kind = _checks.choice("loss", loss, LOSSES)
        if self.source == "uniform" and vocab_size < 2:
            raise ValueError("a uniform source needs vocab_size >= 2 (with one value there is nothing to generate)")
        if self.num_states > _MAX_STATES:
            raise ValueError(f"vocab_size={vocab_size} is too large (at most {_MAX_STATES - 1} with a masked source)")
        self.t_max = 1.0 - 1e-3 if self.loss_kind == "gkl" else 1.0

    # --- the schedule --------------------------------------------------------------------
    def kappa(self, t: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        r""":math:`\kappa_t`, the probability that a token has reached its data value by time ``t``."""
        raise NotImplementedError

    def d_kappa(self, t: torch.Tensor) -> torch.Tensor:
        r""":math:`\dot\kappa_t` (autograd unless overridden)."""
        with torch.enable_grad():
            tt = t.detach().clone().requires_grad_(True)
            out = self.kappa(tt)
            (d,) = torch.autograd.grad(out.sum(), tt, allow_unused=True)
        return torch.zeros_like(t) if d is None else d

    def rate(self, t: torch.Tensor) -> torch.Tensor:
        r"""The jump rate :math:`\lambda_t = \dot\kappa_t / (1 - \kappa_t)` of a token that has not yet
        reached its data value (infinite at ``t = 1``)."""
        return self.d_kappa(t) / (1.0 - self.kappa(t))

    def kappa_inverse(self, u: torch.Tensor) -> torch.Tensor:
        r""":math:`\kappa^{-1}(u)`: the time at which a token with coin ``u`` switches to its data value
        (bisection to float precision unless overridden)."""
        lo, hi = torch.zeros_like(u), torch.ones_like(u)
        for _ in range(60 if u.dtype == torch.float64 else 30):
            mid = 0.5 * (lo + hi)
            below = self.kappa(mid) < u
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return 0.5 * (lo + hi)

    # --- the state space -------------------------------------------------------------------
    @property
    def num_states(self) -> int:
        """The number of values a token of :math:`x_t` can take: ``V + 1`` with the mask, else ``V``."""
        return self.vocab_size + (self.source == "mask")

    @property
    def mask_token(self) -> int | None:
        """The mask token ``V`` of a masked source (``None`` for a uniform source)."""
        return self.vocab_size if self.source == "mask" else None

    def source_probs(self, dtype=torch.float32, device=None) -> torch.Tensor:
        r""":math:`p_0` of one token, shape ``(num_states,)``."""
        if self.source == "mask":
            p = torch.zeros(self.num_states, dtype=dtype, device=device)
            p[self.vocab_size] = 1.0
            return p
        return torch.full((self.vocab_size,), 1.0 / self.vocab_size, dtype=dtype, device=device)

    def sample_source(self, shape, *, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Tokens drawn from the source, a long tensor of the given shape."""
        _checks.shape("shape", shape)
        _checks.generator("generator", generator)
        if self.source == "mask":
            return torch.full(tuple(shape), self.vocab_size, dtype=torch.long, device=device)
        return torch.randint(0, self.vocab_size, tuple(shape), generator=generator, device=device)

    # --- what training needs (ProbabilityPath) -----------------------------------------------
    def draw_x0(self, x1: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        r"""All the randomness of a conditional sample: a float tensor ``(batch, 2, ...)`` (``...`` the
        shape of one sequence) with the source tokens :math:`x_0` in ``[:, 0]`` and the coins
        :math:`u \sim U[0, 1)` in ``[:, 1]``, drawn on ``x1``'s device."""
        dtype = torch.get_default_dtype()
        x0 = self.sample_source(x1.shape, generator=generator, device=x1.device).to(dtype)
        u = torch.rand(x1.shape, generator=generator, device=x1.device, dtype=dtype)
        return torch.stack([x0, u], dim=1)

    def coupling_source(self, x0: torch.Tensor) -> torch.Tensor:
        """The source tokens of the noise (a coupling pairs them with the data)."""
        raise ValueError("a minibatch OT coupling pairs points of R^d; a discrete mixture path has no such cost: "
                         "use coupling='independent'")

    def check_data(self, name: str, x1: torch.Tensor) -> None:
        """Data are integer tokens ``(N, L, ...)`` in ``[0, vocab_size)``."""
        _tokens(name, x1, self.vocab_size, what="data tokens")

    def check_batch(self, x0, x1, t, model=None) -> torch.Tensor:
        """The checks of :meth:`loss` (called by :func:`cfmlib.training.cfm_loss` and
        :func:`cfmlib.training.train_step`): ``x1`` integer data tokens, ``x0`` a draw of :meth:`draw_x0`
        for it, ``t`` in ``[0, t_max]``, and a model built for this vocabulary. Values are read on every
        call for CPU tensors and on calls 1, 2, 4, ... on an accelerator. Returns ``t`` as ``(batch,)``."""
        due = _checks.values_due(f"{type(self).__name__}.check_batch",
                                 x1 if isinstance(x1, torch.Tensor) else torch.empty(0))
        _tokens("x1", x1, self.vocab_size, values=due, what="data tokens")
        self._check_draw(x0, x1, due)
        t = _checks.time("t", t, x1.shape[0], like=x0, hi=self.t_max, values=due)
        if model is not None:
            _checks.module_device("model", model, x1=x1)
            self.check_model(model)
        return t

    def _check_draw(self, x0, x1, due):
        _checks.tensor("x0", x0, finite=False)
        want = (x1.shape[0], 2, *x1.shape[1:])
        if tuple(x0.shape) != want:
            raise ValueError(f"x0 must be a draw of path.draw_x0(x1): shape (batch, 2, ...) = {want} (source "
                             f"tokens and coins), got shape {tuple(x0.shape)}")
        _checks.same_device(x0=x0, x1=x1)
        if due and x0.numel():
            src, u = x0[:, 0], x0[:, 1]
            ok_src = bool(((src == src.round()) & (src >= 0) & (src < self.num_states)).all())
            if self.source == "mask":
                ok_src = ok_src and bool((src == self.vocab_size).all())
            if not ok_src or not bool(((u >= 0) & (u <= 1)).all()):
                raise ValueError("x0 is not a draw of this path's draw_x0: x0[:, 0] must hold source tokens of "
                                 f"this path ({self.source} source, vocab_size={self.vocab_size}) and x0[:, 1] "
                                 f"coins in [0, 1]")

    def check_model(self, model) -> None:
        """Raise when ``model`` says (in ``model.config``) that it was built for another vocabulary."""
        cfg = getattr(model, "config", None) or getattr(getattr(model, "module", None), "config", None)
        if not cfg or "vocab_size" not in cfg:
            return
        if cfg["vocab_size"] != self.vocab_size:
            raise ValueError(f"the model predicts {cfg['vocab_size']} token values (model.config['vocab_size']) "
                             f"but the path has vocab_size={self.vocab_size}; build them for the same vocabulary")
        if self.source == "mask" and cfg.get("mask") is False:
            raise ValueError(f"the model reads only the {self.vocab_size} data values but a masked source also "
                             f"needs the mask token {self.vocab_size}; build the model with mask=True")

    # --- the conditional path --------------------------------------------------------------
    def _time(self, t, x):
        """``t`` as a float64 ``(batch,)`` tensor (the conditional formulas are evaluated in float64)."""
        return _checks.time("t", t, x.shape[0], like=torch.empty(0, dtype=torch.float64, device=x.device)).double()

    def split(self, x0: torch.Tensor):
        """``(source tokens, coins)`` of a draw of :meth:`draw_x0`: a long tensor and a float tensor ``(batch, ...)``."""
        return x0[:, 0].long(), x0[:, 1]

    def switch_times(self, x0: torch.Tensor) -> torch.Tensor:
        r"""The time :math:`\kappa^{-1}(u^i)` at which each token of the draw ``x0`` switches to its data value."""
        _checks.tensor("x0", x0)
        return self.kappa_inverse(x0[:, 1])

    def _xt(self, x0, x1, t):
        src, u = self.split(x0)
        k = _bc(self.kappa(t.to(u.dtype)), u)
        return torch.where(u < k, x1, src)

    def sample_xt(self, x0: torch.Tensor, x1: torch.Tensor, t) -> torch.Tensor:
        r"""The conditional sample :math:`x_t^i = x_1^i` if :math:`u^i < \kappa_t`, else :math:`x_0^i`
        (``x0`` a draw of :meth:`draw_x0`); a long tensor of ``x1``'s shape."""
        _tokens("x1", x1, self.vocab_size, what="data tokens")
        self._check_draw(x0, x1, True)
        return self._xt(x0, x1, self._time(t, x1))

    def conditional_prob(self, x1: torch.Tensor, t) -> torch.Tensor:
        r""":math:`p_t(\cdot \mid x_1^i) = \kappa_t \delta_{x_1^i} + (1 - \kappa_t) p_0` for every token,
        shape ``(batch, ..., num_states)``, float64."""
        _tokens("x1", x1, self.vocab_size, what="data tokens")
        k = _bc(self.kappa(self._time(t, x1)), x1)[..., None]
        d1 = F.one_hot(x1, self.num_states).to(k.dtype)
        return k * d1 + (1 - k) * self.source_probs(k.dtype, x1.device)

    def conditional_velocity(self, x: torch.Tensor, x1: torch.Tensor, t) -> torch.Tensor:
        r"""The conditional probability velocity
        :math:`u_t^i(\cdot \mid x, x_1) = \frac{\dot\kappa_t}{1 - \kappa_t}\big(\delta_{x_1^i} - \delta_{x^i}\big)`,
        shape ``(batch, ..., num_states)``: the rates out of token :math:`x^i` (negative at :math:`x^i`
        itself, the rows summing to zero), float64. Needs :math:`\kappa_t < 1`."""
        _tokens("x", x, self.num_states)
        _tokens("x1", x1, self.vocab_size, what="data tokens")
        _checks.same_shape("x", x, "x1", x1)
        t = self._time(t, x)
        r = _bc(self._finite_rate(t), x)[..., None]
        return r * (F.one_hot(x1, self.num_states) - F.one_hot(x, self.num_states)).to(r.dtype)

    def _finite_rate(self, t):
        r = self.rate(t)
        if not bool(torch.isfinite(r).all()):
            raise ValueError(f"the jump rate dkappa/(1 - kappa) is infinite at t = {float(t.max()):.4g} "
                             f"(kappa_t = 1); use times where kappa_t < 1")
        return r

    # --- the data prediction and the marginal velocity ---------------------------------------
    def _known(self, x):
        """Tokens whose data value is known from ``x`` alone: unmasked tokens of a masked source."""
        return (x != self.vocab_size) if self.source == "mask" else None

    def _check_logits(self, logits, x, name="logits"):
        _checks.tensor(name, logits, finite=False)
        want = (*x.shape, self.vocab_size)
        if tuple(logits.shape) != want:
            raise ValueError(f"{name} must have shape (batch, ..., vocab_size) = {want}, got {tuple(logits.shape)}")
        _checks.same_device(**{name: logits, "x": x})

    def posterior(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        r"""The data prediction :math:`p_{1|t}(\cdot \mid x)` of every token, shape ``(batch, ..., V)``:
        the softmax of the network's ``logits``, except that with a masked source an unmasked token's
        data value is known (:math:`\delta_{x^i}`)."""
        _tokens("x", x, self.num_states)
        self._check_logits(logits, x)
        return self._posterior(logits, x)

    def _posterior(self, logits, x):
        p = torch.softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, dim=-1)
        known = self._known(x)
        if known is not None:
            p = torch.where(known[..., None], F.one_hot(x.clamp(max=self.vocab_size - 1), self.vocab_size).to(p.dtype), p)
        return p

    def posterior_to_velocity(self, p1: torch.Tensor, x: torch.Tensor, t) -> torch.Tensor:
        r"""The marginal velocity :math:`u_t^i(\cdot \mid x) = \frac{\dot\kappa_t}{1 - \kappa_t}
        \big(p_{1|t}^i(\cdot \mid x) - \delta_{x^i}\big)` from a data prediction ``p1`` ``(batch, ..., V)``;
        shape ``(batch, ..., num_states)``, rows summing to zero. Needs :math:`\kappa_t < 1`."""
        _tokens("x", x, self.num_states)
        _checks.tensor("p1", p1)
        if tuple(p1.shape) != (*x.shape, self.vocab_size):
            raise ValueError(f"p1 must have shape (batch, ..., vocab_size) = {(*x.shape, self.vocab_size)}, "
                             f"got {tuple(p1.shape)}")
        t = _checks.time("t", t, x.shape[0], like=p1)
        r = _bc(self._finite_rate(t), x)[..., None]
        pad = F.pad(p1, (0, self.num_states - self.vocab_size))
        return r * (pad - F.one_hot(x, self.num_states).to(p1.dtype))

    # --- the loss ----------------------------------------------------------------------------
    def loss(self, model, x0, x1, t, y=None, weight=None) -> torch.Tensor:
        r"""The training loss on a batch, without argument checks (:func:`cfmlib.training.cfm_loss` checks).

        ``'ce'``: the mean over tokens of :math:`-\log p^\theta_{1|t}(x_1^i \mid x_t)`; ``'gkl'``: the mean
        over tokens of :math:`-\lambda_t\big[p^\theta_{1|t}(x_t^i \mid x_t) - \delta_{x_1^i}(x_t^i)
        + (1 - \delta_{x_1^i}(x_t^i)) \log p^\theta_{1|t}(x_1^i \mid x_t)\big]` with
        :math:`\lambda_t = \dot\kappa_t/(1-\kappa_t)`. Tokens whose value is known (unmasked tokens of a
        masked source) add zero. Then weighted by ``weight`` ``(batch,)`` and averaged over the batch, in
        float32 at least.
        """
        self.check_model(model)  # reads model.config only (no device synchronisation)
        xt = self._xt(x0, x1, t)
        logits = model(xt, t) if y is None else model(xt, t, y)
        if logits.shape != (*x1.shape, self.vocab_size):
            raise ValueError(f"the model returned shape {tuple(logits.shape)} for tokens of shape {tuple(xt.shape)}; "
                             f"a data prediction returns logits of shape (batch, ..., vocab_size) = "
                             f"{(*x1.shape, self.vocab_size)}")
        dt = torch.promote_types(logits.dtype, torch.float32)
        logp = torch.log_softmax(logits.to(dt), dim=-1)
        lp1 = logp.gather(-1, x1[..., None])[..., 0]
        known = self._known(xt)
        if self.loss_kind == "ce":
            per = -lp1
        else:
            p_xt = logp.gather(-1, xt.clamp(max=self.vocab_size - 1)[..., None])[..., 0].exp()
            if known is not None:
                p_xt = torch.where(known, p_xt, torch.zeros_like(p_xt))  # p1 puts no mass on the mask
            same = (xt == x1).to(dt)
            per = -_bc(self.rate(t.to(dt)), lp1) * (p_xt - same + (1 - same) * lp1)
        if known is not None:
            per = torch.where(known, torch.zeros_like(per), per)
        per = per.flatten(1).mean(1)
        if weight is not None:
            per = per * weight.to(dt)
        return per.mean()

    # --- one Euler jump ------------------------------------------------------------------------
    def jump_probability(self, t: torch.Tensor, h: float) -> torch.Tensor:
        r"""The probability :math:`c = \min(1, h\lambda_t)` that an Euler step of length ``h`` from ``t``
        redraws a token from the data prediction; ``(batch,)``."""
        return (h * self.rate(t)).clamp(0.0, 1.0)

    def step(self, p1: torch.Tensor, x: torch.Tensor, t, h: float, *, generator: torch.Generator | None = None,
             last: bool = False) -> torch.Tensor:
        r"""One Euler jump :math:`x^i \sim \delta_{x^i} + h\,u_t^i(\cdot \mid x)`, token by token and
        independently: with probability :math:`c = \min(1, h\lambda_t)` a token is redrawn from ``p1``
        (which may return its current value), else it stays. ``last=True`` redraws every token
        (:math:`c = 1`: the step that ends at ``t = 1``, where the rate is infinite).

        ``p1``: the data prediction ``(batch, ..., V)`` (:meth:`posterior`); ``x``: tokens; returns new tokens."""
        _tokens("x", x, self.num_states)
        _checks.tensor("p1", p1)
        if tuple(p1.shape) != (*x.shape, self.vocab_size):
            raise ValueError(f"p1 must have shape {(*x.shape, self.vocab_size)}, got {tuple(p1.shape)}")
        _checks.number("h", h, lo=0.0, lo_open=True, hi=1.0)
        t = _checks.time("t", t, x.shape[0], like=p1)
        return self._step(p1, x, t, h, generator, last)

    def _step(self, p1, x, t, h, generator, last):
        u = torch.rand((2, *x.shape), generator=generator, device=x.device, dtype=p1.dtype)
        cdf = p1.cumsum(-1)
        draw = (cdf <= u[1][..., None] * cdf[..., -1:]).sum(-1).clamp(max=self.vocab_size - 1)  # inverse CDF
        if last:
            return draw
        c = _bc(self.jump_probability(t, h), x)
        return torch.where(u[0] < c, draw, x)

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in vars(self).items()
                        if k not in ("vocab_size", "source", "loss_kind", "t_max"))
        return f"{type(self).__name__}({self.vocab_size}, source={self.source!r}, loss={self.loss_kind!r}{extra})"


class PolynomialMixturePath(MixturePath):
    r"""The mixture path with :math:`\kappa_t = t^n` (``exponent`` :math:`n > 0`; ``n = 1`` is the linear
    scheduler, whose rate :math:`1/(1-t)` makes an Euler step redraw a token with probability
    :math:`h/(1-t)`)."""

    name = "polynomial"

    def __init__(self, vocab_size: int, source: str = "mask", loss: str = "ce", exponent: float = 1.0):
        super().__init__(vocab_size, source, loss)
        self.exponent = _checks.number("exponent", exponent, lo=0.0, lo_open=True)

    def kappa(self, t):
        r""":math:`\kappa_t = t^{\,p}`."""
        return t ** self.exponent if self.exponent != 1.0 else t

    def d_kappa(self, t):
        r""":math:`\dot\kappa_t = p\, t^{\,p-1}`."""
        n = self.exponent
        return torch.ones_like(t) if n == 1.0 else n * t ** (n - 1)

    def kappa_inverse(self, u):
        r"""The time at which :math:`\kappa_t = u`: :math:`t = u^{1/p}`."""
        return u ** (1.0 / self.exponent) if self.exponent != 1.0 else u


class CosineMixturePath(MixturePath):
    r"""The mixture path with :math:`\kappa_t = 1 - \cos(\pi t / 2)`: the fraction of tokens still at the
    source is :math:`\cos(\pi t/2)`, as in the masking schedule of MaskGIT; rate :math:`\frac\pi2\tan\frac{\pi t}2`."""

    name = "cosine"

    def kappa(self, t):
        r""":math:`\kappa_t = 1 - \cos(\pi t/2)`."""
        return 1.0 - torch.cos(0.5 * math.pi * t)

    def d_kappa(self, t):
        r"""The derivative :math:`\dot\kappa_t`."""
        return 0.5 * math.pi * torch.sin(0.5 * math.pi * t)

    def kappa_inverse(self, u):
        r"""The time at which :math:`\kappa_t = u`."""
        return torch.acos(1.0 - u) * (2.0 / math.pi)


# ------------------------------------------------------------------------------------------------ model
class TokenMLP(nn.Module):
    r"""A data prediction :math:`p^\theta_{1|t}` for sequences of tokens: tokens ``(batch, *data_shape)`` and
    times ``(batch,)`` to logits ``(batch, *data_shape, vocab_size)`` (chapter 12).

    ``data_shape`` is the shape of one sequence: an int ``L`` for ``L`` tokens, or a tuple such as
    ``(8, 8)``. The input layer is linear in the one-hot encoding of the sequence (a learned vector for
    each (position, token) pair, summed over the positions); a time embedding (``time_features``
    sinusoidal features, or ``t`` itself when 0) is added; ``depth`` blocks of ``SiLU + Linear(hidden)``
    follow, and a linear head gives ``vocab_size`` logits per position. ``mask=True`` lets the tokens
    take the extra value ``vocab_size`` (the mask of a masked source).
    """

    def __init__(self, data_shape, vocab_size: int, hidden: int = 256, depth: int = 3, time_features: int = 16,
                 mask: bool = True):
        super().__init__()
        shape = (data_shape,) if isinstance(data_shape, int) and not isinstance(data_shape, bool) else data_shape
        _checks.shape("data_shape", shape)
        if len(shape) == 0 or any(d == 0 for d in shape):
            raise ValueError(f"data_shape must be a positive int or a non-empty tuple of positive ints, got {data_shape!r}")
        _checks.positive_int("vocab_size", vocab_size)
        _checks.positive_int("hidden", hidden)
        _checks.positive_int("depth", depth)
        _checks.time_features("time_features", time_features)
        if not isinstance(mask, bool):
            raise TypeError(f"mask must be True or False, got {_checks.describe(mask)}")
        self.data_shape, length, num_states = tuple(shape), math.prod(shape), vocab_size + int(mask)
        self.config = dict(kind="token_mlp", data_shape=self.data_shape, vocab_size=vocab_size, hidden=hidden,
                           depth=depth, time_features=time_features, mask=mask)
        self.length, self.vocab_size, self.num_states, self.time_features = length, vocab_size, num_states, time_features
        self.embed = nn.Linear(length * num_states, hidden)
        self.time = nn.Linear(max(time_features, 1), hidden)
        layers = []
        for _ in range(depth):
            layers += [nn.SiLU(), nn.Linear(hidden, hidden)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.SiLU(), nn.Linear(hidden, length * vocab_size))
        self.register_buffer("offsets", torch.arange(length) * num_states, persistent=False)

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        """Logits ``(batch, *data_shape, V)`` of the data token at every position, from tokens ``x``
        ``(batch, *data_shape)`` and times ``t``."""
        if not isinstance(x, torch.Tensor) or tuple(x.shape[1:]) != self.data_shape or x.is_floating_point():
            raise ValueError(f"x must be integer tokens of shape (batch, {', '.join(map(str, self.data_shape))}), "
                             f"got {_checks.describe(x)}")
        w = self.embed.weight
        onehot = torch.zeros(x.shape[0], w.shape[1], dtype=w.dtype, device=w.device)
        onehot.scatter_(1, x.reshape(x.shape[0], -1) + self.offsets, 1.0)  # one 1 per position
        t = time_as_batch(t, onehot[:, 0])  # (batch,) in the weights' dtype and device
        e = t[:, None] if self.time_features == 0 else sinusoidal_embedding(t, self.time_features)
        h = self.embed(onehot) + self.time(e)
        return self.head(self.body(h)).view(*x.shape, self.vocab_size)

    def extra_repr(self) -> str:
        """The vocabulary size and sequence length, for ``repr``."""
        return f"data_shape={self.data_shape}, vocab_size={self.vocab_size}, num_states={self.num_states}"


MODELS["token_mlp"] = TokenMLP


# ------------------------------------------------------------------------------------------------ sampling
@torch.no_grad()
def sample(model, n: int | None = None, *, path: MixturePath, x0: torch.Tensor | None = None, steps: int = 64,
           trajectory: bool = False, generator: torch.Generator | None = None, device=None, **kwargs) -> Solution:
    r"""Generate token sequences with Euler jumps from ``t = 0`` to ``t = 1`` (chapter 12).

    At each of ``steps`` equal steps of length ``h`` the data prediction :math:`p_{1|t}` is read from
    ``model(x, t, **kwargs)`` (logits ``(batch, ..., V)``, through :meth:`MixturePath.posterior`) and every
    token jumps by :meth:`MixturePath.step`: it is redrawn from :math:`p_{1|t}` with probability
    :math:`\min(1, h\lambda_t)`, and at the last step with probability one. ``x0`` (source tokens) is
    drawn from the path's source when not given (``n`` sequences of the model's data shape).

    Returns a :class:`cfmlib.solvers.Solution` with the final tokens ``x``, ``nfe = steps`` and, with
    ``trajectory=True``, the tokens at every time ``(steps + 1, batch, ...)`` and the ``times``.
    """
    _checks.function("model", model)
    if not isinstance(path, MixturePath):
        raise TypeError(f"path must be a MixturePath (e.g. PolynomialMixturePath(vocab_size)), got {_checks.describe(path)}")
    _checks.positive_int("steps", steps)
    _checks.generator("generator", generator)
    if isinstance(model, nn.Module):
        path.check_model(model)
    if x0 is None:
        if n is None:
            raise ValueError("pass either n (the number of sequences) or x0 (the source tokens)")
        _checks.positive_int("n", n)
        shape = data_shape(model)
        params = next(iter(model.parameters()), None) if isinstance(model, nn.Module) else None
        dev = get_device(device) if device is not None else (params.device if params is not None else torch.device("cpu"))
        gen_dev = generator.device if generator is not None else dev
        x0 = path.sample_source((n, *shape), generator=generator, device=gen_dev).to(dev)
    else:
        if n is not None and n != x0.shape[0]:
            raise ValueError(f"n={n} disagrees with x0's batch size {x0.shape[0]}; pass one of them")
        _tokens("x0", x0, path.num_states)
    params = next((q for q in model.parameters() if q.is_floating_point()), None) \
        if isinstance(model, nn.Module) else None
    dtype = params.dtype if params is not None else torch.float64
    times = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    x, states = x0, [x0] if trajectory else None
    h = 1.0 / steps
    for k in range(steps):
        t = torch.full((x.shape[0],), float(times[k]), dtype=dtype, device=x.device)
        logits = model(x, t, **kwargs)
        if k == 0:
            path._check_logits(logits, x, "the model's output")
        x = path._step(path._posterior(logits, x), x, t, h, generator, last=k == steps - 1)
        if trajectory:
            states.append(x)
    return Solution(x=x, nfe=steps, trajectory=torch.stack(states) if trajectory else None,
                    times=times if trajectory else None)


# ------------------------------------------------------------------------------------------------ exact marginals
def enumerate_states(num_states: int, length: int, device=None) -> torch.Tensor:
    """Every sequence of ``length`` tokens in ``[0, num_states)``, in lexicographic order: ``(num_states**length, length)``.

    Sequence ``x`` has index :math:`\\sum_i x^i S^{L-1-i}` in this list."""
    _checks.positive_int("num_states", num_states)
    _checks.positive_int("length", length)
    if num_states**length > 2**22:
        raise ValueError(f"{num_states}**{length} states are too many to enumerate (at most 2**22)")
    digits = torch.arange(num_states, device=device)
    return torch.cartesian_prod(*([digits] * length)).reshape(-1, length)


class Marginal:
    r"""The exact marginal path and velocity of a finite data distribution under a mixture path (chapter 12):

    .. math::  p_t(x) = \sum_m w_m\, p_t(x \mid x_{1,m}), \qquad
               p_{1|t}^i(a \mid x) = \sum_m \frac{w_m\, p_t(x \mid x_{1,m})}{p_t(x)} [x_{1,m}^i = a], \qquad
               u_t^i(\cdot \mid x) = \lambda_t\big(p_{1|t}^i(\cdot \mid x) - \delta_{x^i}\big).

    Args:
        data: the support, integer tokens ``(M, L, ...)`` in ``[0, V)``.
        path: a :class:`MixturePath`.
        weights: probabilities ``(M,)`` (normalised here); default uniform (an empirical distribution).

    ``Marginal(data, path)(x, t)`` returns the log of the posterior, so that the object can be handed to
    :func:`sample` as the model. Computed in float64 by products, not logs, so that the forward-mode
    derivative in time of :func:`kolmogorov_residual` is exact where probabilities vanish. At a state of
    zero probability the posterior is defined as the data's per-token marginal (such states carry no mass).
    """

    def __init__(self, data: torch.Tensor, path: MixturePath, weights: torch.Tensor | None = None):
        if not isinstance(path, MixturePath):
            raise TypeError(f"path must be a MixturePath, got {_checks.describe(path)}")
        _tokens("data", data, path.vocab_size, what="data tokens")
        if data.shape[0] == 0:
            raise ValueError("data is empty; pass at least one sequence")
        if weights is None:
            weights = torch.full((data.shape[0],), 1.0 / data.shape[0], dtype=torch.float64, device=data.device)
        else:
            _checks.tensor("weights", weights, ndim=1)
            if weights.shape[0] != data.shape[0] or bool((weights < 0).any()) or float(weights.sum()) <= 0:
                raise ValueError(f"weights must be {data.shape[0]} non-negative numbers with a positive sum, "
                                 f"got {_checks.describe(weights)}")
            weights = weights.to(torch.float64) / weights.sum()
        self.data, self.weights, self.path = data, weights.to(data.device), path
        self.config = dict(data_shape=tuple(data.shape[1:]), vocab_size=path.vocab_size)  # what sample() reads
        onehot = F.one_hot(data, path.vocab_size).to(torch.float64)
        self._marginal = (self.weights.reshape(-1, *([1] * data.ndim)) * onehot).sum(0)  # (L.., V)

    def _check(self, x):
        _tokens("x", x, self.path.num_states)
        if x.shape[1:] != self.data.shape[1:]:
            raise ValueError(f"x must hold sequences of shape {tuple(self.data.shape[1:])}, got {tuple(x.shape[1:])}")
        _checks.same_device(x=x, data=self.data)

    def _joint(self, x, t):
        """:math:`w_m p_t(x \\mid x_{1,m})`, shape ``(batch, M)``."""
        t = self.path._time(t, x)
        k = _bc(self.path.kappa(t), x)[:, None]  # (B, 1, 1..)
        p0 = self.path.source_probs(torch.float64, x.device)[x][:, None]  # (B, 1, L..)
        same = (x[:, None] == self.data[None]).to(torch.float64)  # (B, M, L..)
        factors = k * same + (1 - k) * p0
        return factors.flatten(2).prod(-1) * self.weights[None]

    def prob(self, x: torch.Tensor, t) -> torch.Tensor:
        """:math:`p_t(x)`, shape ``(batch,)``."""
        self._check(x)
        return self._joint(x, t).sum(1)

    def posterior(self, x: torch.Tensor, t) -> torch.Tensor:
        r"""The per-token posterior :math:`p_{1|t}^i(\cdot \mid x)`, shape ``(batch, ..., V)``."""
        self._check(x)
        joint = self._joint(x, t)  # (B, M)
        total = joint.sum(1)
        onehot = F.one_hot(self.data, self.path.vocab_size).to(torch.float64)  # (M, L.., V)
        num = torch.einsum("bm,m...v->b...v", joint, onehot)
        post = num / _bc(total.clamp_min(torch.finfo(torch.float64).tiny), num)
        return torch.where(_bc(total > 0, num), post, self._marginal[None].expand_as(post))

    def velocity(self, x: torch.Tensor, t) -> torch.Tensor:
        r"""The marginal velocity :math:`u_t^i(\cdot \mid x)`, shape ``(batch, ..., num_states)`` (needs :math:`\kappa_t < 1`)."""
        t = self.path._time(t, x)
        return self.path.posterior_to_velocity(self.posterior(x, t), x, t)

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        """The log posterior ``(batch, ..., V)``: logits of the exact data prediction (a model for :func:`sample`)."""
        return self.posterior(x, t).log()


def _neighbours(num_states: int, length: int, device=None):
    """``(states, nb)``: every state ``(N, L)`` and the index ``nb[n, i, a]`` of state ``n`` with token ``i`` set to ``a``."""
    states = enumerate_states(num_states, length, device)
    place = num_states ** torch.arange(length - 1, -1, -1, device=device)  # (L,)
    index = (states * place).sum(1)  # = arange(N)
    a = torch.arange(num_states, device=device)
    nb = index[:, None, None] + (a[None, None, :] - states[:, :, None]) * place[None, :, None]
    return states, nb


def kolmogorov_residual(prob_fn, velocity_fn, t: float, *, num_states: int, length: int,
                        return_terms: bool = False):
    r"""The residual of the Kolmogorov forward equation for a factorised velocity, at every state of an
    enumerable space (chapter 12):

    .. math::  r_t(x) = \partial_t p_t(x) - \sum_{i=1}^{L} \sum_{a} p_t(x^{i \leftarrow a})\,
               u_t^i\big(x^i \mid x^{i \leftarrow a}\big),

    where :math:`x^{i \leftarrow a}` is :math:`x` with token :math:`i` set to :math:`a` (the term
    :math:`a = x^i` is the outflow, through the negative diagonal of the velocity). The velocity
    generates the path exactly when :math:`r = 0` at every state. :math:`\partial_t p_t` is computed by
    forward-mode automatic differentiation.

    Args:
        prob_fn: :math:`p_t(x)`, called as ``prob_fn(x, t)`` with every state ``x`` ``(N, L)`` and ``t``
            a 0-d float64 tensor, returning ``(N,)`` (e.g. :meth:`Marginal.prob`).
        velocity_fn: :math:`u_t^i(\cdot \mid x)`, called as ``velocity_fn(x, t)``, returning
            ``(N, L, num_states)`` (e.g. :meth:`Marginal.velocity`).
        t: the time, in ``(0, 1)``.
        num_states, length: the state space, ``num_states ** length`` sequences (:func:`enumerate_states`).
        return_terms: also return :math:`\partial_t p_t` and the flux term.

    Returns:
        ``r`` of shape ``(N,)``, or ``(r, dp_dt, flux)``.
    """
    _checks.function("prob_fn", prob_fn)
    _checks.function("velocity_fn", velocity_fn)
    t = _checks.number("t", t, lo=0.0, hi=1.0)
    states, nb = _neighbours(num_states, length)
    tt = torch.tensor(t, dtype=torch.float64)
    with fwAD.dual_level():
        p_dual = prob_fn(states, fwAD.make_dual(tt, torch.ones_like(tt)))
        if not isinstance(p_dual, torch.Tensor) or p_dual.shape != (states.shape[0],):
            raise ValueError(f"prob_fn must return the probability of every state, shape ({states.shape[0]},), "
                             f"got {_checks.describe(p_dual)}")
        unpacked = fwAD.unpack_dual(p_dual)
        p, dp = unpacked.primal.detach(), unpacked.tangent
    dp = torch.zeros_like(p) if dp is None else dp.detach()
    u = velocity_fn(states, tt)
    if not isinstance(u, torch.Tensor) or u.shape != (*states.shape, num_states):
        raise ValueError(f"velocity_fn must return shape (N, L, num_states) = {(*states.shape, num_states)}, "
                         f"got {_checks.describe(u)}")
    u = u.to(p.dtype)
    pos = torch.arange(length)[None, :, None].expand_as(nb)
    into = states[:, :, None].expand_as(nb)
    flux = (p[nb] * u[nb, pos, into]).sum((1, 2))
    r = dp - flux
    return (r, dp, flux) if return_terms else r


@torch.no_grad()
def sampler_distribution(model, path: MixturePath, length: int, steps: int, *, x0_probs: torch.Tensor | None = None,
                         **kwargs) -> torch.Tensor:
    r"""The exact law of :func:`sample`'s output over all ``num_states ** length`` sequences
    (:func:`enumerate_states` order), obtained by multiplying the transition matrices of the ``steps``
    Euler jumps instead of drawing: within one step the tokens jump independently, each with
    :math:`(1 - c)\,\delta_{x^i} + c\, p_{1|t}^i(\cdot \mid x)`. ``x0_probs`` is the law of the
    starting sequence (default: the path's source, token by token). For enumerable spaces only
    (e.g. ``length = 3`` tokens of 5 values: 125 states).
    """
    _checks.function("model", model)
    if not isinstance(path, MixturePath):
        raise TypeError(f"path must be a MixturePath, got {_checks.describe(path)}")
    _checks.positive_int("steps", steps)
    S = path.num_states
    states, _ = _neighbours(S, length)
    N = states.shape[0]
    if x0_probs is None:
        p0 = path.source_probs(torch.float64)
        pad = F.pad(p0, (0, S - p0.shape[0]))
        x0_probs = pad[states].prod(1)
    else:
        _checks.tensor("x0_probs", x0_probs, ndim=1)
        if x0_probs.shape[0] != N:
            raise ValueError(f"x0_probs must have {N} entries (one per state), got {x0_probs.shape[0]}")
    dist = x0_probs.to(torch.float64)
    h = 1.0 / steps
    for k in range(steps):
        t = torch.full((N,), k * h, dtype=torch.float64)
        p1 = path._posterior(model(states, t, **kwargs).to(torch.float64), states)  # (N, L, V)
        c = 1.0 if k == steps - 1 else float(path.jump_probability(t[:1], h))
        move = c * F.pad(p1, (0, S - path.vocab_size)) + (1 - c) * F.one_hot(states, S).to(torch.float64)
        kernel = move[:, 0]
        for i in range(1, length):  # the tokens jump independently: outer product over positions
            kernel = (kernel[:, :, None] * move[:, i, None, :]).reshape(N, -1)
        dist = dist @ kernel
    return dist


# ------------------------------------------------------------------------------------------------ tokens
def quantise(x: torch.Tensor, levels: int, lo: float = -1.0, hi: float = 1.0) -> torch.Tensor:
    """Grey values in ``[lo, hi]`` to ``levels`` equal-width bins: long tokens in ``[0, levels)``, same shape."""
    _checks.tensor("x", x)
    _checks.positive_int("levels", levels)
    _checks.number("hi", hi, lo=lo, lo_open=True)
    return ((x - lo) / (hi - lo) * levels).floor().clamp(0, levels - 1).long()


def dequantise(tokens: torch.Tensor, levels: int, lo: float = -1.0, hi: float = 1.0) -> torch.Tensor:
    """Tokens to the centres of their bins in ``[lo, hi]`` (float32), the inverse of :func:`quantise` up to the bin width."""
    _checks.positive_int("levels", levels)
    _tokens("tokens", tokens, levels)
    return lo + (tokens.float() + 0.5) * (hi - lo) / levels
