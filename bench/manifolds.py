"""Benchmark: sampling on the sphere and the flat torus, cfmlib.manifolds against flow_matching's
Riemannian ODE solver, on the same model.

One small model per manifold (a ``cfmlib.manifolds.TangentMLP``, trained briefly with the geodesic path
so that the field is a realistic one) is integrated from the same uniform points by

* ``cfmlib.manifolds.sample`` (projected Euler, midpoint and RK4; geodesic Euler), and
* ``flow_matching.solver.RiemannianODESolver`` (Euler, midpoint and RK4 with ``projx`` and ``proju``),

timed in repeated, interleaved rounds (each round runs every contestant once, in a shuffled order) and
reported as min / median / max milliseconds and as the ratio of the minima to a floor: the same
number of bare forward passes of the model on the same points.  Agreement is the largest geodesic
distance between the two libraries' samples; the error of each is its largest geodesic distance
from a reference solve (cfmlib's RK4 with 400 steps), and "off" is the largest distance of a
sample from the manifold.  flow_matching's RK4 is the 3/8 rule and cfmlib's the classical one, so
those two differ by more than rounding but are equally close to the reference.

    python bench/manifolds.py [--rounds R] [--threads 2]

``run(rounds)`` returns the markdown table (``bench/run.py`` calls it).
"""
from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import cfmlib  # noqa: E402
from cfmlib import manifolds  # noqa: E402

N_SAMPLES = 2_000
STEPS = 50


def _model(kind, seed=0, steps=300):
    """A TangentMLP trained for a few hundred steps on a small mixture of the manifold."""
    torch.manual_seed(seed)
    if kind == "sphere":
        data = manifolds.VonMisesFisherMixture([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]], [20.0, 10.0, 30.0])
    else:
        data = manifolds.WrappedNormalMixture([[-1.1, -0.75], [-1.9, 2.9], [3.1, 3.1]],
                                              torch.eye(2).repeat(3, 1, 1) * 0.12)
    res = cfmlib.train(manifolds.TangentMLP(kind, hidden=128, depth=3), data, path=manifolds.GeodesicPath(kind),
                       steps=steps, batch_size=256, lr=2e-3, seed=seed, progress=False, device="cpu")
    return res.ema.double()  # float64: agreement is then limited by the methods, not by float32 rounding


def _fm_manifold(kind):
    from flow_matching.utils.manifolds import FlatTorus, Sphere
    return Sphere() if kind == "sphere" else FlatTorus()


def _contestants(kind, net, x0, steps):
    from flow_matching.solver import RiemannianODESolver
    from flow_matching.utils import ModelWrapper

    class Wrapped(ModelWrapper):
        def forward(self, x, t, **extras):
            return self.model(x, t)

    fm = RiemannianODESolver(manifold=_fm_manifold(kind), velocity_model=Wrapped(net))
    m = net.manifold
    # flow_matching's flat torus lives on [0, 2 pi): start it from the same points, shifted there
    fm_x0 = x0 if kind == "sphere" else torch.remainder(x0, 2 * math.pi)
    t = torch.zeros(x0.shape[0], dtype=x0.dtype)
    out = {}

    @torch.no_grad()
    def floor(nfe):
        for _ in range(nfe):
            net(x0, t)

    def ours(method, retraction="project"):
        def run():
            out[("cfmlib", method, retraction)] = manifolds.sample(net, x0=x0, method=method, steps=steps,
                                                                   retraction=retraction).x
        return run

    def theirs(method):
        def run():
            with torch.no_grad():
                x = fm.sample(fm_x0, step_size=1.0 / steps, method=method, projx=True, proju=True)
            out[("flow_matching", method, "project")] = m.proj(x)
        return run

    contestants = {
        ("cfmlib", "euler", "exp"): ours("euler", "exp"),
    }
    for method in ("euler", "midpoint", "rk4"):
        contestants[("cfmlib", method, "project")] = ours(method)
        contestants[("flow_matching", method, "project")] = theirs(method)
    nfe = {"euler": steps, "midpoint": 2 * steps, "rk4": 4 * steps}
    floors = {k: (lambda n=n: floor(n)) for k, n in nfe.items()}
    return contestants, floors, nfe, out


def _interleave(contestants, floors, nfe, rounds):
    """Each round: every contestant once in a shuffled order, each preceded by the floor of its NFE."""
    times = {k: [] for k in contestants}
    floor_times = {k: [] for k in floors}
    for k, fn in contestants.items():  # warm-up
        fn()
    rng = random.Random(0)
    for _ in range(rounds):
        order = list(contestants)
        rng.shuffle(order)
        for k in order:
            t0 = time.perf_counter()
            floors[k[1]]()
            floor_times[k[1]].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            contestants[k]()
            times[k].append(time.perf_counter() - t0)
    return times, floor_times


def run(rounds: int = 5) -> str:
    """Time and compare both libraries on the sphere and the torus; return a markdown table."""
    rows = ["| manifold | solver | steps (NFE) | library | ms, min / median / max | min ÷ floor min "
            "| error vs reference | agreement with the other library | off the manifold |",
            "|---|---|---|---|---|---|---|---|---|"]
    for kind in ("sphere", "torus"):
        net = _model(kind)
        m = net.manifold
        x0 = m.uniform(N_SAMPLES, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        ref = manifolds.sample(net, x0=x0, method="rk4", steps=400).x
        contestants, floors, nfe, out = _contestants(kind, net, x0, STEPS)
        times, floor_times = _interleave(contestants, floors, nfe, rounds)
        for key in contestants:
            lib, method, retraction = key
            x = out[key]
            other = ("flow_matching" if lib == "cfmlib" else "cfmlib", method, retraction)
            agree = f"{float(m.dist(x, out[other]).max()):.1e}" if other in out else "—"
            ts = [1e3 * s for s in times[key]]
            ratio = min(times[key]) / min(floor_times[method])
            name = {"project": "projected", "exp": "geodesic (exp map)"}[retraction] + f" {method}"
            rows.append(f"| {kind} | {name} | {STEPS} ({nfe[method]}) | {lib} | {min(ts):.0f} / "
                        f"{statistics.median(ts):.0f} / {max(ts):.0f} | {ratio:.2f} | "
                        f"{float(m.dist(x, ref).max()):.1e} | {agree} | {float(m.off_manifold(x).max()):.0e} |")
    return "\n".join(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{N_SAMPLES} samples, float64, {args.rounds} interleaved rounds, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(run(args.rounds))


if __name__ == "__main__":
    main()
