"""Figures in one consistent style: white background, labelled axes (every chapter).

Each function draws on a given matplotlib ``ax`` (or a new one) and returns it,
so chapters can arrange panels freely.
"""
from __future__ import annotations

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch

__all__ = ["style", "scatter", "trajectories", "quiver", "density", "image_grid", "new_axes"]

COLORS = {"data": "#1f77b4", "model": "#d62728", "noise": "#7f7f7f", "path": "#2ca02c"}


def style() -> None:
    """Apply the book's figure style (white background, readable fonts, light grid)."""
    matplotlib.rcParams.update({
        "figure.facecolor": "white", "axes.facecolor": "white", "savefig.facecolor": "white",
        "axes.grid": True, "grid.alpha": 0.25, "font.size": 10, "axes.titlesize": 11,
        "figure.dpi": 100, "axes.spines.top": False, "axes.spines.right": False,
    })


def _np(x):
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def new_axes(n: int = 1, size: float = 3.4, **kwargs):
    """``n`` square panels side by side; returns ``(fig, axes)`` with ``axes`` always a list."""
    style()
    fig, axes = plt.subplots(1, n, figsize=(size * n, size), squeeze=False, **kwargs)
    return fig, list(axes[0])


def _frame(ax, lim, title, xlabel="$x^1$", ylabel="$x^2$"):
    if lim is not None:
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    return ax


def scatter(x, ax=None, *, title=None, lim=4.5, color=None, label=None, s=2, alpha=0.5):
    """Scatter plot of 2D samples ``(n, 2)``."""
    if ax is None:
        _, (ax,) = new_axes(1)
    x = _np(x)
    ax.scatter(x[:, 0], x[:, 1], s=s, alpha=alpha, color=color or COLORS["model"], label=label, linewidths=0)
    return _frame(ax, lim, title)


def trajectories(traj, ax=None, *, n=200, title=None, lim=4.5, color=None):
    """Trajectories ``(steps + 1, batch, 2)``: grey start points, lines, coloured end points."""
    if ax is None:
        _, (ax,) = new_axes(1)
    tr = _np(traj)[:, :n]
    ax.plot(tr[:, :, 0], tr[:, :, 1], color=color or COLORS["path"], alpha=0.35, lw=0.7)
    ax.scatter(tr[0, :, 0], tr[0, :, 1], s=4, color=COLORS["noise"], zorder=3, label="$t=0$")
    ax.scatter(tr[-1, :, 0], tr[-1, :, 1], s=4, color=COLORS["model"], zorder=3, label="$t=1$")
    return _frame(ax, lim, title)


def quiver(field, t: float, ax=None, *, lim=4.0, n=21, title=None, color="k", **kwargs):
    """Arrows of a 2D field ``field(x, t)`` on an ``n x n`` grid at time ``t``."""
    if ax is None:
        _, (ax,) = new_axes(1)
    g = torch.linspace(-lim, lim, n)
    xx, yy = torch.meshgrid(g, g, indexing="xy")
    pts = torch.stack([xx.flatten(), yy.flatten()], 1)
    with torch.no_grad():
        vel = field(pts, torch.full((pts.shape[0],), float(t)), **kwargs)
    v = _np(vel)
    ax.quiver(_np(pts[:, 0]), _np(pts[:, 1]), v[:, 0], v[:, 1], color=color, alpha=0.8, angles="xy")
    return _frame(ax, lim * 1.05, title)


def density(log_prob, ax=None, *, lim=4.5, n=200, title=None, cmap="viridis"):
    """Heat map of ``exp(log_prob(points))`` on an ``n x n`` grid; ``log_prob`` maps ``(m, 2) -> (m,)``."""
    if ax is None:
        _, (ax,) = new_axes(1)
    g = torch.linspace(-lim, lim, n)
    xx, yy = torch.meshgrid(g, g, indexing="xy")
    pts = torch.stack([xx.flatten(), yy.flatten()], 1)
    with torch.no_grad():
        lp = log_prob(pts)
    z = _np(lp.exp()).reshape(n, n)
    ax.imshow(z, origin="lower", extent=(-lim, lim, -lim, lim), cmap=cmap, aspect="equal")
    ax.grid(False)
    return _frame(ax, None, title)


def image_grid(images, ax=None, *, nrow=10, title=None, vmin=-1.0, vmax=1.0):
    """Show a batch of single-channel images ``(n, 1, H, W)`` as a grid with ``nrow`` per row."""
    if ax is None:
        style()
        _, ax = plt.subplots(figsize=(6, 6))
    x = _np(images)
    n, _, h, w = x.shape
    rows = int(np.ceil(n / nrow))
    canvas = np.full((rows * (h + 1) + 1, nrow * (w + 1) + 1), vmin, dtype=np.float32)
    for i in range(n):
        r, c = divmod(i, nrow)
        canvas[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + c * (w + 1): 1 + c * (w + 1) + w] = x[i, 0]
    ax.imshow(canvas, cmap="gray_r", vmin=vmin, vmax=vmax)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    if title:
        ax.set_title(title)
    return ax
