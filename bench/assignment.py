"""Benchmark: the exact OT plan of one minibatch (chapter 8) -- cfmlib's assignment solver, POT's
``ot.emd`` (what torchcfm calls) and SciPy's ``linear_sum_assignment``.

For each batch size n: squared distances between n points of 8 Gaussians and n points of N(0, I),
float32 as in training (``cfmlib.couplings.sq_cost``). Beside each row, the cost-matrix floor:
the time to build that matrix. Every contestant runs in interleaved rounds (a shuffled order per
round); times are min / median / max over rounds. Every plan is checked: cfmlib's by its dual
certificate (``cfmlib.assignment.verify``, also done inside every ``solve``), POT's by its own
potentials, and every plan's cost against the best one found. SciPy runs only where it finishes
in reasonable time (n <= 1,024), POT once per round up to n = 1,024 and once in all above.

    python bench/assignment.py [--rounds 5] [--sizes 256,1024,4096,8192] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time
import warnings

# as in bench/run.py: idle OpenMP workers wait passively (spinning inflates every torch op on a busy machine)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

SIZES = (256, 1024, 4096, 8192)
SCIPY_MAX = 1024  # scipy needs about 40 s at n = 4,096 on these near-tied costs
POT_ROUNDS_ABOVE = 1024  # above this n, POT (seconds per plan) runs in one round only


def _clouds(n: int, seed: int = 9):
    from cfmlib import datasets

    g = torch.Generator().manual_seed(seed)
    return datasets.get_dataset("8gaussians")(n, generator=g), torch.randn(n, 2, generator=g)


def _time(fn):
    """Wall time and this thread's CPU time (the solvers are single-threaded; on a busy machine the
    CPU time is the steadier figure)."""
    t, c = time.perf_counter(), time.thread_time()
    out = fn()
    return (time.perf_counter() - t, time.thread_time() - c), out


def _pot(c64):
    import ot

    n = c64.shape[0]
    w = np.full(n, 1.0 / n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan, log = ot.emd(w, w, c64, numItermax=max(100_000, 10 * n * n), log=True)
    return plan.argmax(1), log


def measure(n: int, rounds: int) -> dict:
    """Times (s) per contestant and round, and the checks, for one batch size."""
    from scipy.optimize import linear_sum_assignment

    from cfmlib import assignment
    from cfmlib.couplings import sq_cost

    x1, x0 = _clouds(n)
    cost = sq_cost(x1, x0)
    c32 = cost.numpy()
    c64 = c32.astype(np.float64)
    rows = np.arange(n)
    plans, logs, times, cpus = {}, {}, {}, {}
    contestants = {
        "cost matrix (floor)": lambda: sq_cost(x1, x0),
        "cfmlib": lambda: assignment.solve(c32),
        "POT ot.emd": lambda: _pot(c64),
    }
    if n <= SCIPY_MAX:
        contestants["scipy"] = lambda: linear_sum_assignment(c64)[1]
    solver, _ = assignment._load()
    if solver is not None:  # the certificate's share of a cfmlib solve
        rc, col, v, _ = solver(c32)
        u = c64[rows, col] - v[col]
        contestants["cfmlib: certificate alone"] = lambda: assignment.verify(c32, col, u, v)
    for r in range(rounds):
        names = list(contestants)
        random.Random(r).shuffle(names)
        for name in names:
            if name == "POT ot.emd" and n > POT_ROUNDS_ABOVE and r > 0:
                continue
            (dt, cpu), out = _time(contestants[name])
            times.setdefault(name, []).append(dt)
            cpus.setdefault(name, []).append(cpu)
            if name == "POT ot.emd":
                plans[name], logs[name] = out
            elif name in ("cfmlib", "scipy"):
                plans[name] = out
    checks = {}
    costs = {k: float(c64[rows, p].sum()) for k, p in plans.items()}
    best = min(costs.values())
    for k, p in plans.items():
        checks[k] = {"permutation": bool(np.array_equal(np.sort(p), rows)),
                     "best cost": abs(costs[k] - best) <= 1e-9 * best}
    if solver is not None:
        checks["cfmlib"]["certificate"] = bool(assignment.verify(c32, col, u, v)) and np.array_equal(col, plans["cfmlib"])
    log = logs["POT ot.emd"]
    vp = np.asarray(log["v"])
    pcol = plans["POT ot.emd"]
    checks["POT ot.emd"]["optimal status"] = log["result_code"] == 1
    checks["POT ot.emd"]["certificate"] = bool(assignment.verify(c32, pcol, c64[rows, pcol] - vp[pcol], vp))
    return {"times": times, "cpu": cpus, "checks": checks, "cost": best}


def _ms(t):
    return f"{t * 1e3:,.1f} ms" if t < 10 else f"{t:,.1f} s"


def run(rounds: int = 5, *, sizes=SIZES) -> str:
    """Run the benchmark and return its markdown report (one table, then the checks)."""
    from cfmlib import assignment

    import ot  # noqa: F401  imported (and every code path touched once) before anything is timed
    import scipy.optimize  # noqa: F401

    measure(16, 1)
    load_before = [round(x, 2) for x in os.getloadavg()]
    results = {n: measure(n, rounds) for n in sizes}
    load_after = [round(x, 2) for x in os.getloadavg()]
    all_ok = all(all(c.values()) for r in results.values() for c in r["checks"].values())
    lines = [
        f"Exact OT plan of one minibatch (8 Gaussians vs N(0, I), float32 squared distances). "
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads; cfmlib backend: {assignment.backend()}; {rounds} interleaved rounds "
        f"(POT once above n = {POT_ROUNDS_ABOVE:,}); load average before {load_before}, after {load_after}. "
        f"Wall time: median [min, max] over rounds; CPU: median CPU time of the solving thread (the cost "
        f"matrix is built by torch's threads: wall time only); x: wall median over cfmlib's.",
        "",
        "| n | cost matrix (floor) | cfmlib (certificate included) | of which certificate | POT `ot.emd` "
        "| scipy `linear_sum_assignment` |",
        "|---|---|---|---|---|---|",
    ]
    for n, r in results.items():
        t, cpu = r["times"], r["cpu"]
        ref = statistics.median(t["cfmlib"])

        def cell(name, ratio=True, with_cpu=True):
            if name not in t:
                return "not run"
            ts = t[name]
            med = statistics.median(ts)
            spread = f" [{_ms(min(ts))}, {_ms(max(ts))}]" if len(ts) > 1 else " (1 run)"
            return (f"{_ms(med)}{spread}" + (f"; CPU {_ms(statistics.median(cpu[name]))}" if with_cpu else "")
                    + (f" ({med / ref:.1f}x)" if ratio else ""))

        lines.append(f"| {n:,} | {cell('cost matrix (floor)', False, False)} | {cell('cfmlib', False)} "
                     f"| {cell('cfmlib: certificate alone', False)} | {cell('POT ot.emd')} | {cell('scipy')} |")
    lines += ["", f"Every plan verified optimal: {all_ok}."]
    for n, r in results.items():
        for name, c in r["checks"].items():
            lines.append(f"- n = {n:,}, {name}: " + ", ".join(f"{k} {v}" for k, v in c.items()))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(run(args.rounds, sizes=tuple(int(s) for s in args.sizes.split(","))))


if __name__ == "__main__":
    main()
