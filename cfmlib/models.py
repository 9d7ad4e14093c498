r"""Networks for the learned field :math:`v_\theta(x, t)` (chapters 0, 5, 7 and 9).

Every model is called as ``model(x, t)`` or ``model(x, t, y)`` with ``x`` of
shape ``(batch, ...)``, ``t`` a number or a ``(batch,)`` / ``(batch, 1)``
tensor, and optional integer class labels ``y`` of shape ``(batch,)``, where
the label ``num_classes`` is the *null* label used for classifier-free
guidance.  Each model keeps the keyword arguments it was built with in
``model.config`` so that a checkpoint can rebuild it (:func:`build_model`).
Chapter 11 adds two helpers that are not fields: a small :class:`Autoencoder` for
latent flow matching and a :class:`Classifier` whose features feed the Fréchet distance.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import _checks

__all__ = ["MLP", "UNet", "CFGField", "guided", "time_as_batch", "build_model", "data_shape", "MODELS",
           "Autoencoder", "Classifier"]


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
        _checks.time_features("time_features", time_features)
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
        r""":math:`v_\theta(x, t[, y])` for ``x`` of shape ``(batch, dim)``, ``t`` a number or ``(batch,)``, optional labels ``y``."""
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
        elif not isinstance(y, torch.Tensor) or y.shape != (x.shape[0],) or y.is_floating_point():
            raise ValueError(f"y must be an integer tensor of shape ({x.shape[0]},), got {_checks.describe(y)}")
        h = self.body[1](self.body[0](h) + self.label(y))
        return self.head(self.body[2:](h))


#: Model kinds that :func:`build_model` can rebuild from a ``config``.
MODELS = {"mlp": MLP}


def build_model(config: dict) -> nn.Module:
    """Rebuild a model from its ``config`` dictionary (as stored in ``model.config`` and in checkpoints)."""
    if not isinstance(config, dict) or "kind" not in config:
        raise ValueError(f"config must be a dict with a 'kind' entry, got {_checks.describe(config)}")
    kwargs = dict(config)
    kind = _checks.choice("model kind", kwargs.pop("kind"), MODELS)
    _checks.known_kwargs(f"the {kind!r} model's config", MODELS[kind], kwargs)
    return MODELS[kind](**kwargs)


def data_shape(model) -> tuple:
    """The shape of one data point of ``model`` (``(dim,)`` for an :class:`MLP`, ``(C, H, W)`` for a
    :class:`UNet`), read from ``model.config`` (also through a ``DistributedDataParallel`` or a
    :class:`CFGField` wrapper). Raises a ``ValueError`` when the model does not say."""
    cfg = getattr(model, "config", None) or getattr(getattr(model, "module", None), "config", None)
    if cfg and "dim" in cfg:
        return (cfg["dim"],)
    if cfg and "image_shape" in cfg:
        return tuple(cfg["image_shape"])
    if cfg and "data_shape" in cfg:
        return tuple(cfg["data_shape"])
    raise ValueError("cannot tell the data shape of this model (it has no config with 'dim', 'image_shape' "
                     "or 'data_shape'); pass x0 (the starting noise) instead of n")


# --- a small U-Net for images (chapter 9) ------------------------------------------------------

def _groups(channels: int, groups: int) -> int:
    """The largest divisor of ``channels`` that is at most ``groups`` (GroupNorm needs one)."""
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return g


class _ResBlock(nn.Module):
    """GroupNorm -> SiLU -> 3x3 conv, plus a per-channel shift from the time/label embedding,
    then GroupNorm -> SiLU -> 3x3 conv, added to a (1x1-projected) skip connection."""

    def __init__(self, c_in: int, c_out: int, emb: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in, groups), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb, c_out)
        self.norm2 = nn.GroupNorm(_groups(c_out, groups), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity (stable early training)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.act = nn.SiLU()

    def forward(self, x, e):
        h = self.conv1(self.act(self.norm1(x)))
        h = h + self.emb(e)[:, :, None, None]
        h = self.conv2(self.act(self.norm2(h)))
        return self.skip(x) + h


class UNet(nn.Module):
    r"""A small U-Net :math:`v_\theta(x, t[, y])` for images ``(batch, C, H, W)`` (chapter 9).

    One resolution level down and up (Ronneberger et al., 2015): ``conv_in`` to ``base``
    channels, a residual block, a stride-2 convolution to ``2 * base`` channels at half the
    resolution, two residual blocks there, nearest-neighbour upsampling with a convolution
    back to ``base`` channels, concatenation with the skip connection, a residual block back
    to ``base`` channels and a GroupNorm -> SiLU -> conv head.  Every residual block (GroupNorm + SiLU + 3x3 convolutions) receives the
    embedding :math:`e = \mathrm{MLP}(\text{sinusoidal}(t)) + E[y]`, where ``E`` has
    ``num_classes + 1`` rows and the last row, index ``num_classes``, is the *null* label
    used for classifier-free guidance (:class:`CFGField`).  ``H`` and ``W`` must be even
    (8x8 digits and 28x28 MNIST both work).

    Args:
        image_shape: ``(C, H, W)`` of one image.
        base: channels at full resolution (``2 * base`` at half resolution).
        time_features: number of sinusoidal features of ``t`` (even).
        num_classes: number of class labels, or ``None`` for an unconditional model.
        groups: GroupNorm groups (reduced to a divisor of the channel count when needed).
    """

    def __init__(self, image_shape=(1, 8, 8), base: int = 32, time_features: int = 64,
                 num_classes: int | None = None, groups: int = 8):
        super().__init__()
        if not isinstance(image_shape, (tuple, list)) or len(image_shape) != 3 or not all(
                isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in image_shape):
            raise ValueError(f"image_shape must be (channels, height, width) of positive ints, got {image_shape!r}")
        if image_shape[1] % 2 or image_shape[2] % 2:
            raise ValueError(f"image height and width must be even for one down/up level, got {tuple(image_shape)}")
        _checks.positive_int("base", base)
        _checks.positive_int("groups", groups)
        _checks.positive_int("time_features", time_features)
        if time_features % 2:
            raise ValueError(f"time_features must be a positive even int, got {time_features}")
        if num_classes is not None:
            _checks.positive_int("num_classes", num_classes)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.config = dict(kind="unet", image_shape=self.image_shape, base=base, time_features=time_features,
                           num_classes=num_classes, groups=groups)
        self.time_features, self.num_classes = time_features, num_classes
        c, emb = self.image_shape[0], 4 * base
        self.time_mlp = nn.Sequential(nn.Linear(time_features, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label = nn.Embedding(num_classes + 1, emb) if num_classes else None
        self.conv_in = nn.Conv2d(c, base, 3, padding=1)
        self.down1 = _ResBlock(base, base, emb, groups)
        self.downsample = nn.Conv2d(base, 2 * base, 3, stride=2, padding=1)
        self.mid1 = _ResBlock(2 * base, 2 * base, emb, groups)
        self.mid2 = _ResBlock(2 * base, 2 * base, emb, groups)
        self.upsample = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                      nn.Conv2d(2 * base, base, 3, padding=1))
        self.up1 = _ResBlock(2 * base, base, emb, groups)
        self.head = nn.Sequential(nn.GroupNorm(_groups(base, groups), base), nn.SiLU(),
                                  nn.Conv2d(base, c, 3, padding=1))

    def forward(self, x: torch.Tensor, t, y: torch.Tensor | None = None) -> torch.Tensor:
        r""":math:`v_\theta(x, t[, y])` for images ``x`` of shape ``(batch, C, H, W)``; ``y`` defaults to the null label."""
        if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"x must have shape (batch, {', '.join(map(str, self.image_shape))}), "
                             f"got {tuple(x.shape)}")
        t = time_as_batch(t, x)
        return self._body(x, self.time_mlp(sinusoidal_embedding(t, self.time_features)), y)

    def _body(self, x: torch.Tensor, e: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """The network after the time embedding ``e``: adds the label's embedding, then down, middle and up."""
        if self.label is None:
            if y is not None:
                raise ValueError("y was given but the model was built without num_classes")
        else:
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            elif not isinstance(y, torch.Tensor) or y.shape != (x.shape[0],) or y.is_floating_point():
                raise ValueError(f"y must be an integer tensor of shape ({x.shape[0]},), got {_checks.describe(y)}")
            e = e + self.label(y)
        h0 = self.down1(self.conv_in(x), e)
        h = self.mid2(self.mid1(self.downsample(h0), e), e)
        h = self.up1(torch.cat([self.upsample(h), h0], dim=1), e)
        return self.head(h)


MODELS["unet"] = UNet


class CFGField(nn.Module):
    r"""The classifier-free guided field of a class-conditional model (chapter 9):

    .. math::  \tilde v(x, t, y) = (1 + w)\, v_\theta(x, t, y) - w\, v_\theta(x, t, \varnothing),

    where :math:`\varnothing` is the null label ``model.num_classes``.  ``w = 0`` is the plain
    conditional field; ``w > 0`` pushes samples towards what distinguishes class ``y``.  Both
    terms come from one forward pass on the doubled batch.  Called as ``field(x, t, y)``, so it
    can be passed to :func:`cfmlib.solvers.sample` with ``y=labels``; ``field.config`` is the
    model's, so ``sample(field, n, y=...)`` knows the data shape.
    """

    def __init__(self, model: nn.Module, w: float):
        super().__init__()
        if not isinstance(model, nn.Module) or not getattr(model, "num_classes", None):
            raise ValueError("CFGField needs a class-conditional model (built with num_classes), got "
                             f"{_checks.describe(model)}")
        self.w = _checks.number("w", w)
        self.model = model
        self.num_classes = model.num_classes
        self.config = getattr(model, "config", None)

    def forward(self, x: torch.Tensor, t, y: torch.Tensor | None = None) -> torch.Tensor:
        r"""The guided field :math:`(1 + w) v_\theta(x, t, y) - w\, v_\theta(x, t, \varnothing)` (one doubled forward pass)."""
        if y is None:
            raise ValueError("CFGField needs class labels y (a (batch,) integer tensor)")
        if self.w == 0:
            return self.model(x, t, y)
        t = time_as_batch(t, x)
        null = torch.full_like(y, self.num_classes)
        both = self.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        cond, uncond = both.chunk(2)
        return (1 + self.w) * cond - self.w * uncond


def guided(model: nn.Module, w: float) -> CFGField:
    r"""Shorthand for :class:`CFGField`: the field :math:`(1 + w) v(x, t, y) - w v(x, t, \varnothing)`."""
    return CFGField(model, w)


# --- a small autoencoder and a digit classifier (chapter 11) -------------------------------------

def _mlp(sizes) -> nn.Sequential:
    """Linear layers of the given sizes with SiLU between them (none after the last)."""
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


def _check_data_shape(data_shape) -> tuple:
    if not isinstance(data_shape, (tuple, list)) or not data_shape or not all(
            isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in data_shape):
        raise ValueError(f"data_shape must be a tuple of positive ints (one sample's shape, e.g. (1, 8, 8)), "
                         f"got {data_shape!r}")
    return tuple(int(s) for s in data_shape)


def _flat(name: str, x: torch.Tensor, shape: tuple) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or tuple(x.shape[1:]) != shape:
        raise ValueError(f"{name} must have shape (batch, {', '.join(map(str, shape))}), got {_checks.describe(x)}")
    return x.flatten(1)


class Autoencoder(nn.Module):
    r"""A small fully connected autoencoder for latent flow matching (chapter 11).

    The encoder maps a sample ``x`` of shape ``data_shape`` to a latent :math:`z \in \mathbb R^{\mathrm{latent}}`
    through ``depth`` hidden layers of width ``hidden`` (SiLU), the decoder maps back the same way:
    :math:`\hat x = \mathrm{dec}(\mathrm{enc}(x))`, trained by the reader on :math:`\lVert \hat x - x\rVert^2`.
    :meth:`encode` returns *standardised* latents :math:`(\mathrm{enc}(x) - m)/s` with per-coordinate
    buffers ``m``, ``s`` (0 and 1 until :meth:`fit_latent_scale` sets them from data), so that the
    latents have the scale of the flow's source :math:`N(0, I)`; :meth:`decode` undoes it.

    Args:
        data_shape: the shape of one sample, e.g. ``(1, 8, 8)``.
        latent: latent dimension.
        hidden: width of the hidden layers.
        depth: hidden layers in each of the encoder and the decoder.
    """

    def __init__(self, data_shape=(1, 8, 8), latent: int = 8, hidden: int = 128, depth: int = 2):
        super().__init__()
        self.data_shape = _check_data_shape(data_shape)
        _checks.positive_int("latent", latent)
        _checks.positive_int("hidden", hidden)
        _checks.positive_int("depth", depth)
        self.config = dict(kind="autoencoder", data_shape=self.data_shape, latent=latent, hidden=hidden, depth=depth)
        self.latent = latent
        d = math.prod(self.data_shape)
        self.encoder = _mlp([d] + [hidden] * depth + [latent])
        self.decoder = _mlp([latent] + [hidden] * depth + [d])
        self.register_buffer("latent_mean", torch.zeros(latent))
        self.register_buffer("latent_std", torch.ones(latent))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Standardised latents ``(batch, latent)`` of samples ``(batch, *data_shape)``."""
        return (self.encoder(_flat("x", x, self.data_shape)) - self.latent_mean) / self.latent_std

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Samples ``(batch, *data_shape)`` decoded from standardised latents ``(batch, latent)``."""
        if not isinstance(z, torch.Tensor) or z.ndim != 2 or z.shape[1] != self.latent:
            raise ValueError(f"z must have shape (batch, {self.latent}), got {_checks.describe(z)}")
        return self.decoder(z * self.latent_std + self.latent_mean).reshape(-1, *self.data_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction ``decode(encode(x))``."""
        return self.decode(self.encode(x))

    @torch.no_grad()
    def fit_latent_scale(self, x: torch.Tensor) -> "Autoencoder":
        """Set the latent mean and standard deviation (per coordinate) from the samples ``x`` (at least 2),
        so that ``encode(x)`` has mean 0 and standard deviation 1 in every coordinate. Returns ``self``."""
        raw = torch.cat([self.encoder(c) for c in _flat("x", x, self.data_shape).split(4096)])
        if raw.shape[0] < 2:
            raise ValueError(f"fit_latent_scale needs at least 2 samples, got {raw.shape[0]}")
        self.latent_mean.copy_(raw.mean(0))
        self.latent_std.copy_(raw.std(0).clamp(min=1e-8))
        return self


class Classifier(nn.Module):
    r"""A fully connected classifier with a feature layer (chapter 11): ``x`` of shape ``data_shape`` ->
    ``hidden`` units -> ``features`` units (:meth:`features`, the map behind
    :func:`cfmlib.metrics.frechet_distance`) -> ``num_classes`` logits, SiLU in between.

    Args:
        data_shape: the shape of one sample, e.g. ``(1, 8, 8)``.
        num_classes: number of classes.
        hidden, features: widths of the two hidden layers.
    """

    def __init__(self, data_shape=(1, 8, 8), num_classes: int = 10, hidden: int = 128, features: int = 32):
        super().__init__()
        self.data_shape = _check_data_shape(data_shape)
        _checks.positive_int("num_classes", num_classes)
        _checks.positive_int("hidden", hidden)
        _checks.positive_int("features", features)
        self.config = dict(kind="classifier", data_shape=self.data_shape, num_classes=num_classes, hidden=hidden,
                           features=features)
        self.num_classes = num_classes
        self.body = nn.Sequential(_mlp([math.prod(self.data_shape), hidden, features]), nn.SiLU())
        self.head = nn.Linear(features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate layer, ``(batch, features)``."""
        return self.body(_flat("x", x, self.data_shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(batch, num_classes)``."""
        return self.head(self.features(x))


MODELS["autoencoder"] = Autoencoder
MODELS["classifier"] = Classifier
