r"""Distances between sample sets, likelihood units and path straightness (chapters 3-10).

* :func:`w2` -- the exact 2-Wasserstein distance between two empirical
  distributions, :math:`W_2(a, b)^2 = \min_\pi \frac1n \sum_i \lVert a_i - b_{\pi(i)} \rVert^2`
  for equal sizes (an assignment problem, solved exactly), or by an exact
  transport plan (POT) for unequal sizes.
* :func:`mmd` -- the unbiased squared maximum mean discrepancy with a sum of
  Gaussian kernels.
* :func:`bits_per_dim` -- negative log-likelihood in nats converted to bits per dimension.
* :func:`straightness` -- how far a trajectory's velocity strays from its chord.
* :func:`data_band`, :class:`Band`, :func:`compare_runs` -- a distance between two sample sets
  is itself a random number: the band of the same distance between two independent draws of
  the data, and a comparison of models over seeds that claims only what the spread allows.
* :func:`geodesic_w2` -- the exact 2-Wasserstein distance between point sets of a manifold, with the
  geodesic distance as ground cost (chapter 13).
* :func:`tv` -- the total-variation distance between the empirical distributions of two sets of
  discrete samples (token sequences, chapter 12); ``data_band(q, n, metric="tv")`` gives its band.
* :func:`frechet_distance` -- the Fréchet distance between the Gaussians fitted to two sets of feature
  vectors (FID's formula, with a classifier of the chapter as the feature map, chapter 11);
  ``data_band(features, n, metric="frechet")`` gives its band.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial.distance import cdist

from . import _checks, assignment
from .manifolds import get_manifold

__all__ = ["w2", "mmd", "bits_per_dim", "straightness", "data_band", "Band", "BandVerdict", "compare_runs",
           "RunComparison", "METRICS", "geodesic_w2", "tv", "frechet_distance"]


def _two_sets(a, b):
    _checks.tensor("a", a, ndim=2)
    _checks.tensor("b", b, ndim=2)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must have the same dimension, got {a.shape[1]} and {b.shape[1]}")
    if a.shape[0] == 0 or b.shape[0] == 0:
        raise ValueError("a and b must not be empty")


def w2(a: torch.Tensor, b: torch.Tensor) -> float:
    r"""Exact :math:`W_2` between the empirical distributions of ``a`` ``(n, D)`` and ``b`` ``(m, D)``."""
    _two_sets(a, b)
    A = a.detach().to("cpu", torch.float64).flatten(1).numpy()
    B = b.detach().to("cpu", torch.float64).flatten(1).numpy()
    cost = cdist(A, B, "sqeuclidean")  # direct differences: exactly 0 for identical points
    return _w2_from_cost(cost)


def _w2_from_cost(cost: np.ndarray) -> float:
    """:math:`\sqrt{\min_\pi \langle \pi, C\rangle}` over transport plans between uniform weights: an exact
    assignment for a square ``cost`` (certified optimal, chapter 8), an exact plan (POT) otherwise."""
    n, m = cost.shape
    if n == m:
        c = assignment.solve(cost)
        return float(math.sqrt(max(cost[np.arange(n), c].mean(), 0.0)))
    import ot  # POT: importing it takes over a second, and only unequal sizes need it

    return float(math.sqrt(max(ot.emd2(np.full(n, 1.0 / n), np.full(m, 1.0 / m), cost, numItermax=10_000_000), 0.0)))


def mmd(a: torch.Tensor, b: torch.Tensor, bandwidths=(0.1, 0.3, 1.0, 3.0)) -> float:
    r"""Unbiased squared MMD with kernel :math:`\sum_h \exp(-\lVert x - y\rVert^2 / (2h^2))`."""
    _two_sets(a, b)
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("mmd needs at least two samples in each set")
    _checks.same_device(a=a, b=b)
    a, b = a.detach().double(), b.detach().double().to(a.device)
    if isinstance(bandwidths, (int, float)) and not isinstance(bandwidths, bool):
        bandwidths = (bandwidths,)
    if not isinstance(bandwidths, (tuple, list)) or not bandwidths:
        raise ValueError(f"bandwidths must be a non-empty sequence of positive numbers, got {bandwidths!r}")
    hs = [_checks.number("bandwidth", h, lo=0.0, lo_open=True) for h in bandwidths]

    def k(x, y):
        d2 = torch.cdist(x, y).pow(2)
        return sum(torch.exp(-d2 / (2 * h * h)) for h in hs)

    n, m = a.shape[0], b.shape[0]
    kaa, kbb, kab = k(a, a), k(b, b), k(a, b)
    saa = (kaa.sum() - kaa.diagonal().sum()) / (n * (n - 1))
    sbb = (kbb.sum() - kbb.diagonal().sum()) / (m * (m - 1))
    return float(saa + sbb - 2 * kab.mean())


def bits_per_dim(nll_nats, dim: int):
    """Convert a negative log-likelihood in nats (per sample) to bits per dimension."""
    _checks.positive_int("dim", dim)
    if isinstance(nll_nats, bool) or not isinstance(nll_nats, (int, float, torch.Tensor)):
        raise TypeError(f"nll_nats must be a number or a tensor (nats per sample), got {_checks.describe(nll_nats)}")
    return nll_nats / (dim * math.log(2.0))


def straightness(trajectory: torch.Tensor, times: torch.Tensor | None = None) -> float:
    r"""Mean squared deviation of the velocity from the chord along trajectories:

    .. math:: S = \mathbb E\int_0^1 \lVert \dot x_t - (x_1 - x_0) \rVert^2 dt ,

    estimated from a trajectory ``(steps + 1, batch, ...)`` at monotone ``times`` (default: equally
    spaced on ``[0, 1]``; a non-uniform grid is allowed) by finite differences, each interval
    weighted by its length and the integral divided by the time span.  ``S = 0`` exactly for
    straight paths travelled at constant speed; on ``[0, 1]``,
    :math:`S = \mathbb E\int_0^1 \lVert\dot x_t\rVert^2 dt - \mathbb E\lVert x_1 - x_0\rVert^2`.
    The finite-difference value never exceeds the continuous one (Jensen), and converges to it
    as the grid is refined.  Derived and used in chapter 8.
    """
    _checks.tensor("trajectory", trajectory)
    if trajectory.ndim < 3 or trajectory.shape[0] < 2:
        raise ValueError(f"trajectory must have shape (steps + 1, batch, ...) with steps >= 1, "
                         f"got {tuple(trajectory.shape)}")
    steps = trajectory.shape[0] - 1
    if times is None:
        h = torch.full((steps,), 1.0 / steps, dtype=trajectory.dtype, device=trajectory.device)
    else:
        _checks.tensor("times", times, ndim=1)
        if times.shape[0] != steps + 1:
            raise ValueError(f"times must have {steps + 1} entries to match the trajectory, got {times.shape[0]}")
        h = (times[1:] - times[:-1]).to(device=trajectory.device, dtype=trajectory.dtype)
        if not (bool((h > 0).all()) or bool((h < 0).all())):
            raise ValueError("times must be strictly increasing (or strictly decreasing for a backward solve)")
    span = float(h.sum())
    shape = (steps,) + (1,) * (trajectory.ndim - 1)
    vel = (trajectory[1:] - trajectory[:-1]) / h.view(shape)  # (steps, batch, ...)
    chord = (trajectory[-1] - trajectory[0]) / span
    dev = (vel - chord[None]).flatten(2).pow(2).sum(-1)  # (steps, batch)
    dev = (dev * h[:, None]).sum(0) / span  # time average per trajectory, (batch,)
    return float(dev.mean())


#: The sample distances that :func:`data_band` knows by name.
METRICS = {"w2": w2, "mmd": mmd}


def _metric(metric):
    if callable(metric):
        return getattr(metric, "__name__", "distance"), metric
    _checks.choice("metric", metric, METRICS)
    return metric, METRICS[metric]


def _values(name, values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().reshape(-1).tolist()
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = [values]
    if not isinstance(values, (list, tuple, np.ndarray)) or len(values) == 0:
        raise TypeError(f"{name} must be a number or a non-empty sequence of numbers, got {_checks.describe(values)}")
    out = np.asarray(values, dtype=float).reshape(-1)
    if not np.isfinite(out).all():
        raise ValueError(f"{name} contains NaN or infinite values: {out.tolist()}")
    return out


@dataclass(frozen=True)
class BandVerdict:
    """How model distances (one per seed, or per evaluation draw) sit against a :class:`Band`: their
    ``mean`` and ``std``, how many lie ``below``, ``inside`` and ``above`` the band, and a one-word ``verdict``:
    ``'indistinguishable'`` (every value inside the band), ``'worse'`` (every value above it),
    ``'below'`` (every value below it: chance, or samples that copy the training set) or ``'mixed'``."""

    mean: float
    std: float
    below: int
    inside: int
    above: int
    verdict: str

    def __str__(self) -> str:
        n = self.below + self.inside + self.above
        spread = f" ± {self.std:.3g} over {n} values" if n > 1 else ""
        return (f"{self.mean:.3g}{spread}: {self.verdict} ({self.inside} of {n} inside the band, "
                f"{self.above} above, {self.below} below)")


@dataclass(frozen=True)
class Band:
    r"""The sampling distribution of a distance between two independent draws of ``n`` data points.

    ``values`` holds the distance for each of ``repeats`` pairs of draws. A model whose samples had
    exactly the data's distribution would give a distance (to ``n`` data points) drawn from this same
    distribution, so the band ``[lo, hi]`` (the smallest and largest of the repeats) is the range
    within which a model cannot be told apart from the data at this sample size; a single such
    model lands above ``hi`` with probability about ``1 / (repeats + 1)``.
    """

    metric: str
    n: int
    values: tuple

    @property
    def mean(self) -> float:
        """The mean distance over the repeats."""
        return float(np.mean(self.values))

    @property
    def std(self) -> float:
        """The standard deviation over the repeats."""
        return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else 0.0

    @property
    def lo(self) -> float:
        """The smallest distance over the repeats (the band's lower end)."""
        return float(np.min(self.values))

    @property
    def hi(self) -> float:
        """The largest distance over the repeats (the band's upper end)."""
        return float(np.max(self.values))

    def compare(self, values) -> BandVerdict:
        """Place one model distance, or one per seed, against the band (see :class:`BandVerdict`)."""
        v = _values("values", values)
        below, above = int((v < self.lo).sum()), int((v > self.hi).sum())
        inside = v.size - below - above
        if inside == v.size:
            verdict = "indistinguishable"
        elif above == v.size:
            verdict = "worse"
        elif below == v.size:
            verdict = "below"
        else:
            verdict = "mixed"
        std = float(np.std(v, ddof=1)) if v.size > 1 else 0.0
        return BandVerdict(float(v.mean()), std, below, inside, above, verdict)

    def compare_mean(self, values, *, z: float = 2.0) -> "RunComparison":
        """Several model distances (one per seed or evaluation draw) against the band as two samples:
        the difference of their mean from the band's mean, with its standard error
        (:func:`compare_runs`; ``'a lower'`` means the model is closer than two data draws are).

        Prefer this to :meth:`compare` for several values: even a model with the data's distribution
        has each value outside ``[lo, hi]`` with probability about ``2 / (repeats + 1)``, so with many
        seeds :meth:`compare` often says ``'mixed'`` by chance alone."""
        return compare_runs(values, self.values, z=z, names=("model", "data vs data"))

    def __str__(self) -> str:
        return (f"{self.metric} between two data draws of n = {self.n}: {self.mean:.3g} ± {self.std:.3g} "
                f"(band {self.lo:.3g} to {self.hi:.3g} over {len(self.values)} repeats)")


def data_band(data, n: int, *, metric="w2", repeats: int = 20, generator: torch.Generator | None = None) -> Band:
    r"""The band of a sample distance between two independent draws of ``n`` data points.

    Args:
        data: a sampler called as ``data(n, generator=g)`` (every :mod:`cfmlib.datasets` toy), or a
            tensor ``(N, D)`` with ``N >= 2 n``, from which two disjoint random subsets are drawn.
        n: the sample size, the same as the model samples it will be compared with.
        metric: ``'w2'``, ``'mmd'``, ``'tv'`` (discrete data), ``'frechet'`` (feature vectors) or a
            function ``metric(a, b) -> float``.
        repeats: how many independent pairs of draws.
        generator: the random generator of the draws (seeded bands).

    Returns:
        a :class:`Band`; ``band.compare(d)`` places a model's distance ``d`` (or one per seed) against it.
    """
    _checks.positive_int("n", n)
    _checks.positive_int("repeats", repeats)
    _checks.generator("generator", generator)
    if repeats < 2:
        raise ValueError(f"repeats must be at least 2 to have a spread, got {repeats}")
    name, fn = _metric(metric)
    if isinstance(data, torch.Tensor):
        _checks.tensor("data", data, ndim=2, floating=False)  # integer tokens too (metric="tv")
        if data.shape[0] < 2 * n:
            raise ValueError(f"data holds {data.shape[0]} points, fewer than the 2 n = {2 * n} that two disjoint "
                             f"draws need; use a smaller n or pass a sampler")

        def draw(g):
            idx = torch.randperm(data.shape[0], generator=g)[: 2 * n].to(data.device)
            return data[idx[:n]], data[idx[n:]]
    elif callable(data):
        def draw(g):
            a, b = data(n, generator=g), data(n, generator=g)
            for k, x in (("a", a), ("b", b)):
                if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[0] != n:
                    raise ValueError(f"data(n, generator=g) must return a tensor of shape (n, D) = ({n}, D), "
                                     f"got {_checks.describe(x)}")
            return a, b
    else:
        raise TypeError(f"data must be a sampler data(n, generator=g) or a tensor (N, D), got {_checks.describe(data)}")
    values = []
    for _ in range(repeats):
        a, b = draw(generator)
        values.append(float(fn(a, b)))
    return Band(name, n, tuple(values))


@dataclass(frozen=True)
class RunComparison:
    """Two methods' distances over seeds: means, standard deviations, the difference of the means
    ``a - b`` with its standard error, and ``verdict``: ``'a lower'``, ``'b lower'`` (the difference
    exceeds ``z`` standard errors) or ``'no clear difference'``."""

    mean_a: float
    std_a: float
    mean_b: float
    std_b: float
    diff: float
    se: float
    verdict: str
    names: tuple = ("a", "b")

    def __str__(self) -> str:
        a, b = self.names
        verdict = self.verdict.replace("a lower", f"{a} lower").replace("b lower", f"{b} lower")
        return (f"{a}: {self.mean_a:.3g} ± {self.std_a:.3g}, {b}: {self.mean_b:.3g} ± {self.std_b:.3g}; "
                f"difference {self.diff:+.3g} ± {self.se:.2g} (s.e.): {verdict}")


def compare_runs(a, b, *, z: float = 2.0, names=("a", "b")) -> RunComparison:
    r"""Compare two methods by a distance measured over several seeds each (lower is better).

    The difference of the means is called real only when it exceeds ``z`` times its standard error
    :math:`\sqrt{s_a^2/n_a + s_b^2/n_b}` (Welch); with fewer than two seeds per method nothing is claimed.
    """
    va, vb = _values("a", a), _values("b", b)
    _checks.number("z", z, lo=0.0, lo_open=True)
    if not (isinstance(names, (tuple, list)) and len(names) == 2 and all(isinstance(x, str) for x in names)):
        raise TypeError(f"names must be two strings, got {_checks.describe(names)}")
    sa = float(np.std(va, ddof=1)) if va.size > 1 else float("nan")
    sb = float(np.std(vb, ddof=1)) if vb.size > 1 else float("nan")
    diff = float(va.mean() - vb.mean())
    se = math.sqrt(sa**2 / va.size + sb**2 / vb.size) if va.size > 1 and vb.size > 1 else float("nan")
    if not math.isfinite(se):
        verdict = "no clear difference"
    elif diff < -z * se:
        verdict = "a lower"
    elif diff > z * se:
        verdict = "b lower"
    else:
        verdict = "no clear difference"
    return RunComparison(float(va.mean()), sa, float(vb.mean()), sb, diff, se, verdict, tuple(names))


def geodesic_w2(a: torch.Tensor, b: torch.Tensor, manifold) -> float:
    r"""Exact :math:`W_2` between the empirical distributions of points ``a`` ``(n, c)`` and ``b`` ``(m, c)``
    of a manifold, with the squared geodesic distance as ground cost (chapter 13):
    :math:`W_2(a, b)^2 = \min_\pi \frac1n \sum_i d_M(a_i, b_{\pi(i)})^2` for equal sizes (the same exact
    assignment as :func:`w2`), an exact transport plan (POT) otherwise.

    ``manifold`` is a :class:`cfmlib.manifolds.Manifold` (or a name, ``'sphere'`` / ``'torus'``); the
    points must lie on it.  On the torus this is the distance that sees across the seams, where
    :func:`w2` of the raw angles would count a step from :math:`\pi - \epsilon` to
    :math:`-\pi + \epsilon` as a whole turn.  For a sample band use it as
    ``data_band(q, n, metric=lambda a, b: geodesic_w2(a, b, manifold))``.
    """
    m = get_manifold(manifold)
    _two_sets(a, b)
    A = a.detach().to("cpu", torch.float64)
    B = b.detach().to("cpu", torch.float64)
    return _w2_from_cost(m.pairwise_dist(A, B).pow(2).numpy())


def tv(a: torch.Tensor, b: torch.Tensor) -> float:
    r"""Total-variation distance between the empirical distributions of the rows of ``a`` ``(n, ...)`` and
    ``b`` ``(m, ...)``, for discrete data such as token sequences (chapter 12):

    .. math::  \mathrm{TV}(a, b) = \tfrac12 \sum_x \big| \#\{i: a_i = x\}/n - \#\{j: b_j = x\}/m \big| \in [0, 1].

    Rows are compared exactly (any dtype), so this is meant for small state spaces, where a sample of
    size ``n`` visits each state many times; even two draws of the same distribution differ by about
    :math:`\sum_x \sqrt{q(x)/n}` (read a value against ``data_band(q, n, metric="tv")``). Samples of
    a continuous distribution are all distinct and give 1.
    """
    for name, x in (("a", a), ("b", b)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of samples (n, ...), got {_checks.describe(x)}")
        if x.ndim < 1 or x.shape[0] == 0:
            raise ValueError(f"{name} must hold at least one sample, shape (n, ...), got shape {tuple(x.shape)}")
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"a and b must hold samples of the same shape, got {tuple(a.shape[1:])} and {tuple(b.shape[1:])}")
    _checks.same_device(a=a, b=b)
    n = a.shape[0]
    rows = torch.cat([a.detach().reshape(n, -1), b.detach().reshape(b.shape[0], -1).to(a.dtype)])
    _, idx = torch.unique(rows, dim=0, return_inverse=True)
    k = int(idx.max()) + 1
    pa = torch.bincount(idx[:n], minlength=k).double() / n
    pb = torch.bincount(idx[n:], minlength=k).double() / b.shape[0]
    return float(0.5 * (pa - pb).abs().sum())


METRICS["tv"] = tv


def frechet_distance(a: torch.Tensor, b: torch.Tensor, *, features=None) -> float:
    r"""The Fréchet distance between two sets of feature vectors ``a`` ``(n, D)`` and ``b`` ``(m, D)``
    (Heusel et al., 2017; chapter 11): the squared 2-Wasserstein distance between the Gaussians with
    their means and covariances,

    .. math::  \mathrm{FD}(a, b) = \lVert \mu_a - \mu_b\rVert^2
               + \operatorname{tr}\Big(\Sigma_a + \Sigma_b - 2\big(\Sigma_a^{1/2}\Sigma_b\Sigma_a^{1/2}\big)^{1/2}\Big).

    With ``features`` (a callable, e.g. a classifier's penultimate layer) the distance is computed between
    ``features(a)`` and ``features(b)`` (evaluated without gradients, in batches of 4,096): with an image
    classifier's features this is the FID recipe.  Covariances use ``n - 1``; everything runs in float64,
    the matrix square roots through symmetric eigendecompositions (no complex round-off).  The value is
    biased upwards at small ``n`` (even two draws of one distribution give ``FD > 0``): read it against
    ``data_band(features_of_data, n, metric="frechet")``.
    """
    if features is not None:
        if not callable(features):
            raise TypeError(f"features must be a callable (a module or function of a batch), got {_checks.describe(features)}")
        with torch.no_grad():
            a = torch.cat([features(c) for c in a.split(4096)]) if isinstance(a, torch.Tensor) else features(a)
            b = torch.cat([features(c) for c in b.split(4096)]) if isinstance(b, torch.Tensor) else features(b)
    _two_sets(a, b)
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"frechet_distance needs at least two samples in each set (covariances), got {a.shape[0]} and {b.shape[0]}")
    A = a.detach().to("cpu", torch.float64)
    B = b.detach().to("cpu", torch.float64)
    mu_a, mu_b = A.mean(0), B.mean(0)
    cov_a, cov_b = torch.cov(A.T, correction=1).reshape(A.shape[1], -1), torch.cov(B.T, correction=1).reshape(B.shape[1], -1)
    ev, vec = torch.linalg.eigh(cov_a)
    root_a = (vec * ev.clamp(min=0).sqrt()) @ vec.T                   # Sigma_a^(1/2), symmetric
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    fd = (mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross
    return float(fd.clamp(min=0))


METRICS["frechet"] = frechet_distance
