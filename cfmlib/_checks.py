"""Argument checks shared by every public function of ``cfmlib``.

Each helper raises a ``TypeError`` or ``ValueError`` whose message names the
argument, what was expected and what was received, *before* any computation,
so that a wrong call never ends in a shape error from deep inside torch or,
worse, in a silently broadcast result.
"""
from __future__ import annotations

import inspect
import math
from typing import Iterable

import torch


def describe(x) -> str:
    """A short description of ``x`` for error messages."""
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)}, dtype {x.dtype} on {x.device}"
    return f"{type(x).__name__} {x!r}"[:120]


def tensor(name: str, x, *, ndim: int | Iterable[int] | None = None, finite: bool = True,
           floating: bool = True) -> torch.Tensor:
    """Check that ``x`` is a (floating, finite) tensor with the given number of dimensions
    (``finite=False`` skips the check that reads the values)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {describe(x)}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.ndim not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(f"{name} must have {want} dimensions (batch first), got shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}; convert it with .float()")
    # (a 'meta' tensor holds no values: nothing to check, and its device is checked by same_device)
    if finite and x.numel() and x.is_floating_point() and x.device.type != "meta" \
            and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values; clean the data before passing it")
    return x


def same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def same_device(**tensors: torch.Tensor) -> None:
    devices = {k: v.device for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"tensors must be on the same device, got {listing}; move them with .to(device)")


_value_calls: dict = {}


def values_due(key: str, x: torch.Tensor) -> bool:
    """Whether the value checks (NaN, infinity, range) of the function ``key`` run on this call.

    Shape, dtype and device checks are free and run on every call.  Checking *values* reads them on
    the host: free for CPU tensors, which are checked on every call, but a synchronisation for
    tensors on an accelerator, which are therefore checked on calls 1, 2, 4, 8, ... of each function,
    so that a training loop on a GPU does not wait for the device at every step.  Input that is wrong
    from the start is caught on the first call either way.
    """
    kind = x.device.type
    if kind == "cpu":
        return True
    if kind == "meta":
        return False
    n = _value_calls.get(key, 0) + 1
    _value_calls[key] = n
    return n & (n - 1) == 0


def time(name: str, t, batch: int | None = None, *, like: torch.Tensor | None = None,
         lo: float = 0.0, hi: float = 1.0, values: bool = True) -> torch.Tensor:
    """Normalise a time argument to a tensor of shape ``(batch,)`` and check its range.

    Accepts a Python number, a 0-d tensor, a ``(batch,)`` or a ``(batch, 1)`` tensor.
    ``values=False`` skips the checks that read the values (see :func:`values_due`).
    """
    if isinstance(t, bool) or not isinstance(t, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be a number or a tensor of shape (batch,) or (batch, 1), got {describe(t)}")
    dtype = like.dtype if like is not None else torch.get_default_dtype()
    device = like.device if like is not None else None
    if not isinstance(t, torch.Tensor):
        if not math.isfinite(t):
            raise ValueError(f"{name} must be finite, got {t}")
        t = torch.tensor(float(t), dtype=dtype, device=device)
    elif like is not None and t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but the data is on {like.device}; move it with .to(device)")
    if not t.is_floating_point():
        t = t.to(dtype)
    if t.ndim == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.ndim > 1:
        raise ValueError(f"{name} must be a scalar, (batch,) or (batch, 1), got shape {tuple(t.shape)}")
    if batch is not None:
        if t.ndim == 0:
            t = t.expand(batch)
        elif t.shape[0] != batch:
            raise ValueError(f"{name} has {t.shape[0]} entries but the batch has {batch}; "
                             f"pass one time per sample or a scalar")
    if t.device.type == "meta" or not values:  # meta: no values (devices are compared by the caller)
        return t
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    if t.numel() and (bool((t < lo).any()) or bool((t > hi).any())):
        raise ValueError(f"{name} must lie in [{lo}, {hi}], got values in "
                         f"[{float(t.min()):.4g}, {float(t.max()):.4g}]")
    return t


def positive_int(name: str, n) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{name} must be a positive int, got {describe(n)}")
    if n <= 0:
        raise ValueError(f"{name} must be a positive int, got {n}")
    return n


def time_features(name: str, n) -> int:
    """0 (the network sees the raw time) or a positive even number of sinusoidal time features."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0 or n % 2:
        raise ValueError(f"{name} must be 0 (raw t) or a positive even int, got {n!r}")
    return n


def number(name: str, x, *, lo: float | None = None, hi: float | None = None,
           lo_open: bool = False, hi_open: bool = False) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a number, got {describe(x)}")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    bad_lo = lo is not None and (x <= lo if lo_open else x < lo)
    bad_hi = hi is not None and (x >= hi if hi_open else x > hi)
    if bad_lo or bad_hi:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        rng = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
        raise ValueError(f"{name} must lie in {rng}, got {x}")
    return x


def choice(name: str, value, options: Iterable[str]) -> str:
    options = list(options)
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"unknown {name} {value!r}; valid choices are: {', '.join(options)}")
    return value


def function(name: str, f, call: str = "(x, t)"):
    """Check that ``f`` is callable (a field, a model, a log-density ...)."""
    if not callable(f):
        raise TypeError(f"{name} must be callable as {name}{call}, got {describe(f)}")
    return f


def generator(name: str, g):
    """Check that ``g`` is ``None`` or a :class:`torch.Generator`."""
    if g is not None and not isinstance(g, torch.Generator):
        raise TypeError(f"{name} must be a torch.Generator or None, got {describe(g)}")
    return g


def module_device(name: str, module, **tensors: torch.Tensor) -> None:
    """When ``module`` is an ``nn.Module`` with parameters, check that the tensors are on its device."""
    if not isinstance(module, torch.nn.Module):
        return
    p = next(iter(module.parameters()), None)
    if p is None:
        return
    for k, v in tensors.items():
        if isinstance(v, torch.Tensor) and v.device != p.device:
            raise ValueError(f"{k} is on {v.device} but the {name}'s parameters are on {p.device}; "
                             f"move one of them with .to(device)")


def module_dtype(name: str, module, **tensors: torch.Tensor) -> None:
    """When ``module`` is an ``nn.Module`` with floating parameters, check that the tensors have their dtype."""
    if not isinstance(module, torch.nn.Module):
        return
    p = next((q for q in module.parameters() if q.is_floating_point()), None)
    if p is None:
        return
    for k, v in tensors.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != p.dtype:
            raise TypeError(f"{k} has dtype {v.dtype} but the {name}'s parameters are {p.dtype}; convert one "
                            f"of them (e.g. {k}.to({p.dtype}) or {name}.to({v.dtype}))")


def field_output(name: str, out, x: torch.Tensor) -> None:
    """Check that a field evaluated at ``x`` returned a tensor of ``x``'s shape (checked once per solve)."""
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        got = describe(out)
        raise ValueError(f"{name} must return a tensor of the state's shape {tuple(x.shape)}, got {got}; "
                         f"a field maps (batch, ...) points to velocities of the same shape")


def labels(name: str, y, batch: int, num_classes: int | None) -> torch.Tensor:
    """Check class labels: an integer tensor ``(batch,)`` with values in ``[0, num_classes]``
    (``num_classes`` is the null label of classifier-free guidance)."""
    if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor of shape ({batch},), got {describe(y)}")
    if y.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) (one label per sample), got shape {tuple(y.shape)}")
    if num_classes is not None and y.numel() and y.device.type != "meta":
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi > num_classes:
            raise ValueError(f"{name} must lie in [0, {num_classes}] ({num_classes} classes, the last label "
                             f"{num_classes} is the null label), got values in [{lo}, {hi}]")
    return y


def shape(name: str, s) -> tuple:
    """Check a tensor shape: a tuple (or list / torch.Size) of non-negative ints."""
    if not isinstance(s, (tuple, list, torch.Size)) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in s):
        raise TypeError(f"{name} must be a tuple of ints such as (batch, dim), got {describe(s)}")
    if any(d < 0 for d in s):
        raise ValueError(f"{name} must have non-negative sizes, got {tuple(s)}")
    return tuple(s)


def same_dtype(**tensors: torch.Tensor) -> None:
    """Floating tensors that meet in one computation must share a dtype (float32 data and a float64
    path are fine elsewhere; here mixing would silently promote or fail deep inside torch)."""
    dtypes = {k: v.dtype for k, v in tensors.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    if len(set(dtypes.values())) > 1:
        listing = ", ".join(f"{k} is {d}" for k, d in dtypes.items())
        raise TypeError(f"tensors must have the same dtype, got {listing}; convert with .to(dtype) "
                        f"(e.g. .float() for data from NumPy, which is float64)")


def known_kwargs(what: str, factory, kwargs: dict) -> None:
    """Raise a ``TypeError`` listing the valid keyword arguments when ``kwargs`` has others."""
    params = inspect.signature(factory).parameters.values()
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return
    valid = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise TypeError(f"{what} got unknown keyword argument(s) {', '.join(unknown)}; "
                        f"valid ones: {', '.join(valid) if valid else 'none'}")
