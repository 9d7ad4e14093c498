r"""An exact linear assignment solver for minibatch OT couplings (chapter 8).

:func:`assignment` returns, for a square cost matrix ``C`` (``n x n``), a
permutation ``col`` minimising :math:`\sum_i C_{i, \mathrm{col}(i)}`, the same
optimum as :func:`scipy.optimize.linear_sum_assignment`.

Why not simply scipy: its shortest-augmenting-path solver starts from zero
column potentials, and on the cost matrices of flow matching (squared
distances between nearby 2D points, many near ties) every augmenting search
then wanders over much of the matrix.  Here the same exact method (shortest
augmenting paths with Dijkstra on reduced costs, Jonker and Volgenant, 1987)
starts from column potentials found by a few rounds of Bertsekas' auction with
:math:`\varepsilon`-scaling (1988).  The auction is only a warm start: the
augmenting-path phase alone decides the assignment and is exact for any
starting potentials, so the result is optimal whatever the auction did.

The solver is a small C routine compiled on first use with the system C
compiler into a per-user cache directory and called through :mod:`ctypes`
(which releases the GIL, so a coupling can be computed in a background thread
while the model trains).  Where no compiler is available, or with the
environment variable ``CFMLIB_ASSIGNMENT=scipy``, scipy's solver is used;
both give an optimal assignment.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

__all__ = ["assignment", "backend"]

_SOURCE = r"""
#include <stdlib.h>
#include <math.h>

/* Forward auction (Gauss-Seidel) with epsilon scaling on min-cost form: row i
   bids for the column j minimising c[i][j] + p[j]. Only a warm start: stops at
   eps_final or after max_bids bids. */
static void auction(const double *c, int n, double *p, int *owner, int *stack,
                    double eps0, double eps_final, long max_bids) {
    long bids = 0;
    for (double eps = eps0; eps >= eps_final && bids < max_bids; eps /= 6.0) {
        int top = 0;
        for (int j = 0; j < n; j++) owner[j] = -1;
        for (int i = n - 1; i >= 0; i--) stack[top++] = i;
        while (top > 0 && bids < max_bids) {
            int i = stack[--top];
            const double *ci = c + (long)i * n;
            double w1 = INFINITY, w2 = INFINITY;
            int j1 = 0;
            for (int j = 0; j < n; j++) {
                double w = ci[j] + p[j];
                if (w < w1) { w2 = w1; w1 = w; j1 = j; }
                else if (w < w2) { w2 = w; }
            }
            p[j1] += (w2 - w1) + eps;
            if (owner[j1] >= 0) stack[top++] = owner[j1];
            owner[j1] = i;
            bids++;
        }
    }
}

/* Exact: shortest augmenting paths (Dijkstra on reduced costs c[i][j] - v[j]).
   rowsol[i] = column of row i. Returns 0 on success. */
int cfm_assign(const double *c, int n, int *rowsol, double eps0, double eps_final, long max_bids) {
    double *v = malloc(sizeof(double) * n), *d = malloc(sizeof(double) * n);
    int *colsol = malloc(sizeof(int) * n), *pred = malloc(sizeof(int) * n);
    int *scanned = malloc(sizeof(int) * n), *todo = malloc(sizeof(int) * n);
    if (!v || !d || !colsol || !pred || !scanned || !todo) {
        free(v); free(d); free(colsol); free(pred); free(scanned); free(todo);
        return 1;
    }
    for (int j = 0; j < n; j++) { v[j] = 0.0; colsol[j] = -1; }
    for (int i = 0; i < n; i++) rowsol[i] = -1;
    if (n > 1 && max_bids > 0) {
        auction(c, n, v, colsol, scanned, eps0, eps_final, max_bids);
        for (int j = 0; j < n; j++) v[j] = -v[j];
        /* keep the auction's pairs whose edge can be made tight: d[i] = min_j c[i][j] - v[j];
           raise v of each owned column to make its edge tight, then drop pairs no longer tight */
        for (int i = 0; i < n; i++) {
            const double *ci = c + (long)i * n;
            double m = INFINITY;
            for (int j = 0; j < n; j++) { double w = ci[j] - v[j]; if (w < m) m = w; }
            d[i] = m;
        }
        for (int j = 0; j < n; j++) if (colsol[j] >= 0) { int i = colsol[j]; v[j] = c[(long)i * n + j] - d[i]; }
        for (int j = 0; j < n; j++) if (colsol[j] >= 0) rowsol[colsol[j]] = j;
        for (int i = 0; i < n; i++) {
            if (rowsol[i] < 0) continue;
            const double *ci = c + (long)i * n;
            double m = INFINITY;
            for (int j = 0; j < n; j++) { double w = ci[j] - v[j]; if (w < m) m = w; }
            if (ci[rowsol[i]] - v[rowsol[i]] > m) { colsol[rowsol[i]] = -1; rowsol[i] = -1; }
        }
    }
    for (int f = 0; f < n; f++) {
        if (rowsol[f] >= 0) continue;
        const double *cf = c + (long)f * n;
        int ntodo = n, nscan = 0, jend = -1;
        double dmin = 0.0;
        for (int j = 0; j < n; j++) { d[j] = cf[j] - v[j]; pred[j] = f; todo[j] = j; }
        for (;;) {
            /* the closest unscanned column, a free one among ties */
            int k = 0;
            double best = d[todo[0]];
            for (int q = 1; q < ntodo; q++) {
                int j = todo[q];
                if (d[j] < best || (d[j] == best && colsol[j] < 0 && colsol[todo[k]] >= 0)) { best = d[j]; k = q; }
            }
            int js = todo[k];
            todo[k] = todo[--ntodo];
            scanned[nscan++] = js;
            dmin = best;
            if (colsol[js] < 0) { jend = js; break; }
            int i = colsol[js];
            const double *ci = c + (long)i * n;
            double h = ci[js] - v[js] - dmin;
            for (int q = 0; q < ntodo; q++) {
                int j = todo[q];
                double nd = ci[j] - v[j] - h;
                if (nd < d[j]) { d[j] = nd; pred[j] = i; }
            }
        }
        for (int q = 0; q < nscan; q++) { int j = scanned[q]; v[j] += d[j] - dmin; }
        for (int j = jend;;) {
            int i = pred[j];
            colsol[j] = i;
            int prev = rowsol[i];
            rowsol[i] = j;
            if (i == f) break;
            j = prev;
        }
    }
    free(v); free(d); free(colsol); free(pred); free(scanned); free(todo);
    return 0;
}
"""

_lock = threading.Lock()
_lib = None
_tried = False


def _cache_dir() -> Path:
    root = os.environ.get("CFMLIB_CACHE") or os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(root) / "cfmlib"


def _load():
    """Compile (once, cached by the source's hash) and load the C solver; ``None`` when impossible."""
    global _lib, _tried
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("CFMLIB_ASSIGNMENT", "").lower() == "scipy":
            return None
        tag = hashlib.sha256(_SOURCE.encode()).hexdigest()[:16]
        for folder in (_cache_dir(), Path(tempfile.gettempdir()) / f"cfmlib-{os.getuid() if hasattr(os, 'getuid') else 0}"):
            so = folder / f"assign_{tag}.so"
            try:
                if not so.exists():
                    folder.mkdir(parents=True, exist_ok=True)
                    with tempfile.TemporaryDirectory(dir=folder) as tmp:
                        src = Path(tmp) / "assign.c"
                        src.write_text(_SOURCE)
                        out = Path(tmp) / "assign.so"
                        cc = os.environ.get("CC", "cc")
                        subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(out), str(src), "-lm"],
                                       check=True, capture_output=True, timeout=120)
                        os.replace(out, so)  # atomic: concurrent first uses do not see a half-written file
                lib = ctypes.CDLL(str(so))
                fn = lib.cfm_assign
                fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_double, ctypes.c_double,
                               ctypes.c_long]
                fn.restype = ctypes.c_int
                _lib = fn
                return _lib
            except (OSError, subprocess.SubprocessError):
                continue
        return None


def backend() -> str:
    """``'compiled'`` when the C solver is in use, else ``'scipy'``."""
    return "compiled" if _load() is not None else "scipy"


def assignment(cost: np.ndarray, warm_start: bool = True) -> np.ndarray:
    """Exact minimum-cost assignment of a square float cost matrix: ``col`` with row ``i`` matched to
    column ``col[i]``, an ``(n,)`` int64 array. Non-finite costs are not allowed."""
    cost = np.ascontiguousarray(cost, dtype=np.float64)
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1]:
        raise ValueError(f"cost must be a square matrix, got shape {cost.shape}")
    n = cost.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    fn = _load()
    if fn is None or not np.isfinite(cost).all():
        from scipy.optimize import linear_sum_assignment

        return linear_sum_assignment(cost)[1].astype(np.int64)
    # shift so that the smallest cost is 0 (the optimum is unchanged; the auction's scale is the range)
    cost = cost - cost.min()
    span = float(cost.max())
    rowsol = np.empty(n, dtype=np.int32)
    eps0 = span / 4 if span > 0 else 1.0
    eps_final = span * 1e-4  # tuned on 2D minibatches: smaller costs more bids than it saves later
    max_bids = 50 * n * n if warm_start else 0
    if fn(cost.ctypes.data, n, rowsol.ctypes.data, eps0, eps_final, max_bids) != 0:
        raise MemoryError("the assignment solver could not allocate its work arrays")
    return rowsol.astype(np.int64)
