"""Data sets: seeded 2D toys and small images (chapters 0-9).

Every 2D toy is a *sampler*: ``get_dataset(name)`` returns an object called
as ``sampler(n, generator=g)`` that returns an ``(n, 2)`` float tensor on the
generator's device.  All toys are scaled to lie roughly in ``[-4, 4]^2``, the
region where most of the mass of the source ``N(0, I)`` also lies.
``'8gaussians'`` and ``'gmm'`` are :class:`cfmlib.analytic.GaussianMixture`
objects, so their density, score and marginal fields are known in closed form.
"""
from __future__ import annotations

import math

import torch

from . import _checks
from .analytic import GaussianMixture
from .device import get_device

__all__ = ["DATASETS", "get_dataset", "eight_gaussians", "gaussian_mixture", "load_digits", "load_mnist"]


def eight_gaussians(radius: float = 3.0, std: float = 0.3) -> GaussianMixture:
    """Eight equal Gaussians with standard deviation ``std`` on a circle of radius ``radius``."""
    _checks.number("radius", radius, lo=0.0)
    _checks.number("std", std, lo=0.0)
    ang = torch.arange(8, dtype=torch.float32) * (2 * math.pi / 8)
    means = radius * torch.stack([torch.cos(ang), torch.sin(ang)], 1)
    return GaussianMixture(means, std)


def gaussian_mixture() -> GaussianMixture:
    """An uneven three-component 2D mixture with different widths and weights (known density)."""
    means = torch.tensor([[-2.0, -1.0], [2.0, -1.5], [0.0, 2.5]])
    stds = torch.tensor([[0.5, 0.8], [0.7, 0.4], [0.6, 0.6]])
    return GaussianMixture(means, stds, torch.tensor([0.5, 0.3, 0.2]))


class _Toy:
    def __init__(self, name, fn, noise):
        noise = _checks.number("noise", noise, lo=0.0)
        self.name, self.fn, self.noise = name, fn, noise

    def __call__(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        _checks.positive_int("n", n)
        _checks.generator("generator", generator)
        dev = generator.device if generator is not None else torch.device("cpu")
        return self.fn(n, generator, dev, self.noise)

    sample = __call__

    def __repr__(self):
        return f"<2D toy data set {self.name!r}>"


def _uniform(n, g, dev):
    return torch.rand(n, generator=g, device=dev)


def _moons(n, g, dev, noise):
    n_out = n // 2
    u = _uniform(n, g, dev) * math.pi
    top = torch.arange(n, device=dev) < n_out
    x = torch.where(top, torch.cos(u), 1 - torch.cos(u))
    y = torch.where(top, torch.sin(u), 0.5 - torch.sin(u))
    pts = torch.stack([x, y], 1) + noise * torch.randn(n, 2, generator=g, device=dev)
    return 2.0 * (pts - torch.tensor([0.5, 0.25], device=dev))


def _checkerboard(n, g, dev, noise):
    # 4 x 4 board on [-4, 4]^2; the samples fill the 8 dark squares uniformly
    x = _uniform(n, g, dev) * 8 - 4
    col = torch.floor((x + 4) / 2)
    row_choice = torch.floor(_uniform(n, g, dev) * 2)
    row = 2 * row_choice + (col % 2)
    y = -4 + 2 * row + 2 * _uniform(n, g, dev)
    return torch.stack([x, y], 1)


def _spirals(n, g, dev, noise):
    r = torch.sqrt(_uniform(n, g, dev)) * 3 * math.pi
    arm = (torch.arange(n, device=dev) % 2).float() * 2 - 1
    x = arm * r * torch.cos(r) / (math.pi)
    y = arm * r * torch.sin(r) / (math.pi)
    return torch.stack([x, y], 1) + noise * torch.randn(n, 2, generator=g, device=dev)


def _circles(n, g, dev, noise):
    u = _uniform(n, g, dev) * 2 * math.pi
    radius = torch.where(torch.arange(n, device=dev) % 2 == 0, 1.25, 3.0)
    pts = radius[:, None] * torch.stack([torch.cos(u), torch.sin(u)], 1)
    return pts + noise * torch.randn(n, 2, generator=g, device=dev)


#: The 2D data sets known to :func:`get_dataset`.
DATASETS = {
    "8gaussians": eight_gaussians,
    "gmm": gaussian_mixture,
    "moons": lambda noise=0.05: _Toy("moons", _moons, noise),
    "checkerboard": lambda: _Toy("checkerboard", _checkerboard, 0.0),
    "spirals": lambda noise=0.1: _Toy("spirals", _spirals, noise),
    "circles": lambda noise=0.08: _Toy("circles", _circles, noise),
}


def get_dataset(name: str, **kwargs):
    """A 2D sampler by name: one of ``'8gaussians'``, ``'gmm'``, ``'moons'``, ``'checkerboard'``,
    ``'spirals'``, ``'circles'``. Keyword arguments go to the data set (e.g. ``noise``)."""
    _checks.choice("dataset", name, DATASETS)
    _checks.known_kwargs(f"get_dataset({name!r})", DATASETS[name], kwargs)
    return DATASETS[name](**kwargs)


def load_digits(device=None):
    """The 8x8 digits of scikit-learn (1,797 images, shipped with the package, no download).

    Returns ``(x, y)``: images of shape ``(N, 1, 8, 8)`` scaled to ``[-1, 1]`` (float32) and
    integer labels ``(N,)``.
    """
    from sklearn.datasets import load_digits as _load  # scikit-learn takes most of a second to import

    device = get_device(device) if device is not None else None
    d = _load()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    y = torch.tensor(d.target, dtype=torch.long)
    return x.to(device) if device else x, y.to(device) if device else y


def load_mnist(root: str = "data", train: bool = True, device=None):
    """MNIST as ``(x, y)`` with ``x`` of shape ``(N, 1, 28, 28)`` in ``[-1, 1]``, or ``None`` with a
    printed reason when torchvision is not importable or the download fails (it is optional)."""
    try:
        from torchvision.datasets import MNIST
    except Exception as exc:  # torchvision is optional and often absent
        print(f"MNIST skipped: torchvision is not importable ({type(exc).__name__})")
        return None
    try:
        ds = MNIST(root, train=train, download=True)
    except Exception as exc:
        print(f"MNIST skipped: the download failed ({type(exc).__name__})")
        return None
    x = ds.data.float()[:, None] / 127.5 - 1.0
    y = ds.targets.long()
    return x.to(device) if device else x, y.to(device) if device else y
