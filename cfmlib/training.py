r"""The conditional flow-matching loss and one training loop (chapters 5, 7, 8 and 9).

The loss of Theorem 2, for a path :math:`x_t = \alpha_t x_1 + \sigma_t x_0`:

.. math::  \mathcal L_{\mathrm{CFM}}(\theta) = \mathbb E_{t, (x_0, x_1)}
           \lVert v_\theta(x_t, t) - (\dot\alpha_t x_1 + \dot\sigma_t x_0) \rVert^2 ,

with :math:`t \sim U[0, t_{\max}]` and :math:`(x_0, x_1)` drawn from a coupling
(independent or minibatch OT).  :func:`train` runs it for any path, coupling
and model: the device is chosen automatically (CUDA, then MPS, then CPU),
every random draw comes from one seeded generator, an EMA copy of the weights
is kept, and checkpoints are written atomically and resume exactly.

On a GPU the step keeps data, model, optimiser state and the loss history on the
device (the host only looks at the loss every ``check_every`` steps), with
optional bf16/fp16 autocast and ``torch.compile``.  Under ``torchrun`` (when
``torch.distributed`` is initialised) the same :func:`train` runs data-parallel
with DistributedDataParallel; see its docstring and ``examples/train_ddp.py``.
"""
from __future__ import annotations

import copy
import math
import os
import time as _time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import _checks
from .checkpoint import check_config, load_checkpoint, save_checkpoint
from .couplings import COUPLINGS, _ot_permutation
from .device import get_device
from .paths import AffinePath, get_path

__all__ = ["cfm_loss", "train", "TrainResult", "NonFiniteLossError"]


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss."""


def _loss(model, path: AffinePath, x0, x1, t, y=None):
    xt, ut = path._sample(x0, x1, t)
    v = model(xt, t) if y is None else model(xt, t, y)
    # the loss in float32 at least (autocast may give a half-precision v), float64 when the model is
    dt = torch.promote_types(torch.promote_types(v.dtype, ut.dtype), torch.float32)
    return (v.to(dt) - ut.to(dt)).pow(2).flatten(1).sum(1).mean()


def cfm_loss(model, x0: torch.Tensor, x1: torch.Tensor, t, path="ot", y: torch.Tensor | None = None):
    r"""Monte Carlo estimate of :math:`\mathcal L_{\mathrm{CFM}}` on a batch of pairs.

    ``x0``, ``x1``: ``(batch, ...)``; ``t``: number or ``(batch,)``; ``y``: optional labels.
    Returns the mean over the batch of :math:`\lVert v_\theta(x_t, t) - u_t(x_t \mid x_1)\rVert^2`.
    """
    _checks.function("model", model)
    path = get_path(path)
    t = path._pair(x0, x1, t)
    _checks.module_device("model", model, x1=x1)
    if y is not None:
        _checks.labels("y", y, x1.shape[0], getattr(model, "num_classes", None))
    return _loss(model, path, x0, x1, t, y)


@dataclass
class TrainResult:
    """What :func:`train` returns: the trained ``model``, its EMA copy ``ema``, the loss per step
    ``history``, the number of ``steps`` done and the wall-clock ``seconds`` spent."""

    model: nn.Module
    ema: nn.Module
    history: list = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0


class _Batches:
    """Draws everything random for one step from one generator: data, labels, noise, times,
    label dropout, and applies the coupling."""

    def __init__(self, data, pairs, batch_size, path, coupling, label_dropout, num_classes, gen, device,
                 part=None):
        self.batch_size, self.path, self.coupling, self.part = batch_size, path, coupling, part
        self.scale = path.source_scale  # the OT coupling pairs source points sigma_0 x0 with data
        self.label_dropout, self.num_classes, self.gen, self.device = label_dropout, num_classes, gen, device
        self.sampler = self.x1 = self.y = self.x0 = None
        if pairs is not None:
            self.x0, self.x1 = (p.to(device) for p in pairs)
        elif callable(data) and not isinstance(data, torch.Tensor):
            self.sampler = data
        elif isinstance(data, torch.Tensor):
            self.x1 = data.to(device)
        else:
            self.x1, self.y = data[0].to(device), data[1].to(device)

    def __call__(self, ahead: bool = True):
        """The next step's batch. With the OT coupling the next batch is drawn ahead and its
        coupling (an exact assignment, which releases the GIL) is solved in a background thread
        while the current step trains. The draws still come from ``gen`` in the same order, and
        ``gen`` is rewound after drawing ahead, so that between calls it always holds the state at
        the step boundary (what a checkpoint saves); results are bitwise those without prefetch.
        ``ahead=False`` (the last step) prepares nothing for a step that will not come."""
        if self.coupling != "ot" or self.x0 is not None:
            return self._finish(*self._draw())
        pending, self._pending = getattr(self, "_pending", None), None
        if pending is not None and torch.equal(self.gen.get_state(), pending[0]):
            self.gen.set_state(pending[1])  # fast-forward past the draws made ahead
            x0, x1, t, y, perm = pending[2], pending[3], pending[4], pending[5], pending[6].result()
        else:  # first step, or someone else used the generator since: draw now
            if pending is not None:
                pending[6].result()
            x0, x1, t, y = self._draw()
            perm = _ot_permutation(self.scale * x0, x1)
        if not ahead:
            return self._finish(x0[perm], x1, t, y, coupled=True)
        boundary = self.gen.get_state()
        nx0, nx1, nt, ny = self._draw()
        ahead = self.gen.get_state()
        self.gen.set_state(boundary)
        if not hasattr(self, "_pool"):
            from concurrent.futures import ThreadPoolExecutor
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cfmlib-coupling")
        self._pending = (boundary, ahead, nx0, nx1, nt, ny, self._pool.submit(_ot_permutation, self.scale * nx0, nx1))
        return self._finish(x0[perm], x1, t, y, coupled=True)

    def _draw(self):
        """Every random draw of one step, in a fixed order: data (and labels), noise, times, dropout."""
        b, gen, dev = self.batch_size, self.gen, self.device
        y = None
        if self.sampler is not None:
            x1 = self.sampler(b, generator=gen)
            if isinstance(x1, tuple):
                x1, y = x1
            x1 = x1.to(dev)
            y = None if y is None else y.to(dev)
            x0 = None
        else:
            idx = torch.randint(0, self.x1.shape[0], (b,), generator=gen, device=dev)
            x1 = self.x1[idx]
            y = None if self.y is None else self.y[idx]
            x0 = None if self.x0 is None else self.x0[idx]
        if x0 is None:
            # x0 is the standard-normal noise of x_t = alpha_t x1 + sigma_t x0; the source point
            # at t = 0 is sigma_0 x0 (scaling x0 here would apply sigma_0 twice, e.g. for VE)
            x0 = torch.randn(x1.shape, generator=gen, device=dev, dtype=x1.dtype)
        t = torch.rand(b, generator=gen, device=dev, dtype=x1.dtype) * self.path.t_max
        if y is not None and self.label_dropout > 0:
            drop = torch.rand(b, generator=gen, device=dev) < self.label_dropout
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return x0, x1, t, y

    def _finish(self, x0, x1, t, y, coupled=False):
        """Apply the coupling (drawn noise only; fixed pairs are already coupled) and the rank's slice."""
        if self.coupling == "ot" and not coupled and self.x0 is None:
            x0 = x0[_ot_permutation(self.scale * x0, x1)]
        if self.part is not None:  # distributed, 'global' batches: this rank's slice of the global batch
            x0, x1, t = x0[self.part], x1[self.part], t[self.part]
            y = None if y is None else y[self.part]
        return x0, x1, t, y


def _check_samples(name, x, model):
    """``x`` (a batch of samples) holds values and its samples have the model's data shape."""
    if x.device.type == "meta":
        raise ValueError(f"{name} is on the meta device, which holds no values; pass real data")
    from .solvers import _data_shape

    try:
        want = tuple(_data_shape(model))
    except ValueError:  # a model without a config: its first forward pass will tell
        return
    if tuple(x.shape[1:]) != want:
        raise ValueError(f"{name} has samples of shape {tuple(x.shape[1:])} but the model expects {want} "
                         f"(model.config); build the model for this data or reshape the data")


def _check_data(data, pairs, model):
    if (data is None) == (pairs is None):
        raise ValueError("pass exactly one of data (a sampler, a tensor or an (x1, y) tuple) or pairs=(x0, x1)")
    if pairs is not None:
        if not (isinstance(pairs, (tuple, list)) and len(pairs) == 2):
            raise TypeError(f"pairs must be a tuple (x0, x1) of tensors, got {_checks.describe(pairs)}")
        _checks.tensor("pairs[0] (x0)", pairs[0], ndim=range(2, 6))
        _checks.tensor("pairs[1] (x1)", pairs[1], ndim=range(2, 6))
        _checks.same_shape("pairs[0] (x0)", pairs[0], "pairs[1] (x1)", pairs[1])
        _check_samples("pairs[0] (x0)", pairs[0], model)
        _check_samples("pairs[1] (x1)", pairs[1], model)
        return
    if isinstance(data, torch.Tensor):
        _checks.tensor("data", data, ndim=range(2, 6))
        _check_samples("data", data, model)
        return
    if isinstance(data, (tuple, list)):
        if len(data) != 2:
            raise TypeError(f"data as a tuple must be (x1, y), got {len(data)} entries")
        x1, y = data
        _checks.tensor("data[0] (x1)", x1, ndim=range(2, 6))
        _check_samples("data[0] (x1)", x1, model)
        if not isinstance(y, torch.Tensor) or y.dtype not in (torch.int64, torch.int32) or y.shape != x1.shape[:1]:
            raise TypeError(f"data[1] (y) must be an integer tensor of shape ({x1.shape[0]},), got {_checks.describe(y)}")
        n_cls = getattr(model, "num_classes", None)
        if not n_cls:
            raise ValueError("data has labels y but the model was built without num_classes")
        if int(y.min()) < 0 or int(y.max()) >= n_cls:
            raise ValueError(f"labels y must lie in [0, {n_cls - 1}] (num_classes={n_cls}), "
                             f"got values in [{int(y.min())}, {int(y.max())}]")
        return
    if not callable(data):
        raise TypeError(f"data must be a sampler called as data(n, generator=...), a tensor (N, ...) "
                        f"or a tuple (x1, y); got {_checks.describe(data)}")


def train(model: nn.Module, data=None, *, pairs=None, path="ot", coupling: str = "independent",
          steps: int = 1000, batch_size: int = 256, lr: float = 1e-3, weight_decay: float = 0.0,
          ema_decay: float = 0.999, grad_clip: float | None = None, label_dropout: float = 0.1,
          device=None, seed: int = 0, amp=False, compile: bool = False, progress: bool = True,
          checkpoint=None, checkpoint_every: int | None = None, check_every: int | None = None,
          ddp_batches: str = "per_rank") -> TrainResult:
    r"""Train ``model`` with the conditional flow-matching loss.

    Args:
        model: a network called as ``model(x, t)`` (or ``model(x, t, y)`` with labels).
        data: where ``x1`` comes from: a sampler ``data(n, generator=g)`` returning ``(n, ...)``
            (or ``(x1, y)``), a tensor ``(N, ...)`` to draw minibatches from, or a tuple
            ``(x1, y)`` of data and integer labels for class-conditional training.
        pairs: instead of ``data``, fixed pairs ``(x0, x1)`` (e.g. from
            :func:`cfmlib.couplings.reflow_pairs`); minibatches draw pairs, no coupling is applied.
        path: a path name from :data:`cfmlib.paths.PATHS` or an :class:`~cfmlib.paths.AffinePath`.
        coupling: ``'independent'`` (I-CFM) or ``'ot'`` (exact minibatch OT, OT-CFM).
        steps, batch_size, lr, weight_decay: Adam(W) optimisation settings.
        ema_decay: decay of the exponential moving average of the weights (``0`` disables it); during
            warm-up the decay used at step ``k`` is ``min(ema_decay, (1 + k) / (10 + k))``.
        grad_clip: clip the gradient norm to this value (``None``: no clipping).
        label_dropout: probability of replacing a label by the null label (classifier-free guidance).
        device: ``None`` picks CUDA, then MPS, then CPU (:func:`cfmlib.device.get_device`).
        seed: seeds the model's initialisation-independent randomness: data, noise, times, dropout.
        amp: ``False``, ``'bf16'`` or ``'fp16'``: autocast the forward pass on CUDA (loss in fp32).
        compile: wrap the model in ``torch.compile`` for the training forward pass.
        progress: show a progress bar (tqdm).
        checkpoint: a file path; the state is saved there every ``checkpoint_every`` steps and at
            the end, and an existing checkpoint there is resumed from.
        check_every: how often (in steps) to test the loss for NaN/inf; default every 20 steps on
            the CPU and every 50 on a GPU (fewer host synchronisations), and always before a
            checkpoint is saved. The error names the first bad step either way.
        ddp_batches: only used when ``torch.distributed`` is initialised (e.g. under ``torchrun``):
            ``'per_rank'`` (default): rank ``r`` seeds its generator with ``seed + r`` and draws its
            own batch of ``batch_size // world_size`` (data, noise, times, coupling);
            ``'global'``: every rank draws the same global batch of ``batch_size`` from ``seed`` and
            trains on its slice, so the run equals single-process training up to rounding (the
            mean over ranks of the per-rank mean losses is the global mean loss).

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
    _check_data(data, pairs, model)
    path = get_path(path)
    _checks.choice("coupling", coupling, COUPLINGS)
    if pairs is not None and coupling != "independent":
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
    dist_on, rank, world = _distributed()
    if dist_on and batch_size % world:
        raise ValueError(f"batch_size={batch_size} must be divisible by the world size {world} "
                         f"(batch_size is the global batch; each rank trains on batch_size // {world})")
    device = _rank_device(device) if dist_on else get_device(device)
    model = model.to(device)
    if dist_on:
        _broadcast_(model)  # every rank starts from rank 0's weights (and so does the EMA)
    ema = copy.deepcopy(model).requires_grad_(False)
    per_rank = dist_on and ddp_batches == "per_rank"
    local = batch_size // world if dist_on else batch_size
    part = slice(rank * local, (rank + 1) * local) if dist_on and not per_rank else None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed + rank if per_rank else seed)
    num_classes = getattr(model, "num_classes", None)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay) if weight_decay \
        else torch.optim.Adam(model.parameters(), lr=lr)
    history = torch.zeros(steps, dtype=torch.float32, device=device)
    start, config = 0, getattr(model, "config", None)

    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    if ckpt_path is not None and ckpt_path.exists():
        state = load_checkpoint(ckpt_path, map_location=device)
        if config is not None and "config" in state:
            check_config(config, dict(state["config"]))
        if int(state["step"]) > steps:
            raise ValueError(f"checkpoint {ckpt_path} is at step {int(state['step'])}, beyond steps={steps}")
        missing = [k for k in ("step", "model", "ema", "optimizer", "history") if k not in state]
        if missing:
            raise ValueError(f"checkpoint {ckpt_path} lacks {', '.join(missing)}; it was not written by "
                             f"cfmlib.train (use a fresh checkpoint path)")
        try:
            model.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            opt.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ValueError(f"checkpoint {ckpt_path} does not fit this model or optimizer "
                             f"({str(exc).strip().splitlines()[0][:300]}); start from a fresh checkpoint "
                             f"path or build the model the checkpoint was written for") from exc
        start = int(state["step"])
        _restore_generator(gen, state, rank, world, per_rank, seed + rank + 1_000_003 * start)
        history[:start] = state["history"][:start].to(device)

    def save(step):  # collective under torch.distributed: every rank calls it at the same steps
        gens = [gen.get_state()]
        if dist_on:
            import torch.distributed as dist
            gens = [None] * world
            dist.all_gather_object(gens, gen.get_state())
        hist = _mean_over_ranks(history[:step], world) if dist_on else history[:step]
        if rank == 0:
            save_checkpoint(ckpt_path, {
                "step": step, "model": model.state_dict(), "ema": ema.state_dict(),
                "optimizer": opt.state_dict(), "generator": gens[0], "generators": gens,
                "history": hist.cpu(), "config": config if config is not None else {},
            })
        if dist_on:
            torch.distributed.barrier()  # nobody reads the file before rank 0 has written it

    draw = batch_size if part is not None else local  # 'global': draw the whole batch, keep a slice
    batches = _Batches(data, pairs, draw, path, coupling, label_dropout, num_classes, gen, device, part)
    net = model
    if dist_on:
        from torch.nn.parallel import DistributedDataParallel
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    forward = torch.compile(net) if compile else net
    use_amp = bool(amp) and device.type == "cuda"
    amp_dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda") if use_amp and amp == "fp16" else None
    params = [p for p in model.parameters()]
    ema_params = [p for p in ema.parameters()]
    check_every = check_every or (20 if device.type == "cpu" else 50)

    @torch.no_grad()
    def sync_ema():  # without averaging (ema_decay = 0) the EMA is the model: copied when it is read
        if ema_decay == 0:
            torch._foreach_copy_(ema_params, params)

    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, initial=start, desc="training", leave=False, mininterval=0.5)

    t_start = _time.perf_counter()
    model.train()
    last_checked = start
    for step in range(start, steps):
        x0, x1, t, y = batches(ahead=step + 1 < steps)
        if use_amp:
            with torch.autocast(device.type, dtype=amp_dtype):
                loss = _loss(forward, path, x0, x1, t, y)
        else:
            loss = _loss(forward, path, x0, x1, t, y)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        if ema_decay > 0:
            with torch.no_grad():  # the EMA must not record autograd history (it would grow every step)
                # warm-up: early on the average must not be dominated by the random initial weights
                decay = min(ema_decay, (1.0 + step) / (10.0 + step))
                torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        history[step] = loss.detach()
        done = step + 1
        save_now = ckpt_path is not None and checkpoint_every and done % checkpoint_every == 0
        if save_now or done == steps:
            sync_ema()
        if done - last_checked >= check_every or done == steps or save_now:  # never save a NaN model
            _raise_if_nonfinite(history, last_checked, done, lr, path, reduce=dist_on)
            last_checked = done
        if bar is not None and (done % 50 == 0 or done == steps):
            bar.update(done - bar.n)
            bar.set_postfix(loss=f"{float(history[step]):.3f}")
        if save_now:
            save(done)
    if bar is not None:
        bar.close()
    if ckpt_path is not None and (not checkpoint_every or steps % checkpoint_every) and start < steps:
        save(steps)
    seconds = _time.perf_counter() - t_start
    model.eval()
    ema.eval()
    if dist_on:
        history = _mean_over_ranks(history, world)
    return TrainResult(model=model, ema=ema, history=history.cpu().tolist(), steps=steps - start, seconds=seconds)


def _distributed():
    """``(initialised, rank, world_size)`` of ``torch.distributed`` (``(False, 0, 1)`` without it)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return True, dist.get_rank(), dist.get_world_size()
    return False, 0, 1


def _rank_device(device) -> torch.device:
    """The device of this rank: the given one, else ``cuda:LOCAL_RANK`` when CUDA is available, else CPU."""
    if device is not None:
        dev = get_device(device)
    elif torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", torch.distributed.get_rank() % torch.cuda.device_count()))
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
    return dev


@torch.no_grad()
def _broadcast_(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (in place)."""
    for tensor in module.state_dict().values():
        torch.distributed.broadcast(tensor, src=0)


def _mean_over_ranks(x: torch.Tensor, world: int) -> torch.Tensor:
    """The elementwise mean of ``x`` over all ranks (a collective call)."""
    x = x.clone()
    torch.distributed.all_reduce(x)
    return x / world


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


def _raise_if_nonfinite(history, lo, hi, lr, path, reduce=False):
    window = history[lo:hi]
    if reduce:  # a NaN on any rank stops every rank at the same step (no rank waits forever)
        window = window.clone()
        torch.distributed.all_reduce(window)
    bad = ~torch.isfinite(window)
    if bool(bad.any()):
        first = lo + int(bad.nonzero()[0, 0])
        raise NonFiniteLossError(
            f"the CFM loss became {float(window[first - lo])} at step {first + 1}; training stopped. "
            f"Likely causes: a learning rate too high (lr={lr}; try 10x smaller or set grad_clip), "
            f"non-finite data or model outputs, or a path whose field is singular at the sampled times "
            f"({type(path).__name__}, t_max={path.t_max}).")
