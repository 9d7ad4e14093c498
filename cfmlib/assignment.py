r"""Exact linear assignment, the solver behind the minibatch OT coupling (chapter 8).

:func:`solve` returns, for a square cost matrix :math:`C` (``n x n``), a permutation
``col`` minimising :math:`\sum_i C_{i, \mathrm{col}(i)}` -- the optimal transport plan
between two uniform batches of equal size, which is a permutation (chapter 8, Birkhoff--von
Neumann). It is used by :mod:`cfmlib.couplings` for OT-CFM and by :func:`cfmlib.metrics.w2`.

**The certificate.** Every plan is checked before it is returned. Linear-programming duality
(chapter 8) gives potentials :math:`u` (rows) and :math:`v` (columns) with reduced costs
:math:`C_{ij} - u_i - v_j \ge 0` everywhere and :math:`= 0` on the matching; then for every
permutation :math:`\sigma`,

.. math:: \sum_i C_{i,\sigma(i)} \;\ge\; \sum_i u_i + \sum_j v_j \;=\; \sum_i C_{i,\mathrm{col}(i)},

so ``col`` is optimal. :func:`verify` checks this in one pass over the matrix, up to a
floating-point tolerance (see there). A plan that fails is not returned: the next solver
below is tried.

**The solvers**, in order:

1. ``compiled``: a C routine (``cfmlib/_assign.c``), built when cfmlib is installed
   (``pip install``; see ``setup.py``) and loaded with :mod:`ctypes`, which releases the GIL
   (``cfmlib.train`` computes the next batch's coupling in a background thread). An auction
   (Bertsekas, 1988) in single precision gives approximate prices, then shortest augmenting
   paths (Jonker and Volgenant, 1987) in double precision decide the assignment exactly. On
   the near-tied costs of flow matching (squared distances between nearby points) it is
   several times faster than POT and SciPy; see ``bench/assignment.py``. It is loaded only
   from a file and folder that no other user can write, never from a shared temporary folder.
2. ``pot``: POT's exact network simplex (:func:`ot.emd`), used when the compiled solver is
   missing (no C compiler at install time, Windows), refused, or its certificate fails. Its
   plan is accepted only if POT reports an optimal solution (not its iteration limit), the plan
   is a permutation, and POT's own potentials certify it.
3. ``scipy``: :func:`scipy.optimize.linear_sum_assignment`, the last resort (and the solver for
   matrices with ``+inf`` entries, which mark forbidden pairs).

When the compiled solver is not used, one :class:`AssignmentFallbackWarning` per process says
why. The environment variable ``CFMLIB_ASSIGNMENT`` selects a solver: ``pot`` or ``scipy``
(skip the compiled one), ``compiled`` (make its absence an error); unset or ``auto``: the order
above. :func:`backend` names the solver in use and, for a fallback, the reason.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib.machinery
import os
import stat
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

__all__ = ["solve", "backend", "verify", "AssignmentFallbackWarning", "EPS_REL", "LIST_REL"]

#: The auction stops at ``eps = span * EPS_REL`` (``span``: largest minus smallest cost).
EPS_REL = 3e-5
#: The exact phase lists, per row, the columns within ``span * LIST_REL`` of the row's minimum.
LIST_REL = 3e-4
#: Certificate tolerance, relative to ``max|u| + max|v|`` (see :func:`verify`).
CERT_RTOL = 1e-11

_HERE = Path(__file__).resolve().parent
_SOURCES = ("_assign.c", "_assign_kernels.h")  # setup.py hashes the same files, in this order
_ABI = 1
_CHOICES = ("auto", "compiled", "pot", "scipy")


class AssignmentFallbackWarning(RuntimeWarning):
    """The compiled assignment solver is not in use (the message says why); results stay exact."""


# ----------------------------------------------------------------------------- loading the C solver
def _private_group(gid: int, uid: int) -> bool:
    """True for a user private group: the group of that name holding no other user (umask 002 makes
    files group-writable, which is harmless then)."""
    try:
        import grp  # Unix only: imported where it is used
        import pwd

        user = pwd.getpwuid(uid)
        group = grp.getgrgid(gid)
    except (ImportError, KeyError):
        return False
    return gid == user.pw_gid and group.gr_name == user.pw_name and set(group.gr_mem) <= {user.pw_name}


def _unsafe_reason(path, uid: int | None = None) -> str | None:
    """Why the shared library at ``path`` must not be loaded, or ``None`` when it is safe: the file
    and its folder must be owned by this user (or root) and writable by nobody else, and no folder
    above may let another user replace them (a sticky folder such as ``/tmp`` may not be replaced
    by others, but may not hold the library either)."""
    if os.name != "posix" or not hasattr(os, "getuid"):
        return "native code is loaded only on POSIX systems, where file ownership can be checked"
    uid = os.getuid() if uid is None else uid
    real = os.path.realpath(path)

    def writable_by_others(st) -> bool:
        return bool(st.st_mode & stat.S_IWOTH) or (bool(st.st_mode & stat.S_IWGRP) and not _private_group(st.st_gid, uid))

    try:
        st = os.stat(real)
        if not stat.S_ISREG(st.st_mode):
            return f"{real} is not a regular file"
        if st.st_uid not in (uid, 0):
            return f"{real} belongs to another user (uid {st.st_uid})"
        if writable_by_others(st):
            return f"{real} is writable by other users (mode {stat.filemode(st.st_mode)})"
        folder, first = os.path.dirname(real), True
        while True:
            st = os.stat(folder)
            if st.st_uid not in (uid, 0):
                return f"the folder {folder} belongs to another user (uid {st.st_uid})"
            if writable_by_others(st) and (first or not st.st_mode & stat.S_ISVTX):
                return f"the folder {folder} is writable by other users (mode {stat.filemode(st.st_mode)})"
            parent, first = os.path.dirname(folder), False
            if parent == folder:
                return None
            folder = parent
    except OSError as exc:
        return f"cannot check {real}: {exc}"


def _source_hash(folder: Path) -> str | None:
    """The hash setup.py compiled into the library, recomputed from the C sources next to this file
    (``None`` where they are not installed)."""
    h = hashlib.sha256()
    try:
        for name in _SOURCES:
            h.update((folder / name).read_bytes())
    except OSError:
        return None
    return h.hexdigest()[:16]


def _library_path(folder: Path = _HERE) -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = folder / f"_assign{suffix}"
        if path.exists():
            return path
    return None


class _Compiled:
    """The C solver behind a :mod:`ctypes` handle."""

    def __init__(self, path: Path):
        lib = ctypes.CDLL(os.path.realpath(path))  # the file that was checked, not a link to it
        lib.cfm_abi.restype = ctypes.c_int
        lib.cfm_source_hash.restype = ctypes.c_char_p
        lib.cfm_isa.restype = ctypes.c_char_p
        lib.cfm_set_isa.argtypes = [ctypes.c_int]
        lib.cfm_set_isa.restype = ctypes.c_int
        fn = lib.cfm_assign
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_double,
                       ctypes.c_int64, ctypes.c_double, ctypes.c_void_p]
        fn.restype = ctypes.c_int
        self.lib, self.fn, self.path = lib, fn, path

    def isa(self) -> str:
        return self.lib.cfm_isa().decode()

    def __call__(self, cost: np.ndarray, max_bids: int | None = None):
        """``(rc, col, v, stats)`` for a C-contiguous float32/float64 matrix; rc 0: solved, 1: out of memory,
        2: a cost is not finite, 3: internal failure."""
        if (cost.ndim != 2 or cost.shape[0] != cost.shape[1] or cost.dtype not in (np.float32, np.float64)
                or not cost.flags.c_contiguous):
            raise ValueError("the C solver needs a C-contiguous square float32 or float64 matrix")
        n = cost.shape[0]
        col = np.empty(n, dtype=np.int64)
        v = np.empty(n, dtype=np.float64)
        stats = np.zeros(8, dtype=np.int64)
        bids = 200 * n + 10_000 if max_bids is None else max_bids
        rc = self.fn(cost.ctypes.data, int(cost.dtype == np.float32), n, col.ctypes.data, v.ctypes.data, EPS_REL,
                     bids, LIST_REL, stats.ctypes.data)
        return rc, col, v, stats


_lock = threading.Lock()
_state: dict = {}


def _load(folder: Path = _HERE):
    """The compiled solver and ``None``, or ``None`` and the reason it cannot be used (cached)."""
    with _lock:
        if folder in _state:
            return _state[folder]
        path = _library_path(folder)
        if path is None:
            result = None, ("it is not installed (cfmlib was installed without a working C compiler, or is run from "
                            "a source folder that was never installed: run `pip install -e .`)")
        else:
            reason = _unsafe_reason(path)
            if reason is None:
                here = _source_hash(folder)
                try:
                    solver = _Compiled(path)
                    built = solver.lib.cfm_source_hash().decode()
                    if solver.lib.cfm_abi() != _ABI:
                        reason = f"{path} has interface {solver.lib.cfm_abi()}, this cfmlib needs {_ABI}: reinstall cfmlib"
                    elif here is not None and built != here:
                        reason = (f"{path} was built from an older version of cfmlib/_assign.c: rebuild it with "
                                  "`pip install -e .` (or `make venv`)")
                except (OSError, AttributeError) as exc:
                    reason = f"{path} could not be loaded: {exc}"
            result = (solver, None) if reason is None else (None, f"refused to load it: {reason}")
        _state[folder] = result
        return result


# ----------------------------------------------------------------------------- the certificate
def verify(cost, col, u, v) -> bool:
    r"""Check the dual certificate of an assignment (chapter 8): ``col`` is a permutation, and the
    reduced costs :math:`r_{ij} = C_{ij} - u_i - v_j` satisfy :math:`r_{ij} \ge -\tau` for all
    :math:`i, j` and :math:`|r_{i,\mathrm{col}(i)}| \le \tau`, with
    :math:`\tau =` ``CERT_RTOL`` :math:`\cdot (\max|u| + \max|v|)` for floating-point rounding.

    Then ``col`` is optimal to within :math:`2 n \tau` in total cost (weak duality), in exact
    arithmetic on the given (float32 or float64) entries. One pass over the matrix, in blocks of
    rows, in float64.

    Args:
        cost: ``(n, n)`` NumPy array (float32 or float64).
        col: ``(n,)`` integer array, row ``i`` matched to column ``col[i]``.
        u, v: ``(n,)`` row and column potentials.
    """
    cost = np.asarray(cost)
    n = cost.shape[0]
    col, u, v = np.asarray(col), np.asarray(u, dtype=np.float64), np.asarray(v, dtype=np.float64)
    if cost.shape != (n, n) or col.shape != (n,) or u.shape != (n,) or v.shape != (n,):
        raise ValueError(f"verify needs cost (n, n), col, u and v (n,), got {cost.shape}, {col.shape}, {u.shape}, "
                         f"{v.shape}")
    if n == 0:
        return True
    if not np.issubdtype(col.dtype, np.integer) or col.min() < 0 or col.max() >= n:
        return False
    if not np.array_equal(np.bincount(col, minlength=n), np.ones(n, dtype=np.int64)):
        return False
    if not (np.isfinite(u).all() and np.isfinite(v).all()):
        return False
    tol = CERT_RTOL * (np.abs(u).max() + np.abs(v).max())
    rows = np.arange(n)
    if np.abs(cost[rows, col].astype(np.float64) - u - v[col]).max() > tol:
        return False
    # min_j (C_ij - v_j) per row, in blocks of rows (about 2 MB of float64 each), then minus u_i
    block = max(1, (1 << 18) // n)
    buf = np.empty((block, n), dtype=np.float64)
    row_min = np.empty(n, dtype=np.float64)
    for r0 in range(0, n, block):
        r1 = min(n, r0 + block)
        out = buf[: r1 - r0]
        np.subtract(cost[r0:r1], v, out=out)
        out.min(axis=1, out=row_min[r0:r1])
    return bool((row_min - u).min() >= -tol)


# ----------------------------------------------------------------------------- the solvers
_warned = False


def _warn_once(message: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(message, AssignmentFallbackWarning, stacklevel=3)


def _matrix(cost) -> np.ndarray:
    """``cost`` as a C-contiguous float32 or float64 NumPy matrix (other dtypes become float64)."""
    if hasattr(cost, "detach") and hasattr(cost, "dtype"):  # a torch tensor: its memory, when CPU float32/64
        cost = cost.detach().cpu()
        if cost.dtype not in (torch.float32, torch.float64):
            if cost.is_complex():
                raise TypeError(f"cost must be a real matrix, got a tensor of dtype {cost.dtype}")
            cost = cost.double()
        cost = cost.numpy()
    try:
        cost = np.asarray(cost)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"cost must be a square matrix of numbers (NumPy array or torch tensor), got {type(cost).__name__}") from exc
    if cost.dtype.kind not in "fiub":
        raise TypeError(f"cost must be a real matrix (float or integer), got dtype {cost.dtype}")
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1]:
        raise ValueError(f"cost must be a square matrix (n, n), got shape {cost.shape}; the exact OT plan between "
                         f"two batches needs equal batch sizes")
    if cost.dtype not in (np.float32, np.float64):
        cost = cost.astype(np.float64)
    return np.ascontiguousarray(cost)


def _check_finite(cost: np.ndarray) -> bool:
    """Raise for NaN or -inf; True when some entry is +inf (a forbidden pair)."""
    if np.isfinite(cost).all():
        return False
    bad = np.argwhere(np.isnan(cost) | np.isneginf(cost))
    if len(bad):
        i, j = bad[0]
        raise ValueError(f"cost[{i}, {j}] is {cost[i, j]}: costs must be numbers or +inf (a forbidden pair)")
    return True


def _solve_pot(cost: np.ndarray):
    """POT's network simplex: ``(col, None)``, or ``(None, why not)``."""
    try:
        import ot  # only the fallback needs POT, which takes over a second to import
    except ImportError:
        return None, "POT is not installed"
    n = cost.shape[0]
    w = np.full(n, 1.0 / n)
    c64 = np.ascontiguousarray(cost, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # POT warns at its iteration limit: its result code says so, checked below
        plan, log = ot.emd(w, w, c64, numItermax=max(100_000, 10 * n * n), log=True)
    if log["result_code"] != 1:
        return None, f"POT did not reach an optimal plan ({log['warning']})"
    col = plan.argmax(1)
    if (plan > 0.5 / n).sum() != n or not np.array_equal(np.sort(col), np.arange(n)):
        return None, "POT's plan is not a permutation"
    v = np.asarray(log["v"], dtype=np.float64)
    u = c64[np.arange(n), col] - v[col]
    if not verify(cost, col, u, v):
        return None, "POT's plan failed its optimality certificate"
    return col.astype(np.int64), None


def _solve_scipy(cost: np.ndarray) -> np.ndarray:
    from scipy.optimize import linear_sum_assignment  # the last resort: imported only when it is used

    return linear_sum_assignment(cost)[1].astype(np.int64)


def _choice() -> str:
    choice = os.environ.get("CFMLIB_ASSIGNMENT", "").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"CFMLIB_ASSIGNMENT must be one of {', '.join(_CHOICES)} (or unset), got {choice!r}")
    return choice


def backend() -> str:
    """The solver :func:`solve` uses for a finite matrix, and why: ``'compiled (avx512)'``,
    ``'pot (the compiled solver ...: reason)'``, ``'scipy (...)'``."""
    choice = _choice()
    if choice in ("pot", "scipy"):
        return f"{choice} (requested by CFMLIB_ASSIGNMENT={choice})"
    solver, reason = _load()
    if solver is not None:
        return f"compiled ({solver.isa()})"
    if choice == "compiled":
        raise RuntimeError(f"CFMLIB_ASSIGNMENT=compiled, but the compiled assignment solver is not available: {reason}")
    try:
        import ot  # noqa: F401

        return f"pot (the compiled solver is not in use: {reason})"
    except ImportError:
        return f"scipy (the compiled solver is not in use: {reason}; POT is not installed)"


def solve(cost) -> np.ndarray:
    r"""Exact minimum-cost assignment (chapter 8): ``col`` with row ``i`` matched to column
    ``col[i]``, minimising :math:`\sum_i C_{i,\mathrm{col}(i)}`; an ``(n,)`` int64 array.

    Args:
        cost: ``(n, n)`` cost matrix, a NumPy array or a torch tensor (any device; float32 and
            float64 are used as they are, other real dtypes as float64). ``+inf`` marks a
            forbidden pair; NaN is an error. An empty ``(0, 0)`` matrix gives an empty result.

    Every result is certified optimal (:func:`verify`) or comes from SciPy; see the module
    docstring for the order of the solvers.
    """
    c = _matrix(cost)
    n = c.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    choice = _choice()
    finite_known = False
    if choice in ("auto", "compiled"):
        solver, reason = _load()
        if solver is None and choice == "compiled":
            raise RuntimeError(f"CFMLIB_ASSIGNMENT=compiled, but the compiled assignment solver is not available: "
                               f"{reason}")
        if solver is not None:
            rc, col, v, _ = solver(c)
            if rc == 0:
                u = c[np.arange(n), col].astype(np.float64) - v[col]
                if verify(c, col, u, v):
                    return col
                reason = f"its plan for a {n} x {n} matrix failed the optimality certificate"
            elif rc == 1:
                raise MemoryError(f"the assignment solver could not allocate its work arrays for n = {n}")
            elif rc == 2:
                finite_known = not _check_finite(c)  # raises for NaN; +inf goes to scipy below
            else:
                reason = f"it failed on a {n} x {n} matrix (code {rc})"
            if rc != 2:
                if choice == "compiled":
                    raise RuntimeError(f"CFMLIB_ASSIGNMENT=compiled, but the compiled assignment solver {reason}")
                _warn_once(f"cfmlib's compiled assignment solver {reason}; POT's (or SciPy's) exact solver is used "
                           f"instead. The plans stay optimal, only slower.")
        else:
            _warn_once(f"cfmlib's compiled assignment solver is not in use: {reason}. POT's (or SciPy's) exact "
                       f"solver is used instead: the same optimal plans, several times slower on large batches.")
    if not finite_known and _check_finite(c):
        return _solve_scipy(c)  # +inf entries: forbidden pairs
    if choice != "scipy":
        col, _ = _solve_pot(c)
        if col is not None:
            return col
    return _solve_scipy(c)
