r"""The conditional flow-matching loss, one training step and the training loop (chapters 5, 7, 8, 9).

The loss of Theorem 2, for a path :math:`x_t = \alpha_t x_1 + \sigma_t x_0`:

.. math::  \mathcal L_{\mathrm{CFM}}(\theta) = \mathbb E_{t, (x_0, x_1)}
           \lVert v_\theta(x_t, t) - (\dot\alpha_t x_1 + \dot\sigma_t x_0) \rVert^2 ,

with :math:`t \sim U[0, t_{\max}]` and :math:`(x_0, x_1)` drawn from a coupling
(independent or minibatch OT).  The pieces, each usable in a reader's own loop:

* :class:`Batches` -- seeded training batches ``(x0, x1, t, y)``: data, noise, times, label
  dropout and the coupling; with exact OT the next batch's coupling is solved in a background
  thread while the current step runs;
* :func:`cfm_loss` -- the loss on one batch (the path decides the loss, see
  :class:`cfmlib.paths.ProbabilityPath`);
* :func:`train_step` -- loss, backward pass, optional clipping, optimiser step, :class:`EMA` update;
* :func:`train` -- the convenient front door: the loop below plus device choice, checkpoints that
  resume bit for bit, mixed precision, ``torch.compile`` and data-parallel training under
  ``torchrun``.  Its heart is::

      for step in range(start, steps):
          batch = batches.next(ahead=step + 1 < steps)
          loss = train_step(model, optimizer, batch, path, ema=ema, step=step)
          monitor.record(step, loss)

:class:`LossMonitor` and :func:`draw_data` are shared with the other training loops of the
library (:func:`cfmlib.flows.train_flow`, :func:`cfmlib.likelihood.train_cnf`).
"""
from __future__ import annotations

import copy
import os
import time as _time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import TqdmWarning

with warnings.catch_warnings():  # in a notebook without ipywidgets, tqdm.auto warns (naming a local file) and falls back
    warnings.simplefilter("ignore", TqdmWarning)
    from tqdm.auto import tqdm

from . import _checks
from .checkpoint import check_config, load_checkpoint, save_checkpoint
from .couplings import IndependentCoupling, get_coupling
from .device import get_device
from .errors import CheckpointError, NonFiniteLossError
from .models import data_shape
from .paths import get_path
from .timesteps import get_time_sampler

__all__ = ["cfm_loss", "train_step", "train", "Batch", "Batches", "EMA", "LossMonitor", "TrainResult",
           "draw_data", "NonFiniteLossError"]


# ----------------------------------------------------------------------------------------- data
_SAMPLER_SIGNATURE = "data(n, generator=g) -> a torch.Tensor of shape (n, ...) (or a tuple (x1, y) with labels)"


def draw_data(data, n: int, generator: torch.Generator | None = None, device=None, *, name: str = "data"):
    """Draw ``n`` data points (and labels, if the source has them): returns ``(x1, y)`` with ``y`` ``None``
    for unlabelled data.

    ``data`` is a sampler called as ``data(n, generator=g)`` (every :mod:`cfmlib.datasets` toy), a
    tensor ``(N, ...)`` to draw from with replacement, or a tuple ``(x1, y)`` of a tensor and its
    integer labels.  A sampler that does not take ``generator``, returns something other than a
    tensor, or returns the wrong number of points gets an error naming ``name``.
    """
    if isinstance(data, torch.Tensor) or isinstance(data, tuple):
        x1, y = (data, None) if isinstance(data, torch.Tensor) else data
        idx = torch.randint(0, x1.shape[0], (n,), generator=generator, device=x1.device)
        x1 = x1[idx]
        y = None if y is None else y[idx]
    else:
        try:
            out = data(n, generator=generator)
        except TypeError as exc:
            if "generator" in str(exc) or "positional argument" in str(exc):
                raise TypeError(f"{name} must be a sampler called as {_SAMPLER_SIGNATURE}; calling it as "
                                f"{name}({n}, generator=g) failed ({exc}). Add a `generator=None` keyword "
                                f"argument and draw from it, so that runs are seeded") from exc
            raise
        x1, y = out if isinstance(out, tuple) and len(out) == 2 else (out, None)
        if not isinstance(x1, torch.Tensor):
            raise TypeError(f"{name}({n}, generator=g) returned {_checks.describe(x1)}; a sampler must return "
                            f"a torch.Tensor ({_SAMPLER_SIGNATURE}); wrap NumPy output with torch.from_numpy(...).float()")
        if x1.ndim < 2 or x1.shape[0] != n:
            raise ValueError(f"{name}({n}, generator=g) returned shape {tuple(x1.shape)}; a sampler must return "
                             f"{n} samples, shape ({n}, ...) ({_SAMPLER_SIGNATURE})")
        if y is not None and (not isinstance(y, torch.Tensor) or y.shape != (n,) or y.is_floating_point()):
            raise TypeError(f"{name}({n}, generator=g) returned labels {_checks.describe(y)}; labels must be an "
                            f"integer tensor of shape ({n},)")
    if device is not None:
        x1 = x1.to(device)
        y = None if y is None else y.to(device)
    return x1, y


def _check_source(data, pairs, path):
    """Check ``data`` / ``pairs`` (everything that can be checked without drawing)."""
    if (data is None) == (pairs is None):
        raise ValueError("pass exactly one of data (a sampler, a tensor or an (x1, y) tuple) or pairs=(x0, x1)")
    if pairs is not None:
        if not (isinstance(pairs, (tuple, list)) and len(pairs) == 2):
            raise TypeError(f"pairs must be a tuple (x0, x1) of tensors, got {_checks.describe(pairs)}")
        for name, x in (("pairs[0] (x0)", pairs[0]), ("pairs[1] (x1)", pairs[1])):
            _checks.tensor(name, x, ndim=range(2, 6))
            _nonempty(name, x)
        _checks.same_shape("pairs[0] (x0)", pairs[0], "pairs[1] (x1)", pairs[1])
        _checks.same_dtype(**{"pairs[0] (x0)": pairs[0], "pairs[1] (x1)": pairs[1]})
        return
    if isinstance(data, torch.Tensor):
        path.check_data("data", data)
        _nonempty("data", data)
        if data.is_floating_point():
            _checks.tensor("data", data)
        return
    if isinstance(data, (tuple, list)):
        if len(data) != 2:
            raise TypeError(f"data as a tuple must be (x1, y), got {len(data)} entries")
        x1, y = data
        path.check_data("data[0] (x1)", x1)
        _nonempty("data[0] (x1)", x1)
        if x1.is_floating_point():
            _checks.tensor("data[0] (x1)", x1)
        if not isinstance(y, torch.Tensor) or y.dtype not in (torch.int64, torch.int32) or y.shape != x1.shape[:1]:
            raise TypeError(f"data[1] (y) must be an integer tensor of shape ({x1.shape[0]},), got {_checks.describe(y)}")
        return
    if not callable(data):
        raise TypeError(f"data must be a sampler called as {_SAMPLER_SIGNATURE}, a tensor (N, ...) or a tuple "
                        f"(x1, y); got {_checks.describe(data)}")


def _nonempty(name, x):
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); pass at least one sample")


@dataclass
class Batch:
    """One training batch: noise ``x0``, data ``x1`` (coupled), times ``t`` ``(batch,)`` and labels ``y``
    (``None`` without labels). Unpacks as ``x0, x1, t, y = batch``."""

    x0: torch.Tensor
    x1: torch.Tensor
    t: torch.Tensor
    y: torch.Tensor | None = None

    def __iter__(self):
        return iter((self.x0, self.x1, self.t, self.y))


class Batches:
    r"""Seeded training batches for flow matching: an iterator of :class:`Batch`.

    Each batch draws, from the one ``generator`` and in a fixed order, the data (and labels), the
    path's noise :math:`x_0` (:meth:`~cfmlib.paths.ProbabilityPath.draw_x0`), the times
    (``time_sampler``, scaled to ``[0, path.t_max]``) and the label dropout of classifier-free
    guidance, and then applies the coupling between the path's source points and the data.

    With a coupling that solves something (exact OT), the next batch is drawn ahead and its coupling
    solved in a background thread (the assignment solver releases the GIL) while the caller trains
    on the current one.  The generator is rewound after drawing ahead, so that between calls it
    holds the state at the batch boundary (what a checkpoint saves) and the batches are bitwise
    those without prefetching.  ``next(ahead=False)`` prepares nothing (the last step).

    Args:
        data: a sampler ``data(n, generator=g)``, a tensor ``(N, ...)`` or a tuple ``(x1, y)``.
        batch_size: samples per batch.
        pairs: instead of ``data``, fixed pairs ``(x0, x1)`` drawn together (no coupling).
        path: a path name or object (it draws the noise and, with its ``t_max``, the times).
        coupling: a name in :data:`cfmlib.couplings.COUPLINGS` or a :class:`~cfmlib.couplings.Coupling`.
        generator: the random generator of every draw (on ``device``).
        device: where batches are built (default: the generator's device).
        time_sampler: a name in :data:`cfmlib.timesteps.TIME_SAMPLERS` or a callable.
        label_dropout, num_classes: replace a label by the null label ``num_classes`` with this probability.
        prefetch: solve the next batch's coupling in the background (only matters for exact OT).
        part: a slice of each drawn batch to keep (data-parallel training where every process draws
            the same global batch and trains on its part).
    """

    def __init__(self, data=None, batch_size: int = 256, *, pairs=None, path="condot", coupling="independent",
                 generator: torch.Generator | None = None, device=None, time_sampler="uniform",
                 label_dropout: float = 0.0, num_classes: int | None = None, prefetch: bool = True,
                 part: slice | None = None):
        self.path = get_path(path)
        _check_source(data, pairs, self.path)
        self.batch_size = _checks.positive_int("batch_size", batch_size)
        self.coupling = get_coupling(coupling)
        if pairs is not None and not isinstance(self.coupling, IndependentCoupling):
            raise ValueError("pairs are already coupled; use coupling='independent' with pairs")
        _checks.generator("generator", generator)
        self.gen = generator if generator is not None else torch.Generator()
        self.device = get_device(device) if device is not None else self.gen.device
        if self.gen.device.type != self.device.type:
            raise ValueError(f"generator is on {self.gen.device} but batches are built on {self.device}; "
                             f"use torch.Generator(device=...) on the same device")
        self.time_sampler = get_time_sampler(time_sampler)
        self.label_dropout = _checks.number("label_dropout", label_dropout, lo=0.0, hi=1.0, hi_open=True)
        self.num_classes, self.part, self.prefetch = num_classes, part, prefetch
        self._fixed = self._tensor_data = None
        if pairs is not None:
            self._fixed = tuple(p.to(self.device) for p in pairs)
        elif isinstance(data, torch.Tensor):
            self._tensor_data = data.to(self.device)
        elif isinstance(data, (tuple, list)):
            self._tensor_data = (data[0].to(self.device), data[1].to(self.device))
        self.data = data
        self._pending = self._pool = None
        self._solves = not isinstance(self.coupling, IndependentCoupling) and pairs is None

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        return self.next()

    def next(self, ahead: bool = True) -> Batch:
        """The next batch; ``ahead=False`` does not prepare the one after (see the class docstring)."""
        if not (self._solves and self.prefetch):
            return self._finish(*self._couple(*self._draw()))
        pending, self._pending = self._pending, None
        if pending is not None and torch.equal(self.gen.get_state(), pending[0]):
            self.gen.set_state(pending[1])  # fast-forward past the draws made ahead
            x0, x1, t, y, (i0, i1) = *pending[2:6], pending[6].result()
        else:  # first batch, or someone else used the generator since: draw now
            if pending is not None:
                pending[6].result()
            x0, x1, t, y = self._draw()
            i0, i1 = self.coupling.indices(self.path.coupling_source(x0), x1)
        if ahead:
            boundary = self.gen.get_state()
            nxt = self._draw()
            after = self.gen.get_state()
            self.gen.set_state(boundary)
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cfmlib-coupling")
            job = self._pool.submit(self.coupling.indices, self.path.coupling_source(nxt[0]), nxt[1])
            self._pending = (boundary, after, *nxt, job)
        return self._finish(*self._apply(x0, x1, t, y, i0, i1))

    def close(self) -> None:
        """Stop the background thread (also done when the object is garbage collected)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __del__(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False)

    def _draw(self):
        """Every random draw of one batch, in a fixed order: data (and labels), noise, times, dropout."""
        b, gen, dev = self.batch_size, self.gen, self.device
        if self._fixed is not None:
            idx = torch.randint(0, self._fixed[0].shape[0], (b,), generator=gen, device=dev)
            x0, x1, y = self._fixed[0][idx], self._fixed[1][idx], None
        else:
            source = self._tensor_data if self._tensor_data is not None else self.data
            x1, y = draw_data(source, b, gen, dev)
            x0 = self.path.draw_x0(x1, gen)
        dtype = x1.dtype if x1.is_floating_point() else torch.get_default_dtype()
        t = self.path.draw_t(b, self.time_sampler, gen, dev, dtype)
        if y is not None and self.label_dropout > 0:
            if self.num_classes is None:
                raise ValueError("the data has labels and label_dropout > 0, but num_classes was not given: "
                                 "pass num_classes (dropped labels become the null label num_classes)")
            drop = torch.rand(b, generator=gen, device=dev) < self.label_dropout
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return x0, x1, t, y

    def _couple(self, x0, x1, t, y):
        if not self._solves:
            return x0, x1, t, y
        return self._apply(x0, x1, t, y, *self.coupling.indices(self.path.coupling_source(x0), x1))

    @staticmethod
    def _apply(x0, x1, t, y, i0, i1):
        if i0 is not None:
            x0 = x0[i0]
        if i1 is not None:  # data move together with their labels; times stay independent draws
            x1 = x1[i1]
            y = None if y is None else y[i1]
        return x0, x1, t, y

    def _finish(self, x0, x1, t, y):
        if self.part is not None:
            p = self.part
            x0, x1, t, y = x0[p], x1[p], t[p], (None if y is None else y[p])
        return Batch(x0, x1, t, y)


# ----------------------------------------------------------------------------------------- loss
def cfm_loss(model, x0: torch.Tensor, x1: torch.Tensor, t, path="condot", y: torch.Tensor | None = None,
             weight: torch.Tensor | None = None):
    r"""Monte Carlo estimate of :math:`\mathcal L_{\mathrm{CFM}}` on a batch of pairs.

    ``x0``, ``x1``: ``(batch, ...)``; ``t``: number or ``(batch,)`` in ``[0, path.t_max]``; ``y``: optional
    labels; ``weight``: optional ``(batch,)`` loss weights. Returns the mean over the batch of
    :math:`w_j \lVert v_\theta(x_t, t) - u_t(x_t \mid x_1)\rVert^2` (the path decides the loss:
    :meth:`cfmlib.paths.ProbabilityPath.loss`).

    Shapes, dtypes and devices are checked on every call (free). Values (NaN, the range of ``t``) are
    checked on every call for CPU tensors, and on calls 1, 2, 4, 8, ... for tensors on a GPU, where
    reading them would make the host wait for the device at every step.
    """
    _checks.function("model", model)
    path = get_path(path)
    t = path.check_batch(x0, x1, t, model)
    if y is not None:
        _checks.labels("y", y, x1.shape[0], getattr(model, "num_classes", None))
    if weight is not None:
        _checks.tensor("weight", weight, ndim=1, finite=False)
        if weight.shape[0] != x1.shape[0]:
            raise ValueError(f"weight must have one entry per sample ({x1.shape[0]}), got shape {tuple(weight.shape)}")
    return path.loss(model, x0, x1, t, y, weight)


# ----------------------------------------------------------------------------------------- one step
class EMA:
    r"""An exponential moving average of a model's weights, :math:`\bar\theta \leftarrow d\,\bar\theta + (1 - d)\theta`.

    ``ema.model`` is the averaged copy (no gradients). During warm-up the decay used at step ``k`` is
    :math:`\min(d, (1 + k)/(10 + k))`, so that the random initial weights are forgotten quickly.
    ``decay = 0`` keeps no average: the copy equals the model whenever :meth:`sync` is called.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {_checks.describe(model)}")
        self.decay = _checks.number("decay", decay, lo=0.0, hi=1.0, hi_open=True)
        self.model = copy.deepcopy(model).requires_grad_(False)
        self._src = list(model.parameters())
        self._dst = list(self.model.parameters())

    def decay_at(self, step: int) -> float:
        """The decay applied by :meth:`update` at ``step`` (0-based)."""
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Move the average towards the current weights (after the optimiser step of ``step``)."""
        if self.decay > 0:
            torch._foreach_lerp_(self._dst, self._src, 1.0 - self.decay_at(step))

    @torch.no_grad()
    def sync(self) -> None:
        """With ``decay = 0``, copy the current weights (there is no average to keep)."""
        if self.decay == 0:
            torch._foreach_copy_(self._dst, self._src)


def train_step(model, optimizer: torch.optim.Optimizer, batch, path="condot", *, ema: EMA | None = None,
               step: int = 0, grad_clip: float | None = None, weighting=None, amp=None,
               scaler: torch.amp.GradScaler | None = None, check: bool = True) -> torch.Tensor:
    r"""One optimisation step: the loss of ``path`` on ``batch``, its gradient, optional clipping of the
    gradient norm to ``grad_clip``, the optimiser step, and the EMA update. Returns the loss (detached,
    on the model's device; no host synchronisation).

    Args:
        model: the field :math:`v_\theta` (any callable module, e.g. a compiled or DDP-wrapped model).
        optimizer: updates the model's parameters.
        batch: a :class:`Batch` or a tuple ``(x0, x1, t[, y])``.
        path: the path (its :meth:`~cfmlib.paths.ProbabilityPath.loss` is the loss).
        ema: an :class:`EMA` of the model, updated with the decay of ``step``.
        weighting: optional ``weighting(t) -> (batch,)`` loss weights.
        amp: ``None``, or a dtype (``torch.bfloat16``/``torch.float16``) to autocast the forward pass on CUDA.
        scaler: a ``GradScaler`` (fp16 autocast).
        check: the argument checks of :func:`cfm_loss`; :func:`train` passes ``False`` because it
            builds its batches itself and checked its data once.
    """
    parts = tuple(batch)
    if len(parts) not in (3, 4):
        raise TypeError(f"batch must be a Batch or a tuple (x0, x1, t[, y]), got {len(parts)} entries")
    x0, x1, t, y = parts if len(parts) == 4 else (*parts, None)
    path = get_path(path)
    if check:
        _checks.function("model", model)
        t = path.check_batch(x0, x1, t, model)
        if y is not None:
            _checks.labels("y", y, x1.shape[0], getattr(model, "num_classes", None))
    weight = weighting(t) if weighting is not None else None
    if amp is not None and x1.device.type == "cuda":
        with torch.autocast("cuda", dtype=amp):
            loss = path.loss(model, x0, x1, t, y, weight)
    else:
        loss = path.loss(model, x0, x1, t, y, weight)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if grad_clip is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if ema is not None:
        ema.update(step)
    return loss.detach()


# ----------------------------------------------------------------------------------------- monitoring
class LossMonitor:
    """The loss of every step, kept on the device, checked for NaN/inf every ``check_every`` steps (one
    host synchronisation per check) and shown in a progress bar. Shared by cfmlib's training loops.

    ``record(step, loss)`` stores the loss of ``step`` (0-based) and checks when due; ``check(upto)``
    checks everything recorded before ``upto`` now (e.g. before a checkpoint is saved); the error,
    a :class:`~cfmlib.errors.NonFiniteLossError`, names the first bad step and ``hint``.
    """

    def __init__(self, steps: int, *, start: int = 0, device=None, check_every: int = 1, progress: bool = False,
                 desc: str = "training", what: str = "the loss", hint: str = "", reduce=None):
        self.history = torch.zeros(steps, dtype=torch.float32, device=device)
        self.steps, self.checked, self.check_every = steps, start, check_every
        self.what, self.hint, self.reduce = what, hint, reduce
        self.bar = tqdm(total=steps, initial=start, desc=desc, leave=False, mininterval=0.5) if progress else None

    def record(self, step: int, loss: torch.Tensor) -> None:
        """Store the loss of ``step`` (0-based), check for NaN/inf when due and update the progress bar."""
        self.history[step] = loss
        done = step + 1
        if done - self.checked >= self.check_every or done == self.steps:
            self.check(done)
        if self.bar is not None and (done % 50 == 0 or done == self.steps):
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix(loss=f"{float(self.history[step]):.3f}")

    def check(self, upto: int) -> None:
        """Check every loss recorded before ``upto`` now; raise :class:`~cfmlib.errors.NonFiniteLossError` at the first bad one."""
        lo, self.checked = self.checked, upto
        window = self.history[lo:upto]
        if self.reduce is not None:  # a NaN on any process stops every process at the same step
            window = self.reduce(window)
        bad = ~torch.isfinite(window)
        if bool(bad.any()):
            first = lo + int(bad.nonzero()[0, 0])
            self.close()
            raise NonFiniteLossError(f"{self.what} became {float(window[first - lo])} at step {first + 1}; "
                                     f"training stopped. {self.hint}".rstrip())

    def close(self) -> None:
        """Close the progress bar."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ----------------------------------------------------------------------------------------- the loop
@dataclass
class TrainResult:
    """What :func:`train` returns: the trained ``model``, its EMA copy ``ema``, the loss per step
    ``history``, the number of ``steps`` done and the wall-clock ``seconds`` spent."""

    model: nn.Module
    ema: nn.Module
    history: list = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0


def train(model: nn.Module, data=None, *, pairs=None, path="condot", coupling="independent",
          steps: int = 1000, batch_size: int = 256, lr: float = 1e-3, weight_decay: float = 0.0,
          ema_decay: float = 0.999, grad_clip: float | None = None, label_dropout: float = 0.1,
          time_sampler="uniform", weighting=None, device=None, seed: int = 0, amp=False, compile: bool = False,
          progress: bool = True, checkpoint=None, checkpoint_every: int | None = None,
          check_every: int | None = None, ddp_batches: str = "per_rank") -> TrainResult:
    r"""Train ``model`` with the flow-matching loss of ``path``.

    Args:
        model: a network called as ``model(x, t)`` (or ``model(x, t, y)`` with labels).
        data: where ``x1`` comes from: a sampler ``data(n, generator=g)`` returning ``(n, ...)``
            (or ``(x1, y)``), a tensor ``(N, ...)`` to draw minibatches from, or a tuple
            ``(x1, y)`` of data and integer labels for class-conditional training.
        pairs: instead of ``data``, fixed pairs ``(x0, x1)`` (e.g. from
            :func:`cfmlib.couplings.reflow_pairs`); minibatches draw pairs, no coupling is applied.
        path: a path name from :data:`cfmlib.paths.PATHS` or a path object
            (:class:`~cfmlib.paths.ProbabilityPath`: Gaussian, discrete, ...), which decides the loss.
        coupling: ``'independent'`` (I-CFM), ``'ot'`` (exact minibatch OT, OT-CFM) or a
            :class:`~cfmlib.couplings.Coupling`.
        steps, batch_size, lr, weight_decay: Adam(W) optimisation settings.
        ema_decay: decay of the exponential moving average of the weights (:class:`EMA`; ``0`` disables it).
        grad_clip: clip the gradient norm to this value (``None``: no clipping).
        label_dropout: probability of replacing a label by the null label (classifier-free guidance).
        time_sampler: the density of training times (:mod:`cfmlib.timesteps`); weighting: optional
            ``weighting(t) -> (batch,)`` loss weights.
        device: ``None`` picks CUDA, then MPS, then CPU (:func:`cfmlib.device.get_device`).
        seed: seeds the model's initialisation-independent randomness: data, noise, times, dropout.
        amp: ``False``, ``'bf16'`` or ``'fp16'``: autocast the forward pass on CUDA (loss in fp32).
        compile: wrap the model in ``torch.compile`` for the training forward pass.
        progress: show a progress bar (tqdm).
        checkpoint: a file path; the state is saved there every ``checkpoint_every`` steps and at
            the end, and an existing checkpoint there is resumed from (bit for bit).
        check_every: how often (in steps) to test the loss for NaN/inf; default every 20 steps on
            the CPU and every 50 on a GPU (fewer host synchronisations), and always before a
            checkpoint is saved. The error names the first bad step either way.
        ddp_batches: only used when ``torch.distributed`` is initialised (e.g. under ``torchrun``):
            ``'per_rank'`` (default): rank ``r`` seeds its generator with ``seed + r`` and draws its
            own batch of ``batch_size // world_size`` (data, noise, times, coupling);
            ``'global'``: every rank draws the same global batch of ``batch_size`` from ``seed`` and
            trains on its slice, so the run equals single-process training up to rounding.

    Data and model must share a dtype (float64 data from NumPy meets a float32 model with a clear
    error: convert with ``.float()``); data shapes must match the model's (``model.config``).

    Distributed training: when ``torch.distributed`` is initialised, the model is wrapped in
    :class:`~torch.nn.parallel.DistributedDataParallel` (gradients averaged over ranks), every
    rank starts from rank 0's weights, so the weights and the EMA stay identical on all ranks;
    ``batch_size`` is the global batch and must be divisible by the world size; the device
    defaults to ``cuda:LOCAL_RANK`` when CUDA is available; checkpoints are written by rank 0
    (with every rank's generator state) and read by all; the progress bar shows on rank 0
    only; the returned ``history`` is the loss averaged over ranks.

    Returns:
        a :class:`TrainResult`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {_checks.describe(model)}")
    path = get_path(path)
    _check_source(data, pairs, path)
    coupling = get_coupling(coupling)
    if pairs is not None and not isinstance(coupling, IndependentCoupling):
        raise ValueError("pairs are already coupled; use coupling='independent' with pairs")
    _checks.positive_int("steps", steps)
    _checks.positive_int("batch_size", batch_size)
    _checks.number("lr", lr, lo=0.0, lo_open=True)
    _checks.number("weight_decay", weight_decay, lo=0.0)
    _checks.number("ema_decay", ema_decay, lo=0.0, hi=1.0, hi_open=True)
    _checks.number("label_dropout", label_dropout, lo=0.0, hi=1.0, hi_open=True)
    if grad_clip is not None:
        _checks.number("grad_clip", grad_clip, lo=0.0, lo_open=True)
    if amp not in (False, None, "bf16", "fp16"):
        raise ValueError(f"amp must be False, 'bf16' or 'fp16', got {amp!r}")
    if weighting is not None:
        _checks.function("weighting", weighting, "(t)")
    time_sampler = get_time_sampler(time_sampler)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {_checks.describe(seed)}")
    if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be a file path (str or os.PathLike) or None, got {_checks.describe(checkpoint)}")
    if check_every is not None:
        _checks.positive_int("check_every", check_every)
    if checkpoint_every is not None:
        _checks.positive_int("checkpoint_every", checkpoint_every)
        if checkpoint is None:
            raise ValueError("checkpoint_every was given without a checkpoint path")
    _checks.choice("ddp_batches", ddp_batches, ("per_rank", "global"))
    _check_fits(model, data, pairs)
    ckpt = _Checkpoint(checkpoint)

    ranks = _Ranks()
    if ranks.on and batch_size % ranks.world:
        raise ValueError(f"batch_size={batch_size} must be divisible by the world size {ranks.world} "
                         f"(batch_size is the global batch; each rank trains on batch_size // {ranks.world})")
    device = ranks.device(device) if ranks.on else get_device(device)
    model = model.to(device)
    if ranks.on:
        ranks.broadcast_(model)  # every rank starts from rank 0's weights (and so does the EMA)
    ema = EMA(model, ema_decay)
    per_rank = ranks.on and ddp_batches == "per_rank"
    local = batch_size // ranks.world
    gen = torch.Generator(device=device).manual_seed(seed + ranks.rank if per_rank else seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay) if weight_decay \
        else torch.optim.Adam(model.parameters(), lr=lr)
    monitor = LossMonitor(steps, device=device, check_every=check_every or (20 if device.type == "cpu" else 50),
                          progress=progress and ranks.rank == 0, what=getattr(path, "loss_name", "the loss"),
                          hint=f"Likely causes: a learning rate too high (lr={lr}; try 10x smaller or set grad_clip), "
                               f"non-finite data or model outputs, or a path whose field is singular at the sampled "
                               f"times ({type(path).__name__}, t_max={path.t_max}).",
                          reduce=ranks.sum if ranks.on else None)
    start = ckpt.resume(model, ema, opt, gen, monitor, steps, ranks, per_rank, seed)
    monitor.checked = start
    if monitor.bar is not None:
        monitor.bar.update(start - monitor.bar.n)

    part = slice(ranks.rank * local, (ranks.rank + 1) * local) if ranks.on and not per_rank else None
    batches = Batches(data, local if part is None else batch_size, pairs=pairs, path=path, coupling=coupling,
                      generator=gen, device=device, time_sampler=time_sampler, label_dropout=label_dropout,
                      num_classes=getattr(model, "num_classes", None), part=part)
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if ranks.on else model
    forward = torch.compile(net) if compile else net
    use_amp = bool(amp) and device.type == "cuda"
    amp_dtype = (torch.float16 if amp == "fp16" else torch.bfloat16) if use_amp else None
    scaler = torch.amp.GradScaler("cuda") if use_amp and amp == "fp16" else None

    t_start = _time.perf_counter()
    model.train()
    try:
        for step in range(start, steps):
            batch = batches.next(ahead=step + 1 < steps)
            if step == start and callable(data) and not isinstance(data, torch.Tensor):
                _check_fits(model, batch, None)  # what a sampler draws is known only now
            loss = train_step(forward, opt, batch, path, ema=ema, step=step, grad_clip=grad_clip,
                              weighting=weighting, amp=amp_dtype, scaler=scaler, check=False)
            done = step + 1
            save_now = ckpt.due(done, checkpoint_every)
            if save_now or done == steps:
                ema.sync()
            if save_now:
                monitor.history[step] = loss
                monitor.check(done)  # never save a NaN model
            monitor.record(step, loss)
            if save_now:
                ckpt.save(done, model, ema, opt, gen, monitor.history, ranks)
        if ckpt.path is not None and start < steps and not ckpt.due(steps, checkpoint_every):
            ckpt.save(steps, model, ema, opt, gen, monitor.history, ranks)
    finally:
        monitor.close()
        batches.close()
    seconds = _time.perf_counter() - t_start
    model.eval()
    ema.model.eval()
    history = ranks.mean(monitor.history) if ranks.on else monitor.history
    return TrainResult(model=model, ema=ema.model, history=history.cpu().tolist(), steps=steps - start,
                       seconds=seconds)


def _check_fits(model, data, pairs):
    """Data and model agree in sample shape, dtype and labels. Called once before the first step for
    tensors and pairs, and on the first batch (a :class:`Batch`) for a sampler, whose output is known only then."""
    labels = None
    if pairs is not None:
        tensors = {"pairs[0] (x0)": pairs[0], "pairs[1] (x1)": pairs[1]}
    elif isinstance(data, Batch):
        tensors, labels = {"data (the sampler's first batch)": data.x1}, data.y
    elif isinstance(data, torch.Tensor):
        tensors = {"data": data}
    elif isinstance(data, (tuple, list)):
        tensors, labels = {"data[0] (x1)": data[0]}, data[1]
    else:
        return
    try:
        want = tuple(data_shape(model))
    except ValueError:  # a model without a config: its first forward pass will tell
        want = None
    for name, x in tensors.items():
        if x.device.type == "meta":
            raise ValueError(f"{name} is on the meta device, which holds no values; pass real data")
        if want is not None and tuple(x.shape[1:]) != want:
            raise ValueError(f"{name} has samples of shape {tuple(x.shape[1:])} but the model expects {want} "
                             f"(model.config); build the model for this data or reshape the data")
        if x.is_floating_point():
            _checks.module_dtype("model", model, **{name: x})
    if labels is not None:
        n_cls = getattr(model, "num_classes", None)
        if not n_cls:
            raise ValueError("data has labels y but the model was built without num_classes")
        top = n_cls if isinstance(data, Batch) else n_cls - 1  # a drawn batch may hold the null label
        if int(labels.min()) < 0 or int(labels.max()) > top:
            raise ValueError(f"labels y must lie in [0, {n_cls - 1}] (num_classes={n_cls}), "
                             f"got values in [{int(labels.min())}, {int(labels.max())}]")


class _Checkpoint:
    """Resuming from and writing :func:`train`'s checkpoints (collective under ``torch.distributed``)."""

    def __init__(self, checkpoint):
        self.path = Path(checkpoint) if checkpoint is not None else None
        if self.path is not None:
            if self.path.is_dir():
                raise CheckpointError(f"checkpoint {self.path} is a folder; give a file path inside it, "
                                      f"e.g. {self.path / 'model.pt'}")
            if self.path.parent.exists() and not self.path.parent.is_dir():
                raise CheckpointError(f"checkpoint {self.path}: its parent {self.path.parent} is a file, not a folder")

    def due(self, done: int, every: int | None) -> bool:
        return self.path is not None and bool(every) and done % every == 0

    def resume(self, model, ema, opt, gen, monitor, steps, ranks, per_rank, seed) -> int:
        """Load an existing checkpoint into the run; return the step to start from (0 without one)."""
        if self.path is None or not self.path.exists():
            return 0
        state = load_checkpoint(self.path, map_location=monitor.history.device)
        missing = [k for k in ("step", "model", "ema", "optimizer", "history") if k not in state]
        if missing:
            raise CheckpointError(f"checkpoint {self.path} lacks {', '.join(missing)}; it was not written by "
                                  f"cfmlib.train (use a fresh checkpoint path)")
        config = getattr(model, "config", None)
        if config is not None and "config" in state:
            check_config(config, dict(state["config"]))
        if int(state["step"]) > steps:
            raise CheckpointError(f"checkpoint {self.path} is at step {int(state['step'])}, beyond steps={steps}")
        try:
            model.load_state_dict(state["model"])
            ema.model.load_state_dict(state["ema"])
            opt.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"checkpoint {self.path} does not fit this model or optimizer "
                                  f"({str(exc).strip().splitlines()[0][:300]}); start from a fresh checkpoint "
                                  f"path or build the model the checkpoint was written for") from exc
        start = int(state["step"])
        _restore_generator(gen, state, ranks.rank, ranks.world, per_rank, seed + ranks.rank + 1_000_003 * start)
        monitor.history[:start] = state["history"][:start].to(monitor.history.device)
        return start

    def save(self, step, model, ema, opt, gen, history, ranks) -> None:
        gens = ranks.gather_states(gen)
        hist = ranks.mean(history[:step]) if ranks.on else history[:step]
        if ranks.rank == 0:
            save_checkpoint(self.path, {
                "step": step, "model": model.state_dict(), "ema": ema.model.state_dict(),
                "optimizer": opt.state_dict(), "generator": gens[0], "generators": gens,
                "history": hist.cpu(), "config": getattr(model, "config", None) or {},
            })
        if ranks.on:
            dist.barrier()  # nobody reads the file before rank 0 has written it


class _Ranks:
    """This process's place under ``torch.distributed`` (one process of world size 1 without it)."""

    def __init__(self):
        self.on = dist.is_available() and dist.is_initialized()
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if self.on else (0, 1)

    def device(self, device) -> torch.device:
        """This rank's device: the given one, else ``cuda:LOCAL_RANK`` when CUDA is available, else CPU."""
        if device is not None:
            dev = get_device(device)
        elif torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", self.rank % torch.cuda.device_count()))
            dev = torch.device("cuda", local)
        else:
            dev = torch.device("cpu")
        if dev.type == "cuda":
            if dev.index is None:
                dev = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(dev)
        return dev

    @torch.no_grad()
    def broadcast_(self, module: nn.Module) -> None:
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        return self.sum(x) / self.world

    def gather_states(self, gen) -> list:
        if not self.on:
            return [gen.get_state()]
        states = [None] * self.world
        dist.all_gather_object(states, gen.get_state())
        return states


def _restore_generator(gen, state, rank, world, per_rank, fallback_seed):
    """Resume this rank's random stream from a checkpoint, or reseed it (with a warning) when
    the checkpoint's streams cannot be used (another world size, or CPU <-> CUDA generators)."""
    gens = state.get("generators")
    if gens is not None and len(gens) == world:
        g_state = gens[rank]
    elif not per_rank:  # one shared stream: rank 0's
        g_state = state["generator"]
    else:
        g_state = None
    try:
        if g_state is None:
            raise RuntimeError(f"the checkpoint holds {len(gens or [None])} random streams for {world} ranks")
        gen.set_state(g_state.cpu())
    except RuntimeError as exc:
        warnings.warn(f"cannot resume the random stream from the checkpoint ({str(exc).splitlines()[0][:120]}); "
                      f"reseeding: the run continues, but is not bit-identical to an uninterrupted one",
                      stacklevel=3)
        gen.manual_seed(fallback_seed)
