r"""Networks for the learned field :math:`v_\theta(x, t)` (chapters 0, 5, 7 and 9).

Every model is called as ``model(x, t)`` or ``model(x, t, y)`` with ``x`` of
shape ``(batch, ...)``, ``t`` a number or a ``(batch,)`` / ``(batch, 1)``
tensor, and optional integer class labels ``y`` of shape ``(batch,)``, where
the label ``num_classes`` is the *null* label used for classifier-free
guidance.  Each model keeps the keyword arguments it was built with in
``model.config`` so that a checkpoint can rebuild it (:func:`build_model`).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import _checks

__all__ = ["MLP", "time_as_batch", "build_model", "MODELS"]


def time_as_batch(t, x: torch.Tensor) -> torch.Tensor:
    """Return ``t`` as a ``(batch,)`` tensor on ``x``'s device and dtype (no value checks: this is the hot path)."""
    if not isinstance(t, torch.Tensor):
        return torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)
    if t.ndim == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t must be a scalar, (batch,) or (batch, 1) with batch={x.shape[0]}, "
                         f"got shape {tuple(t.shape)}")
    return t.to(x.dtype)


def sinusoidal_embedding(t: torch.Tensor, features: int, max_period: float = 1000.0) -> torch.Tensor:
    r"""Fourier features of time: :math:`[\cos(\omega_k t), \sin(\omega_k t)]_{k}`, shape ``(batch, features)``."""
    half = features // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=t.dtype) / half)
    args = (1000.0 * t)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class MLP(nn.Module):
    r"""A multilayer perceptron :math:`v_\theta(x, t)` for low-dimensional data.

    The input is ``concat(x, e(t))`` where ``e(t) = t`` when ``time_features == 0``, or
    ``time_features`` sinusoidal features of ``t`` otherwise; then ``depth`` blocks of
    ``Linear(hidden) + SiLU`` and a final ``Linear`` back to ``dim``.  With ``num_classes``
    set, a learned label embedding (``num_classes + 1`` rows, the last one the null label)
    is added to the first hidden layer.
    """

    def __init__(self, dim: int = 2, hidden: int = 256, depth: int = 3, time_features: int = 0,
                 num_classes: int | None = None):
        super().__init__()
        _checks.positive_int("dim", dim)
        _checks.positive_int("hidden", hidden)
        _checks.positive_int("depth", depth)
        if isinstance(time_features, bool) or not isinstance(time_features, int) or time_features < 0 \
                or time_features % 2:
            raise ValueError(f"time_features must be 0 (raw t) or a positive even int, got {time_features!r}")
        if num_classes is not None:
            _checks.positive_int("num_classes", num_classes)
        self.config = dict(kind="mlp", dim=dim, hidden=hidden, depth=depth, time_features=time_features,
                           num_classes=num_classes)
        self.dim, self.time_features, self.num_classes = dim, time_features, num_classes
        layers, width = [], dim + max(time_features, 1)
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(hidden, dim)
        self.label = nn.Embedding(num_classes + 1, hidden) if num_classes else None

    def forward(self, x: torch.Tensor, t, y: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (batch, {self.dim}), got {tuple(x.shape)}")
        t = time_as_batch(t, x)
        e = t[:, None] if self.time_features == 0 else sinusoidal_embedding(t, self.time_features)
        h = torch.cat([x, e], dim=1)
        if self.label is None:
            if y is not None:
                raise ValueError("y was given but the model was built without num_classes")
            return self.head(self.body(h))
        if y is None:
            y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
        h = self.body[1](self.body[0](h) + self.label(y))
        return self.head(self.body[2:](h))


MODELS = {"mlp": MLP}


def build_model(config: dict) -> nn.Module:
    """Rebuild a model from its ``config`` dictionary (as stored in ``model.config`` and in checkpoints)."""
    if not isinstance(config, dict) or "kind" not in config:
        raise ValueError(f"config must be a dict with a 'kind' entry, got {_checks.describe(config)}")
    kwargs = dict(config)
    kind = _checks.choice("model kind", kwargs.pop("kind"), MODELS)
    return MODELS[kind](**kwargs)
