r"""Flow matching on manifolds: the sphere and the flat torus (chapter 13).

Riemannian flow matching (Chen and Lipman, 2024) keeps everything of flow matching but the
straight line: the conditional path runs along the geodesic from a source point to a data point,

.. math::  x_t = \psi_t(x_0 \mid x_1) = \exp_{x_0}\!\big(t \log_{x_0}(x_1)\big),
           \qquad u_t(x_t \mid x_1) = \tfrac{d}{dt} x_t = \frac{\log_{x_t}(x_1)}{1 - t},

with the source :math:`p_0` uniform on the manifold.  A manifold here is a small object defined by
its geometry -- :meth:`~Manifold.exp`, :meth:`~Manifold.log`, the projections of points and of
vectors, the geodesic distance, uniform sampling and its volume -- and everything else is derived
in one place:

* :class:`Sphere` -- :math:`S^d \subset \mathbb R^{d+1}` (points are unit vectors; ``S^2`` by default);
* :class:`FlatTorus` -- :math:`T^d = \mathbb R^d / 2\pi\mathbb Z^d` (points are angles in
  :math:`[-\pi, \pi)`; flat, so its geodesics are straight lines that wrap around);
* :class:`GeodesicPath` -- the path above as a :class:`cfmlib.paths.ProbabilityPath`, so that
  ``cfmlib.train(model, data, path=GeodesicPath("sphere"))`` trains with the Riemannian CFM loss
  :math:`\lVert P_{x_t} v_\theta(x_t, t) - u_t(x_t \mid x_1)\rVert_g^2`;
* :class:`TangentMLP` -- a network whose output lies in the tangent space (periodic inputs on the torus);
* :func:`odeint` / :func:`sample` -- solvers that stay on the manifold (projected Euler, midpoint
  and RK4, or exponential-map Euler steps);
* :func:`divergence` / :func:`log_prob` -- the Riemannian divergence and log-densities with respect
  to the Riemannian volume, by the instantaneous change of variables on the manifold;
* :class:`VonMisesFisherMixture` (on ``S^2``) and :class:`WrappedNormalMixture` (on ``T^d``) --
  data with closed-form densities and exact samplers.

Shapes: points and tangent vectors are ``(batch, coord_dim)`` (``coord_dim = d + 1`` on the
sphere, ``d`` on the torus); ``t`` is a number or a ``(batch,)`` tensor in ``[0, 1]``.  The
metric is the Euclidean inner product of these coordinates on both manifolds.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import _checks
from .device import get_device
from .likelihood import LogProbResult, jacobian_trace
from .models import MODELS, sinusoidal_embedding, time_as_batch
from .paths import ProbabilityPath
from .solvers import Solution

__all__ = ["Manifold", "Sphere", "FlatTorus", "MANIFOLDS", "get_manifold", "GeodesicPath", "TangentMLP",
           "RETRACTIONS", "odeint", "sample", "divergence", "log_prob", "VonMisesFisherMixture",
           "WrappedNormalMixture"]

#: How far a point may lie from the manifold, by dtype, before it is rejected as input.
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def _tol(dtype) -> float:
    return TOLERANCE.get(dtype, 1e-4)


def _sinc(r: torch.Tensor) -> torch.Tensor:
    r""":math:`\sin(r)/r`, with its Taylor series near 0 (finite values and gradients everywhere)."""
    small = r.abs() < 1e-3
    safe = torch.where(small, torch.ones_like(r), r)
    return torch.where(small, 1.0 - r * r / 6.0, torch.sin(safe) / safe)


class Manifold:
    r"""Base class: a Riemannian manifold given in coordinates ``(batch, coord_dim)``.

    A subclass writes the geometry -- ``_exp``, ``_log``, ``_proj``, ``_proj_tangent``,
    ``_dist``, ``_geodesic``, ``_uniform``, ``_off``, ``log_volume`` and, when the metric bends the
    coordinates, ``_div`` -- without argument checks; the public methods check their arguments once
    and call them.  The solvers and the loss call the unchecked versions in their loops.
    """

    name = "manifold"
    dim: int  # intrinsic dimension
    coord_dim: int  # coordinates per point

    # --- checks ------------------------------------------------------------------------------
    def check_points(self, name: str, x, values: bool = True) -> torch.Tensor:
        """Raise unless ``x`` is a ``(batch, coord_dim)`` floating tensor of points of this manifold
        (within :data:`TOLERANCE` of its dtype; ``values=False`` checks shape and dtype only)."""
        _checks.tensor(name, x, finite=values)
        if x.ndim != 2 or x.shape[1] != self.coord_dim:
            raise ValueError(f"{name} must have shape (batch, {self.coord_dim}) for points of {self!r}, "
                             f"got shape {tuple(x.shape)}")
        if values and x.numel() and x.device.type != "meta":
            off = float(self._off(x.detach()).max())
            if off > _tol(x.dtype):
                raise ValueError(f"{name} does not lie on {self!r}: a point is {off:.3g} away from it "
                                 f"(tolerance {_tol(x.dtype):g} for {x.dtype}). {self._hint(x)}")
        return x

    def _hint(self, x) -> str:
        return "Project the points first with manifold.proj(x)."

    def _pair(self, name_a, a, name_b, b, values=True):
        self.check_points(name_a, a, values)
        _checks.tensor(name_b, b, finite=values)
        _checks.same_shape(name_a, a, name_b, b)
        _checks.same_device(**{name_a: a, name_b: b})
        _checks.same_dtype(**{name_a: a, name_b: b})

    # --- the geometry (checked front doors) --------------------------------------------------
    def exp(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        r"""The exponential map :math:`\exp_x(u)`: follow the geodesic from ``x`` with initial velocity
        ``u`` (a tangent vector at ``x``) for unit time. Shape ``(batch, coord_dim)``."""
        self._pair("x", x, "u", u)
        if x.numel() and x.device.type != "meta":
            off = float(self._normal_part(x.detach(), u.detach()).max())
            if off > _tol(x.dtype) * (1.0 + float(u.detach().abs().max())):
                raise ValueError(f"u is not tangent to {self!r} at x (a normal component of {off:.3g}); "
                                 f"project it first with manifold.proj_tangent(x, u)")
        return self._exp(x, u)

    def log(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        r"""The logarithm map :math:`\log_x(y)`: the tangent vector at ``x`` whose geodesic reaches ``y``
        at unit time, with length :math:`d(x, y)`. Undefined on the cut locus of ``x`` (the antipode on
        the sphere, the points half a turn away in some angle on the torus)."""
        self._pair("x", x, "y", y)
        self.check_points("y", y)
        return self._log(x, y)

    def proj(self, x: torch.Tensor) -> torch.Tensor:
        """The closest point of the manifold to each row of ``x`` (its coordinates made canonical)."""
        _checks.tensor("x", x)
        if x.ndim != 2 or x.shape[1] != self.coord_dim:
            raise ValueError(f"x must have shape (batch, {self.coord_dim}), got shape {tuple(x.shape)}")
        self._check_projectable(x)
        return self._proj(x)

    def _check_projectable(self, x):
        pass

    def proj_tangent(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        r"""The orthogonal projection :math:`P_x u` of ambient vectors ``u`` onto the tangent space at ``x``."""
        self._pair("x", x, "u", u)
        return self._proj_tangent(x, u)

    def dist(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        r"""The geodesic distance :math:`d(x, y) = \lVert \log_x(y) \rVert_g`, shape ``(batch,)``."""
        self._pair("x", x, "y", y)
        self.check_points("y", y)
        return self._dist(x, y)

    def inner(self, x: torch.Tensor, u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        r"""The metric :math:`\langle u, w\rangle_g` at ``x`` (the coordinates' dot product), shape ``(batch,)``."""
        self._pair("x", x, "u", u)
        _checks.same_shape("u", u, "w", w)
        return (u * w).sum(-1)

    def geodesic(self, x0: torch.Tensor, x1: torch.Tensor, t):
        r"""The point and velocity of the constant-speed geodesic from ``x0`` (``t = 0``) to ``x1``
        (``t = 1``): :math:`x_t = \exp_{x_0}(t \log_{x_0} x_1)` and :math:`\dot x_t`, each ``(batch, coord_dim)``.

        The velocity is written without dividing by :math:`1 - t`, so it is exact at ``t = 1``."""
        self._pair("x0", x0, "x1", x1)
        self.check_points("x1", x1)
        t = _checks.time("t", t, x0.shape[0], like=x0)
        return self._geodesic(x0, x1, t)

    def uniform(self, n: int, *, generator: torch.Generator | None = None, device=None, dtype=None) -> torch.Tensor:
        r"""``n`` points drawn uniformly (with respect to the Riemannian volume), shape ``(n, coord_dim)``.

        The density of this distribution is :math:`e^{-\text{log\_volume}}` everywhere."""
        _checks.positive_int("n", n)
        _checks.generator("generator", generator)
        dev = get_device(device) if device is not None else (generator.device if generator is not None
                                                             else torch.device("cpu"))
        gen_dev = generator.device if generator is not None else dev
        x = self._uniform(n, generator, gen_dev, dtype or torch.get_default_dtype())
        return x.to(dev)

    def off_manifold(self, x: torch.Tensor) -> torch.Tensor:
        r"""How far each row of ``x`` lies from the manifold, shape ``(batch,)``: :math:`|\lVert x\rVert - 1|`
        on the sphere, the distance to the box :math:`[-\pi, \pi]^d` on the torus."""
        _checks.tensor("x", x, finite=False)
        if x.ndim != 2 or x.shape[1] != self.coord_dim:
            raise ValueError(f"x must have shape (batch, {self.coord_dim}), got shape {tuple(x.shape)}")
        return self._off(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """What a network sees of a point: the coordinates themselves (periodic features on the torus)."""
        return x

    @property
    def n_features(self) -> int:
        """The number of features the tangent networks see for one point."""
        return self.coord_dim

    # --- the geometry (unchecked; subclasses) -----------------------------------------------------------
    log_volume: float

    def _exp(self, x, u):  # pragma: no cover - abstract
        raise NotImplementedError

    def _log(self, x, y):  # pragma: no cover - abstract
        raise NotImplementedError

    def _proj(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def _proj_tangent(self, x, u):
        return u

    def _dist(self, x, y):  # pragma: no cover - abstract
        raise NotImplementedError

    def _geodesic(self, x0, x1, t):  # pragma: no cover - abstract
        raise NotImplementedError

    def _uniform(self, n, generator, device, dtype):  # pragma: no cover - abstract
        raise NotImplementedError

    def _off(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def _normal_part(self, x, u):
        """The size of the component of ``u`` normal to the manifold at ``x``, shape ``(batch,)``."""
        return (u - self._proj_tangent(x, u)).norm(dim=-1)

    def _sq_norm(self, x, u):
        """:math:`\\lVert u\\rVert_g^2` at ``x``, shape ``(batch,)`` (the coordinates' metric)."""
        return u.pow(2).sum(-1)

    def _div(self, out, x, create_graph=False):
        """Riemannian divergence of the tangent field ``out`` (computed from ``x`` with autograd)."""
        return jacobian_trace(out, x, create_graph)

    def pairwise_dist(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Geodesic distances between every row of ``a`` ``(n, c)`` and of ``b`` ``(m, c)``, shape ``(n, m)``."""
        self.check_points("a", a)
        self.check_points("b", b)
        _checks.same_device(a=a, b=b)
        return self._dist(a[:, None, :], b[None, :, :])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim})"


class Sphere(Manifold):
    r"""The unit sphere :math:`S^d = \{x \in \mathbb R^{d+1} : \lVert x\rVert = 1\}` with the metric of
    :math:`\mathbb R^{d+1}` (``d = 2`` by default: directions in space, positions on the Earth).

    * tangent space :math:`T_x S^d = \{u : x^\top u = 0\}`, projection :math:`P_x = I - x x^\top`;
    * :math:`\exp_x(u) = \cos(\lVert u\rVert)\, x + \sin(\lVert u\rVert)\, u / \lVert u\rVert`;
    * :math:`\log_x(y) = \theta\, w / \lVert w\rVert` with :math:`w = P_x y`,
      :math:`\theta = d(x, y) = \operatorname{atan2}(\lVert w\rVert, x^\top y)`; the cut locus of
      ``x`` is its antipode ``-x``;
    * Riemannian divergence of a tangent field with ambient Jacobian :math:`J` (of any extension):
      :math:`\operatorname{div} u = \operatorname{tr} J - x^\top J x`.
    """

    name = "sphere"

    def __init__(self, dim: int = 2):
        self.dim = _checks.positive_int("dim", dim)
        self.coord_dim = dim + 1
        # area of S^d: 2 pi^((d+1)/2) / Gamma((d+1)/2)
        self.log_volume = math.log(2.0) + 0.5 * (dim + 1) * math.log(math.pi) - math.lgamma(0.5 * (dim + 1))

    def _hint(self, x) -> str:
        return "Points of the sphere are unit vectors; normalise them with manifold.proj(x) = x / |x|."

    def _check_projectable(self, x):
        if x.numel() and bool((x.norm(dim=-1) == 0).any()):
            raise ValueError("x has a zero row, which has no closest point on the sphere")

    def _proj(self, x):
        return x / x.norm(dim=-1, keepdim=True)

    def _proj_tangent(self, x, u):
        return u - (x * u).sum(-1, keepdim=True) * x

    def _exp(self, x, u):
        r = u.norm(dim=-1, keepdim=True)
        y = torch.cos(r) * x + _sinc(r) * u
        return y / y.norm(dim=-1, keepdim=True)  # on the sphere up to rounding; this removes the rounding

    def _angle(self, x, y):
        c = (x * y).sum(-1, keepdim=True)
        w = y - c * x
        s = w.norm(dim=-1, keepdim=True)
        return torch.atan2(s, c), w, s

    def _log(self, x, y):
        theta, w, s = self._angle(x, y)
        # theta / sin(theta) * w, with sin(theta) = |w|; the ratio is 1 + theta^2 / 6 + ... near theta = 0
        big = s > 1e-12
        ratio = torch.where(big, theta / torch.where(big, s, torch.ones_like(s)), 1.0 + theta * theta / 6.0)
        return ratio * w

    def _dist(self, x, y):
        return self._angle(x, y)[0].squeeze(-1)

    def _geodesic(self, x0, x1, t):
        # theta = d(x0, x1), e = the unit tangent at x0 towards x1 (0 when x1 = x0):
        # x_t = cos(t theta) x0 + sin(t theta) e and its time derivative, without dividing by 1 - t
        theta, w, s = self._angle(x0, x1)
        e = w / torch.where(s > 1e-12, s, torch.ones_like(s))
        a = t.to(x0.dtype).reshape(-1, 1) * theta
        cos, sin = torch.cos(a), torch.sin(a)
        return cos * x0 + sin * e, theta * (cos * e - sin * x0)

    def _uniform(self, n, generator, device, dtype):
        z = torch.randn(n, self.coord_dim, generator=generator, device=device, dtype=dtype)
        return z / z.norm(dim=-1, keepdim=True)

    def _off(self, x):
        return (x.norm(dim=-1) - 1.0).abs()

    def _div(self, out, x, create_graph=False):
        # tr(P J P) = tr J - x^T J x: the trace of the ambient Jacobian over the tangent space.
        # One batched backward pass gives the rows e_i^T J and x^T J together.
        b, c = x.shape
        xn = x if create_graph else x.detach()
        basis = torch.eye(c, dtype=x.dtype, device=x.device).reshape(c, 1, c).expand(c, b, c)
        (rows,) = torch.autograd.grad(out, x, grad_outputs=torch.cat([basis, xn[None]]), is_grads_batched=True,
                                      create_graph=create_graph)
        return torch.einsum("ibi->b", rows[:c]) - (rows[c] * xn).sum(-1)


class FlatTorus(Manifold):
    r"""The flat torus :math:`T^d = \mathbb R^d / 2\pi \mathbb Z^d` (``d = 2`` by default: pairs of angles,
    such as the backbone dihedral angles of a protein), points as angles in :math:`[-\pi, \pi)`.

    The metric is that of :math:`\mathbb R^d`, so geodesics are straight lines that leave the square
    on one side and come back on the other:
    :math:`\exp_x(u) = \operatorname{wrap}(x + u)`, :math:`\log_x(y) = \operatorname{wrap}(y - x)` with
    :math:`\operatorname{wrap}(a) = ((a + \pi) \bmod 2\pi) - \pi` taken per angle.  The cut locus of
    ``x`` is where some angle differs from ``x``'s by exactly :math:`\pi`.  The divergence is the
    ordinary one in the angle coordinates.
    """

    name = "torus"

    def __init__(self, dim: int = 2):
        self.dim = _checks.positive_int("dim", dim)
        self.coord_dim = dim
        self.log_volume = dim * math.log(2.0 * math.pi)

    def _hint(self, x) -> str:
        big = float(x.abs().max()) if x.numel() else 0.0
        extra = " (the values look like degrees: convert with torch.deg2rad)" if big > 7.0 else ""
        return f"Points of the torus are angles in radians in [-pi, pi); wrap them with manifold.proj(x){extra}."

    @staticmethod
    def _wrap(a):
        return torch.remainder(a + math.pi, 2.0 * math.pi) - math.pi

    def _proj(self, x):
        return self._wrap(x)

    def _exp(self, x, u):
        return self._wrap(x + u)

    def _log(self, x, y):
        return self._wrap(y - x)

    def _dist(self, x, y):
        return self._wrap(y - x).norm(dim=-1)

    def _geodesic(self, x0, x1, t):
        v = self._wrap(x1 - x0)
        return self._wrap(x0 + t.to(x0.dtype).reshape(-1, 1) * v), v

    def _uniform(self, n, generator, device, dtype):
        return (torch.rand(n, self.dim, generator=generator, device=device, dtype=dtype) * 2.0 - 1.0) * math.pi

    def _off(self, x):
        return torch.relu(x.abs() - math.pi).norm(dim=-1)

    def features(self, x):
        r"""The periodic features :math:`(\cos\theta, \sin\theta)` of the angles."""
        return torch.cat([torch.cos(x), torch.sin(x)], dim=-1)

    @property
    def n_features(self) -> int:
        """Two features (cosine and sine) per angle."""
        return 2 * self.dim


#: The manifolds known by name to :func:`get_manifold` (and to :class:`GeodesicPath`, :class:`TangentMLP`).
MANIFOLDS = {"sphere": Sphere, "torus": FlatTorus}


def get_manifold(manifold="sphere", *, coord_dim: int | None = None) -> Manifold:
    """A manifold from a name in :data:`MANIFOLDS` (``'sphere'`` is :math:`S^2`, ``'torus'`` is :math:`T^2`,
    or of ``coord_dim`` coordinates when given), or a :class:`Manifold` passed through unchanged."""
    if isinstance(manifold, Manifold):
        if coord_dim is not None and coord_dim != manifold.coord_dim:
            raise ValueError(f"{manifold!r} has {manifold.coord_dim} coordinates per point, not dim={coord_dim}")
        return manifold
    _checks.choice("manifold", manifold, MANIFOLDS)
    if coord_dim is None:
        return MANIFOLDS[manifold]()
    _checks.positive_int("dim", coord_dim)
    if manifold == "sphere":
        if coord_dim < 2:
            raise ValueError(f"a sphere needs at least 2 coordinates per point, got dim={coord_dim}")
        return Sphere(coord_dim - 1)
    return FlatTorus(coord_dim)


# ------------------------------------------------------------------------------------------ the path
class GeodesicPath(ProbabilityPath):
    r"""The geodesic conditional path of Riemannian flow matching (Chen and Lipman, 2024; chapter 13):

    .. math::  x_0 \sim \mathrm{Uniform}(M), \qquad x_t = \exp_{x_0}\!\big(t\log_{x_0} x_1\big), \qquad
               u_t(x_t \mid x_1) = \dot x_t = \frac{\log_{x_t} x_1}{1 - t},

    and the loss :math:`\lVert P_{x_t} v_\theta(x_t, t) - u_t(x_t \mid x_1)\rVert_g^2` (the model's output
    projected onto the tangent space at :math:`x_t`, the squared Riemannian norm).  Pass it to
    :func:`cfmlib.training.train` as ``path=GeodesicPath("sphere")``; sample with :func:`sample`.
    Any coupling gives a valid loss; the minibatch-OT coupling of :mod:`cfmlib.couplings` pairs by the
    squared Euclidean distance of the coordinates (the chord on the sphere, unwrapped angles on the
    torus), not by the geodesic distance.  ``cfmlib.solvers.sample`` does not apply (its steps would
    leave the manifold).
    """

    name = "geodesic"
    t_max = 1.0
    loss_name = "the Riemannian flow-matching loss"
    sampler = "cfmlib.manifolds.sample"

    def __init__(self, manifold="sphere"):
        self.manifold = get_manifold(manifold)

    def draw_x0(self, x1: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform points of the manifold, one per row of ``x1``, on its device and in its dtype."""
        return self.manifold._uniform(x1.shape[0], generator, x1.device, x1.dtype)

    def check_data(self, name: str, x1: torch.Tensor) -> None:
        """Data must lie on the manifold."""
        self.manifold.check_points(name, x1)

    def check_batch(self, x0, x1, t, model=None) -> torch.Tensor:
        """Shapes, dtypes and devices on every call; points on the manifold and ``t`` in ``[0, 1]`` on every
        call for CPU tensors and on calls 1, 2, 4, ... on an accelerator. Returns ``t`` as ``(batch,)``."""
        due = _checks.values_due("GeodesicPath.check_batch", x1)
        self.manifold._pair("x0", x0, "x1", x1, values=due)
        if due:
            self.manifold.check_points("x1", x1)
        t = _checks.time("t", t, x1.shape[0], like=x1, values=due)
        if model is not None:
            _checks.module_device("model", model, x1=x1)
            _checks.module_dtype("model", model, x1=x1)
        return t

    def sample(self, x0: torch.Tensor, x1: torch.Tensor, t):
        """``(xt, ut)``: the point of the conditional path at ``t`` and its velocity (checked)."""
        t = self.check_batch(x0, x1, t)
        return self.manifold._geodesic(x0, x1, t)

    def conditional_field(self, x: torch.Tensor, x1: torch.Tensor, t) -> torch.Tensor:
        r""":math:`u_t(x \mid x_1) = \log_x(x_1) / (1 - t)` at arbitrary points ``x`` (needs ``t < 1``)."""
        self.manifold._pair("x", x, "x1", x1)
        self.manifold.check_points("x1", x1)
        t = _checks.time("t", t, x.shape[0], like=x)
        if t.numel() and bool((t >= 1).any()):
            raise ValueError("the conditional field divides by 1 - t: use times t < 1 "
                             "(manifold.geodesic gives the velocity at t = 1)")
        return self.manifold._log(x, x1) / (1.0 - t).reshape(-1, 1)

    def loss(self, model, x0, x1, t, y=None, weight=None) -> torch.Tensor:
        r"""The Riemannian CFM loss on a batch,
        :math:`\frac1n\sum_j w_j \lVert P_{x_t} v_\theta(x_{t_j}, t_j) - u_{t_j}(x_{t_j} \mid x_{1,j})\rVert_g^2`."""
        xt, ut = self.manifold._geodesic(x0, x1, t)
        v = model(xt, t) if y is None else model(xt, t, y)
        if v.shape != ut.shape:
            raise ValueError(f"the model returned shape {tuple(v.shape)} for points of shape {tuple(xt.shape)}; "
                             f"a field on {self.manifold!r} returns one vector of {self.manifold.coord_dim} "
                             f"coordinates per point")
        dt = torch.promote_types(torch.promote_types(v.dtype, ut.dtype), torch.float32)
        xt, v, ut = xt.to(dt), v.to(dt), ut.to(dt)
        err = self.manifold._sq_norm(xt, self.manifold._proj_tangent(xt, v) - ut)
        if weight is not None:
            err = err * weight.to(dt)
        return err.mean()

    def __repr__(self) -> str:
        return f"GeodesicPath({self.manifold!r})"


# ------------------------------------------------------------------------------------------ the model
class TangentMLP(nn.Module):
    r"""A multilayer perceptron whose output lies in the tangent space: :math:`v_\theta(x, t) = P_x\, f_\theta(\phi(x), e(t))`.

    :math:`\phi(x)` is what the network sees of a point (:meth:`Manifold.features`: the unit vector on
    the sphere; :math:`(\cos x, \sin x)` on the torus, so that the field is periodic), :math:`e(t)` is
    ``t`` or ``time_features`` sinusoidal features, :math:`f_\theta` has ``depth`` hidden layers of
    width ``hidden`` with SiLU, and :math:`P_x` projects onto :math:`T_x M`.

    Args:
        manifold: ``'sphere'``, ``'torus'`` or a :class:`Manifold`.
        dim: coordinates per point (``3`` for :math:`S^2`, ``2`` for :math:`T^2`; default: the manifold's).
    """

    def __init__(self, manifold="sphere", dim: int | None = None, hidden: int = 256, depth: int = 3,
                 time_features: int = 0):
        super().__init__()
        m = get_manifold(manifold, coord_dim=dim)
        _checks.positive_int("hidden", hidden)
        _checks.positive_int("depth", depth)
        _checks.time_features("time_features", time_features)
        self.manifold, self.dim, self.time_features, self.num_classes = m, m.coord_dim, time_features, None
        self.config = dict(kind="tangent_mlp", manifold=m.name, dim=m.coord_dim, hidden=hidden, depth=depth,
                           time_features=time_features)
        layers, width = [], m.n_features + max(time_features, 1)
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(hidden, m.coord_dim)

    def forward(self, x: torch.Tensor, t, y=None) -> torch.Tensor:
        """A velocity in the tangent space at ``x``: the network's output projected by :math:`P_x`."""
        if y is not None:
            raise ValueError("TangentMLP takes no class labels y")
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (batch, {self.dim}), got {tuple(x.shape)}")
        t = time_as_batch(t, x)
        e = t[:, None] if self.time_features == 0 else sinusoidal_embedding(t, self.time_features)
        out = self.head(self.body(torch.cat([self.manifold.features(x), e], dim=1)))
        return self.manifold._proj_tangent(x, out)


MODELS["tangent_mlp"] = TangentMLP


# ------------------------------------------------------------------------------------------ solvers
#: How a step returns to the manifold: ``'project'`` (take the step in coordinates, then
#: :meth:`Manifold.proj`; any method) or ``'exp'`` (move along the geodesic, :math:`\exp_x(h u)`; Euler).
RETRACTIONS = ("project", "exp")
_METHODS = ("euler", "midpoint", "rk4")


def _check_solver(method, steps, retraction):
    _checks.choice("method", method, _METHODS)
    _checks.positive_int("steps", steps)
    _checks.choice("retraction", retraction, RETRACTIONS)
    if retraction == "exp" and method != "euler":
        raise ValueError(f"retraction='exp' is the geodesic Euler step (method='euler'); for method={method!r} "
                         f"use retraction='project': combining stages by exponential maps this naively "
                         f"loses the method's order")


def _integrate(f, x, extra, t0, t1, manifold, method, steps, retraction, trajectory):
    """Fixed-step solve of ``dx/dt = f(t, x)[0]`` on the manifold (stages projected onto it) together with
    an optional scalar quantity ``extra`` with ``d extra/dt = f(t, x)[1]`` (plain Runge--Kutta)."""
    h = (t1 - t0) / steps
    times = torch.linspace(t0, t1, steps + 1, dtype=x.dtype, device=x.device)
    M = manifold
    P = M._proj

    def comb(x, e, h, ks):  # x + h * sum(b k) in coordinates, with the extra quantity alongside
        dx = sum(b * k[0] for b, k in ks)
        de = None if e is None else e + h * sum(b * k[1] for b, k in ks)
        return x + h * dx, de

    states, nfe = ([x] if trajectory else None), 0
    for i in range(steps):
        t = times[i]
        if method == "euler":
            k1 = f(t, x)
            nfe += 1
            if retraction == "exp":
                x_new, extra = M._exp(x, h * k1[0]), (None if extra is None else extra + h * k1[1])
            else:
                x_new, extra = comb(x, extra, h, [(1.0, k1)])
                x_new = P(x_new)
        elif method == "midpoint":
            k1 = f(t, x)
            k2 = f(t + 0.5 * h, P(x + 0.5 * h * k1[0]))
            nfe += 2
            x_new, extra = comb(x, extra, h, [(1.0, k2)])
            x_new = P(x_new)
        else:
            k1 = f(t, x)
            k2 = f(t + 0.5 * h, P(x + 0.5 * h * k1[0]))
            k3 = f(t + 0.5 * h, P(x + 0.5 * h * k2[0]))
            k4 = f(t + h, P(x + h * k3[0]))
            nfe += 4
            x_new, extra = comb(x, extra, h, [(1 / 6, k1), (1 / 3, k2), (1 / 3, k3), (1 / 6, k4)])
            x_new = P(x_new)
        x = x_new
        if trajectory:
            states.append(x)
    return x, extra, nfe, (torch.stack(states) if trajectory else None), (times if trajectory else None)


def _field(v, manifold, batch, kwargs):
    first = [True]

    def f(t, x):
        out = v(x, t.expand(batch), **kwargs)
        if first[0]:
            _checks.field_output("v", out, x)
            first[0] = False
        return (manifold._proj_tangent(x, out), None)
    return f


def odeint(v, x: torch.Tensor, manifold, t0: float = 0.0, t1: float = 1.0, *, method: str = "euler",
           steps: int = 100, retraction: str = "project", trajectory: bool = False, **kwargs) -> Solution:
    r"""Solve :math:`\dot x = P_x v(x, t)` on ``manifold`` from ``t0`` to ``t1`` (backward when ``t1 < t0``)
    with ``steps`` fixed steps that stay on the manifold.

    ``retraction='project'`` takes each Runge--Kutta stage in coordinates and projects it back
    (:meth:`Manifold.proj`; Euler, midpoint and RK4 keep their orders 1, 2 and 4, because the field is
    only ever evaluated on the manifold); ``retraction='exp'`` takes geodesic Euler steps
    :math:`x \leftarrow \exp_x(h\, P_x v(x, t))`.  ``v`` is called as ``v(x, t, **kwargs)`` with ``t`` of
    shape ``(batch,)``; its output is projected onto the tangent space.  Returns a
    :class:`cfmlib.solvers.Solution`.
    """
    manifold = get_manifold(manifold)
    _checks.function("v", v)
    manifold.check_points("x", x)
    _check_solver(method, steps, retraction)
    t0 = _checks.number("t0", t0, lo=0.0, hi=1.0)
    t1 = _checks.number("t1", t1, lo=0.0, hi=1.0)
    if t0 == t1:
        raise ValueError(f"t0 and t1 must differ (both are {t0}); there is nothing to integrate")
    _checks.module_device("model", v, x=x)
    _checks.module_dtype("model", v, x=x)
    f = _field(v, manifold, x.shape[0], kwargs)
    x1, _, nfe, traj, times = _integrate(f, x, None, t0, t1, manifold, method, steps, retraction, trajectory)
    return Solution(x1, nfe, traj, times)


def _model_manifold(model, manifold):
    if manifold is not None:
        return get_manifold(manifold)
    m = getattr(model, "manifold", None) or getattr(getattr(model, "module", None), "manifold", None)
    if not isinstance(m, Manifold):
        raise ValueError("pass manifold=... (the model does not say which manifold it lives on)")
    return m


@torch.no_grad()
def sample(model, n: int | None = None, *, manifold=None, x0: torch.Tensor | None = None, method: str = "euler",
           steps: int = 100, retraction: str = "project", trajectory: bool = False,
           generator: torch.Generator | None = None, device=None, **kwargs) -> Solution:
    r"""Generate samples on a manifold: draw ``x0`` uniformly (or use the given one) and integrate the
    model's field from ``t = 0`` to ``1`` with :func:`odeint`.

    ``manifold`` defaults to ``model.manifold`` (a :class:`TangentMLP` knows it); the noise is drawn
    with ``generator`` in the model's dtype on ``device`` (default: the model's device).
    """
    _checks.function("model", model)
    _checks.generator("generator", generator)
    m = _model_manifold(model, manifold)
    if x0 is None:
        if n is None:
            raise ValueError("pass either n (the number of samples) or x0 (the starting points)")
        _checks.positive_int("n", n)
        params = list(model.parameters()) if isinstance(model, nn.Module) else []
        dev = get_device(device) if device is not None else (params[0].device if params else torch.device("cpu"))
        dtype = next((p.dtype for p in params if p.is_floating_point()), None)
        x0 = m.uniform(n, generator=generator, device=dev, dtype=dtype)
    elif n is not None and n != x0.shape[0]:
        raise ValueError(f"n={n} disagrees with x0's batch size {x0.shape[0]}; pass one of them")
    return odeint(model, x0, m, 0.0, 1.0, method=method, steps=steps, retraction=retraction,
                  trajectory=trajectory, **kwargs)


# ------------------------------------------------------------------------------------------ likelihood
def divergence(v, x: torch.Tensor, t, manifold, *, create_graph: bool = False, **kwargs) -> torch.Tensor:
    r"""The Riemannian divergence :math:`\operatorname{div}_g u(x)` of the tangent field
    :math:`u(x) = P_x v(x, t)`, shape ``(batch,)``.

    On the sphere, with :math:`J` the Jacobian of :math:`u` in the ambient coordinates,
    :math:`\operatorname{div}_g u = \operatorname{tr}(P_x J P_x) = \operatorname{tr} J - x^\top J x`
    (the trace over the tangent space; the ambient trace alone is wrong by the normal term).  On the
    flat torus it is the ordinary divergence in the angle coordinates.  Exact (``coord_dim`` backward
    passes, batched).
    """
    manifold = get_manifold(manifold)
    _checks.function("v", v)
    manifold.check_points("x", x)
    t = _checks.time("t", t, x.shape[0], like=x)
    with torch.enable_grad():
        xg = x if x.requires_grad else x.detach().requires_grad_(True)
        out = v(xg, t, **kwargs)
        _checks.field_output("v", out, xg)
        return manifold._div(manifold._proj_tangent(xg, out), xg, create_graph)


def log_prob(v, x1: torch.Tensor, manifold=None, *, method: str = "rk4", steps: int = 50,
             create_graph: bool = False, **kwargs) -> LogProbResult:
    r""":math:`\log p_1(x_1)` with respect to the Riemannian volume, for the flow of ``v`` from the
    uniform source :math:`p_0 = 1/\mathrm{vol}(M)`.

    Integrates :math:`(x_t, \ell_t)` backward from ``t = 1`` to ``0`` on the manifold with
    :math:`\dot x = P_x v(x, t)`, :math:`\dot\ell = \operatorname{div}_g(P_x v)(x, t)` (:func:`divergence`),
    fixed steps of ``method`` with projected stages; then
    :math:`\log p_1(x_1) = -\log\mathrm{vol}(M) + \ell_0`.  ``manifold`` defaults to ``v.manifold``.
    """
    m = _model_manifold(v, manifold)
    _checks.function("v", v)
    m.check_points("x1", x1)
    _check_solver(method, steps, "project")
    _checks.module_device("model", v, x=x1)
    _checks.module_dtype("model", v, x=x1)
    batch = x1.shape[0]
    first = [True]

    def f(t, x):
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True) if not (create_graph and x.requires_grad) else x
            out = v(xg, t.expand(batch), **kwargs)
            if first[0]:
                _checks.field_output("v", out, xg)
                first[0] = False
            u = m._proj_tangent(xg, out)
            div = m._div(u, xg, create_graph)
        if not create_graph:
            u, div = u.detach(), div.detach()
        return u, div

    ell = torch.zeros(batch, dtype=x1.dtype, device=x1.device)
    x0, ell0, nfe, _, _ = _integrate(f, x1, ell, 1.0, 0.0, m, method, steps, "project", False)
    return LogProbResult(ell0 - m.log_volume, x0, x1, nfe)


# ------------------------------------------------------------------------------------------ data
def _orthonormal_frame(mu: torch.Tensor):
    """Two unit vectors ``e1, e2`` (each ``(k, 3)``) completing each unit row of ``mu`` to an orthonormal basis."""
    helper = torch.zeros_like(mu)
    idx = mu.abs().argmin(dim=1)
    helper[torch.arange(mu.shape[0]), idx] = 1.0
    e1 = helper - (helper * mu).sum(1, keepdim=True) * mu
    e1 = e1 / e1.norm(dim=1, keepdim=True)
    e2 = torch.linalg.cross(mu, e1, dim=1)
    return e1, e2


def _weights(weights, k):
    if weights is None:
        return torch.full((k,), 1.0 / k, dtype=torch.float64)
    w = torch.as_tensor(weights, dtype=torch.float64)
    if w.shape != (k,) or not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(f"weights must be {k} non-negative numbers with a positive sum, got {weights!r}")
    return w / w.sum()


class VonMisesFisherMixture:
    r"""A mixture of von Mises--Fisher distributions on :math:`S^2` (chapter 13):

    .. math::  q(x) = \sum_k w_k\, \frac{\kappa_k}{4\pi\sinh\kappa_k}\, e^{\kappa_k \mu_k^\top x}

    with respect to the area of the sphere.  Sampled exactly (Wood, 1994): on :math:`S^2` the cosine
    :math:`w = \mu^\top x` has the density :math:`\propto e^{\kappa w}` on :math:`[-1, 1]`, whose inverse
    CDF is :math:`w = 1 + \kappa^{-1}\log\big(u + (1 - u)e^{-2\kappa}\big)`, and the direction around
    :math:`\mu` is uniform.  Call it as a sampler, ``q(n, generator=g)``, for :func:`cfmlib.training.train` and
    :func:`cfmlib.metrics.data_band`.

    Args:
        means: ``(k, 3)`` mean directions (normalised here); kappas: ``(k,)`` concentrations > 0;
        weights: ``(k,)`` mixture weights (default equal); dtype: of the samples (default: torch's).
    """

    def __init__(self, means, kappas, weights=None, dtype=None):
        mu = torch.as_tensor(means, dtype=torch.float64)
        if mu.ndim != 2 or mu.shape[1] != 3 or mu.shape[0] == 0:
            raise ValueError(f"means must have shape (k, 3) (directions in R^3), got {tuple(mu.shape)}")
        if not bool(torch.isfinite(mu).all()) or bool((mu.norm(dim=1) == 0).any()):
            raise ValueError("means must be finite non-zero vectors")
        k = mu.shape[0]
        kap = torch.as_tensor(kappas, dtype=torch.float64).reshape(-1)
        if kap.shape != (k,) or not bool(torch.isfinite(kap).all()) or bool((kap <= 0).any()):
            raise ValueError(f"kappas must be {k} finite positive concentrations, got {kappas!r}")
        self.means = mu / mu.norm(dim=1, keepdim=True)
        self.kappas, self.weights = kap, _weights(weights, k)
        self.dtype = dtype or torch.get_default_dtype()
        self._e1, self._e2 = _orthonormal_frame(self.means)
        self.manifold = Sphere(2)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` exact samples, shape ``(n, 3)``, drawn on the generator's device (CPU by default)."""
        _checks.positive_int("n", n)
        _checks.generator("generator", generator)
        dev = generator.device if generator is not None else torch.device("cpu")
        f64 = torch.float64
        comp = torch.multinomial(self.weights.to(dev), n, replacement=True, generator=generator)
        u = torch.rand(n, generator=generator, device=dev, dtype=f64)
        phi = 2 * math.pi * torch.rand(n, generator=generator, device=dev, dtype=f64)
        kap, mu = self.kappas.to(dev)[comp], self.means.to(dev)[comp]
        w = 1.0 + torch.log(u + (1.0 - u) * torch.exp(-2.0 * kap)) / kap
        w = w.clamp(-1.0, 1.0)
        r = torch.sqrt((1.0 - w) * (1.0 + w))
        x = w[:, None] * mu + r[:, None] * (torch.cos(phi)[:, None] * self._e1.to(dev)[comp]
                                            + torch.sin(phi)[:, None] * self._e2.to(dev)[comp])
        return (x / x.norm(dim=1, keepdim=True)).to(self.dtype)

    __call__ = sample

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`\log q(x)` with respect to area, shape ``(batch,)``, computed in float64 and returned in ``x``'s dtype."""
        self.manifold.check_points("x", x)
        xd = x.to(torch.float64)
        kap, mu, w = (a.to(x.device) for a in (self.kappas, self.means, self.weights))
        # log(kappa / (4 pi sinh kappa)) + kappa mu.x = log kappa - log 2pi - log(1 - e^{-2 kappa}) + kappa (mu.x - 1)
        lognorm = torch.log(kap) - math.log(2 * math.pi) - torch.log1p(-torch.exp(-2.0 * kap))
        comp = lognorm[None] + kap[None] * (xd @ mu.T - 1.0) + torch.log(w)[None]
        return torch.logsumexp(comp, dim=1).to(x.dtype)

    def __repr__(self) -> str:
        return f"VonMisesFisherMixture(k={self.means.shape[0]})"


class WrappedNormalMixture:
    r"""A mixture of wrapped normal distributions on the torus :math:`T^d` (chapter 13): draw
    :math:`z \sim \sum_k w_k \mathcal N(m_k, \Sigma_k)` in :math:`\mathbb R^d` and wrap every angle into
    :math:`[-\pi, \pi)`.  The density with respect to the flat volume is the sum over the lattice,

    .. math::  q(x) = \sum_k w_k \sum_{n \in \mathbb Z^d} \mathcal N(x + 2\pi n;\ m_k, \Sigma_k),

    evaluated with the shifts :math:`n \in \{-K, \dots, K\}^d` (``K = 2`` neglects less than
    :math:`e^{-(4\pi)^2/(2\lambda_{\max})}` for the largest covariance eigenvalue :math:`\lambda_{\max}`).
    Sampled exactly; call it as a sampler, ``q(n, generator=g)``.

    Args:
        means: ``(k, d)`` centres (angles in radians); covs: ``(k, d, d)`` covariances;
        weights: ``(k,)`` (default equal); dtype: of the samples (default: torch's).
    """

    def __init__(self, means, covs, weights=None, dtype=None, shifts: int = 2):
        m = torch.as_tensor(means, dtype=torch.float64)
        if m.ndim != 2 or m.shape[0] == 0:
            raise ValueError(f"means must have shape (k, d), got {tuple(m.shape)}")
        k, d = m.shape
        c = torch.stack([torch.as_tensor(a, dtype=torch.float64) for a in covs]) \
            if isinstance(covs, (list, tuple)) and covs and isinstance(covs[0], torch.Tensor) \
            else torch.as_tensor(covs, dtype=torch.float64)
        if c.shape != (k, d, d):
            raise ValueError(f"covs must have shape (k, d, d) = ({k}, {d}, {d}), got {tuple(c.shape)}")
        if not torch.allclose(c, c.transpose(1, 2)):
            raise ValueError("covs must be symmetric")
        try:
            self._chol = torch.linalg.cholesky(c)
        except RuntimeError as exc:
            raise ValueError("covs must be positive definite") from exc
        if float(torch.linalg.eigvalsh(c).max()) > 4.0:
            raise ValueError("covariance eigenvalues above 4 (standard deviations above 2 radians) are too wide "
                             "for the truncated lattice sum; use narrower components")
        self.manifold = FlatTorus(d)
        self.means, self.covs, self.weights = FlatTorus._wrap(m), c, _weights(weights, k)
        self.dtype = dtype or torch.get_default_dtype()
        self.shifts = _checks.positive_int("shifts", shifts)
        grid = torch.arange(-shifts, shifts + 1, dtype=torch.float64)
        self._lattice = 2 * math.pi * torch.cartesian_prod(*([grid] * d)).reshape(-1, d)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` exact samples, shape ``(n, d)``, angles in ``[-pi, pi)``, drawn on the generator's device."""
        _checks.positive_int("n", n)
        _checks.generator("generator", generator)
        dev = generator.device if generator is not None else torch.device("cpu")
        comp = torch.multinomial(self.weights.to(dev), n, replacement=True, generator=generator)
        z = torch.randn(n, self.means.shape[1], generator=generator, device=dev, dtype=torch.float64)
        x = self.means.to(dev)[comp] + (self._chol.to(dev)[comp] @ z[:, :, None])[:, :, 0]
        return FlatTorus._wrap(x).to(self.dtype)

    __call__ = sample

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """:math:`\\log q(x)` with respect to the flat volume, shape ``(batch,)`` (float64 inside)."""
        self.manifold.check_points("x", x)
        xd = x.to(torch.float64)
        m, lat, w = self.means.to(x.device), self._lattice.to(x.device), self.weights.to(x.device)
        dist = torch.distributions.MultivariateNormal(m, scale_tril=self._chol.to(x.device))
        pts = xd[:, None, None, :] + lat[None, :, None, :]  # (batch, shifts, 1, d)
        lp = dist.log_prob(pts)  # (batch, shifts, k)
        return torch.logsumexp(lp + torch.log(w), dim=(1, 2)).to(x.dtype)

    def __repr__(self) -> str:
        return f"WrappedNormalMixture(k={self.means.shape[0]}, d={self.means.shape[1]})"
