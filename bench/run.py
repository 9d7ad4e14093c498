"""Benchmark: the same flow-matching workload through cfmlib, torchcfm and flow_matching.

Every figure is measured in repeated, interleaved rounds (each round runs every
contestant once, in a shuffled order) and reported as min / median / max, with
a ratio to a floor measured in the same round: the bare model forward +
backward + Adam step on a fixed batch for training, and NFE bare forwards on
the same points for sampling.  The machine's load average is recorded before
and after.  Prints one markdown table and writes bench/results.json.

    python bench/run.py [--quick] [--rounds R] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

# Idle OpenMP workers spin by default; on a shared (oversubscribed) machine that
# inflates every torch op. Passive waiting affects all contestants alike.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import cfmlib  # noqa: E402
from cfmlib import datasets, likelihood, metrics, solvers, training  # noqa: E402
from cfmlib.models import MLP  # noqa: E402

HERE = Path(__file__).resolve().parent


def model(seed=0):
    torch.manual_seed(seed)
    return MLP(dim=2, hidden=256, depth=3, time_features=0)


def load():
    return [round(x, 2) for x in os.getloadavg()]


# ----------------------------------------------------------------------------- train steps
def _fixed_batch(b, g):
    return torch.randn(b, 2, generator=g), torch.rand(b, generator=g), torch.randn(b, 2, generator=g)


def make_floor(b, steps):
    m = model()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    x, t, u = _fixed_batch(b, torch.Generator().manual_seed(0))

    def run():
        for _ in range(steps):
            loss = (m(x, t) - u).pow(2).sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return run


def make_plain(b, steps, data):
    m = model()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)

    def run():
        for _ in range(steps):
            x1 = data(b, generator=g)
            x0 = torch.randn(b, 2, generator=g)
            t = torch.rand(b, generator=g)
            xt = t[:, None] * x1 + (1 - t[:, None]) * x0
            loss = (m(xt, t) - (x1 - x0)).pow(2).sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return run


def make_cfmlib(b, steps, data, coupling):
    seed = [0]

    def run():
        seed[0] += 1
        training.train(model(), data, coupling=coupling, steps=steps, batch_size=b, lr=1e-3, ema_decay=0.0,
                       device="cpu", seed=seed[0], progress=False)
    return run


def make_torchcfm(b, steps, data, coupling):
    from torchcfm.conditional_flow_matching import (ConditionalFlowMatcher,
                                                    ExactOptimalTransportConditionalFlowMatcher)
    fm = ExactOptimalTransportConditionalFlowMatcher(sigma=0.0) if coupling == "ot" else ConditionalFlowMatcher(0.0)
    m = model()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(2)

    def run():
        for _ in range(steps):
            x1 = data(b, generator=g)
            x0 = torch.randn(b, 2, generator=g)
            t, xt, ut = fm.sample_location_and_conditional_flow(x0, x1)
            loss = (m(xt, t) - ut).pow(2).sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return run


def make_flow_matching(b, steps, data):
    from flow_matching.path import AffineProbPath
    from flow_matching.path.scheduler import CondOTScheduler
    path = AffineProbPath(scheduler=CondOTScheduler())
    m = model()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(3)

    def run():
        for _ in range(steps):
            x1 = data(b, generator=g)
            x0 = torch.randn(b, 2, generator=g)
            t = torch.rand(b, generator=g)
            s = path.sample(x_0=x0, x_1=x1, t=t)
            loss = (m(s.x_t, s.t) - s.dx_t).pow(2).sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return run


def interleave(contestants: dict, rounds: int, per: dict, floor: str | None = "floor"):
    """Repeated, interleaved timing: each round runs every contestant once in a shuffled order, with
    the floor run between consecutive contestants (F A F B F C F ...), so that every contestant
    has a floor measured just before and just after it. Returns seconds per unit
    (``per[name]`` units a run) and, per contestant, the ratio to the mean of its adjacent floors."""
    times = {k: [] for k in contestants}
    paired = {k: [] for k in contestants}
    for fn in contestants.values():  # warm-up
        fn()
    rng = random.Random(0)

    def timed(k):
        t0 = time.perf_counter()
        contestants[k]()
        dt = (time.perf_counter() - t0) / per[k]
        times[k].append(dt)
        return dt

    for _ in range(rounds):
        order = [k for k in contestants if k != floor]
        rng.shuffle(order)
        if floor is None:
            for k in order:
                timed(k)
            continue
        before = timed(floor)
        for k in order:
            dt = timed(k)
            after = timed(floor)
            paired[k].append(dt / (0.5 * (before + after)))
            before = after
    return times, paired


def summary(timed, floor_key):
    """min / median / max seconds, the median (min, max) of the paired ratios to the floor, and the
    ratio of the minima (noise on a shared machine only ever adds time, so minima are the most
    stable estimate)."""
    times, paired = timed
    out = {}
    for k, ts in times.items():
        r = paired.get(k) or [1.0]
        out[k] = dict(min=min(ts), median=statistics.median(ts), max=max(ts), ratio_median=statistics.median(r),
                      ratio_min=min(r), ratio_max=max(r), ratio_of_minima=min(ts) / min(times[floor_key]))
    return out


# ----------------------------------------------------------------------------- sampling
def make_sampling(net, n, nfe):
    x0 = torch.randn(n, 2, generator=torch.Generator().manual_seed(4))
    t = torch.zeros(n)

    @torch.no_grad()
    def floor():
        for _ in range(nfe):
            net(x0, t)

    def ours():
        solvers.sample(net, x0=x0.clone(), method="euler", steps=nfe)

    def tdiffeq():
        import torchdiffeq
        with torch.no_grad():
            torchdiffeq.odeint(lambda tt, x: net(x, tt.expand(x.shape[0])), x0,
                               torch.tensor([0.0, 1.0]), method="euler", options={"step_size": 1.0 / nfe})

    def fmatch():
        from flow_matching.solver import ODESolver
        ODESolver(velocity_model=lambda x, t: net(x, t.expand(x.shape[0]))).sample(
            x_init=x0, step_size=1.0 / nfe, method="euler")
    return {"floor": floor, "cfmlib": ours, "torchdiffeq": tdiffeq, "flow_matching": fmatch}


# ----------------------------------------------------------------------------- likelihood
def likelihood_compare(net, n, rounds):
    x1 = datasets.get_dataset("8gaussians")(n, generator=torch.Generator().manual_seed(5))
    from flow_matching.solver import ODESolver
    solver = ODESolver(velocity_model=lambda x, t: net(x, t.expand(x.shape[0])))
    res = {}

    def ours():
        res["cfmlib"] = likelihood.log_prob(net, x1, method="dopri5", atol=1e-5, rtol=1e-5).log_prob

    def fm():
        _, lp = solver.compute_likelihood(x_1=x1, log_p0=lambda x: likelihood.gaussian_log_prob(x),
                                          step_size=None, method="dopri5", atol=1e-5, rtol=1e-5,
                                          exact_divergence=True)
        res["flow_matching"] = lp
    times = interleave({"flow_matching": fm, "cfmlib": ours}, rounds, {"cfmlib": 1, "flow_matching": 1},
                       floor="flow_matching")
    diff = float((res["cfmlib"] - res["flow_matching"]).abs().max())
    return times, diff


# ----------------------------------------------------------------------------- the coupling alone
def assignment_compare(sizes, rounds):
    """The exact OT plan of one minibatch (8 Gaussians vs N(0, I), squared distances, float32 as in
    training): cfmlib's solver, scipy's ``linear_sum_assignment`` and POT's ``ot.emd`` (what torchcfm
    calls), interleaved; every solver's plan must have the same (optimal) cost."""
    import ot
    from scipy.optimize import linear_sum_assignment

    from cfmlib._assignment import assignment
    from cfmlib.couplings import sq_cost
    out = {}
    for n in sizes:
        g = torch.Generator().manual_seed(9)
        cost = sq_cost(datasets.get_dataset("8gaussians")(n, generator=g), torch.randn(n, 2, generator=g))
        c32, c64 = cost.numpy(), cost.double().numpy()
        w = np.full(n, 1.0 / n)
        plans = {}
        contestants = {"cfmlib": lambda: plans.__setitem__("cfmlib", assignment(c32)),
                       "POT ot.emd (torchcfm)": lambda: plans.__setitem__(
                           "POT ot.emd (torchcfm)", ot.emd(w, w, c64, numItermax=10 ** 8).argmax(1))}
        if n <= 1024:  # scipy needs over a minute at n = 4096
            contestants["scipy"] = lambda: plans.__setitem__("scipy", linear_sum_assignment(c64)[1])
        times, _ = interleave(contestants, rounds if n <= 1024 else 1, {k: 1 for k in contestants}, floor=None)
        costs = {k: float(c64[np.arange(n), p].sum()) for k, p in plans.items()}
        best = min(costs.values())
        if abs(costs["cfmlib"] - best) > 1e-9 * best:  # a fast wrong plan would make the timing meaningless
            raise AssertionError(f"cfmlib's plan at n={n} costs {costs['cfmlib']}, the best plan {best}")
        out[n] = {k: dict(min=min(t), median=statistics.median(t), max=max(t), cost=costs[k],
                          optimal=abs(costs[k] - best) <= 1e-9 * best) for k, t in times.items()}
    return out


# ----------------------------------------------------------------------------- quality
def quality(steps, n_eval, data_name="8gaussians"):
    data = datasets.get_dataset(data_name)
    ref = data(n_eval, generator=torch.Generator().manual_seed(6))
    x0 = torch.randn(n_eval, 2, generator=torch.Generator().manual_seed(7))
    nets = {}
    for coupling in ("independent", "ot"):
        nets[f"cfmlib {coupling}"] = training.train(model(), data, coupling=coupling, steps=steps, batch_size=256,
                                                    ema_decay=0.0, device="cpu", seed=0, progress=False).model
        torch.manual_seed(0)
        np.random.seed(0)
        run = make_torchcfm(256, steps, data, coupling)
        run()
        # the trained model lives in the closure: retrieve it
        nets[f"torchcfm {coupling}"] = run.__closure__[[c.cell_contents.__class__.__name__ for c in
                                                        run.__closure__].index("MLP")].cell_contents
    out = {}
    for name, net in nets.items():
        net.eval()
        for nfe in (2, 4, 100):
            x = solvers.sample(net, x0=x0.clone(), method="euler", steps=nfe).x
            out[f"{name} nfe{nfe}"] = metrics.w2(x, ref)
    out["noise floor (two data draws)"] = metrics.w2(data(n_eval, generator=torch.Generator().manual_seed(8)), ref)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="few rounds and steps (a smoke test)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    q = args.quick
    rounds = args.rounds or (2 if q else 5)
    res = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": f"{platform.machine()} {platform.processor()}",
           "cpus": os.cpu_count(), "threads": args.threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
           "torch": torch.__version__, "cfmlib": cfmlib.__version__, "load_before": load(), "rounds": rounds}
    from cfmlib import _assignment
    res["assignment_backend"] = _assignment.backend()
    g8, moons = datasets.get_dataset("8gaussians"), datasets.get_dataset("moons")

    rows = []
    for b, k in ((256, 10 if q else 40), (1024, 3 if q else 10)):
        c = {"floor": make_floor(b, k), "cfmlib I-CFM": make_cfmlib(b, k, g8, "independent"),
             "cfmlib OT-CFM": make_cfmlib(b, k, g8, "ot"), "torchcfm OT-CFM": make_torchcfm(b, k, g8, "ot")}
        if b == 256:
            c.update({"plain torch I-CFM": make_plain(b, k, g8), "torchcfm I-CFM": make_torchcfm(b, k, g8, "independent"),
                      "flow_matching I-CFM": make_flow_matching(b, k, g8),
                      "cfmlib I-CFM (moons)": make_cfmlib(b, k, moons, "independent")})
        times = interleave(c, rounds, {name: k for name in c})
        s = summary(times, "floor")
        res[f"train_b{b}"] = s
        ot = {}
        for num, den in (("cfmlib OT-CFM", "cfmlib I-CFM"), ("torchcfm OT-CFM", "cfmlib I-CFM"),
                         ("torchcfm OT-CFM", "torchcfm I-CFM")):
            if num in s and den in s:
                ot[f"{num} / {den}"] = dict(ratio_median=s[num]["ratio_median"] / s[den]["ratio_median"],
                                            ratio_of_minima=s[num]["min"] / s[den]["min"])
        res[f"train_b{b}_ot_over_icfm"] = ot
        for name, v in s.items():
            rows.append((f"train step, batch {b}", name, v, "floor"))

    net = model()
    training.train(net, g8, steps=30 if q else 300, batch_size=256, ema_decay=0.0, device="cpu", progress=False)
    net.eval().requires_grad_(False)
    sc = make_sampling(net, 1000 if q else 10_000, 100)
    # each round: 10k x 100 forwards per contestant; contestants differ by a few per cent at most, so
    # this figure gets more rounds than the others (its run-to-run noise is larger than the gaps)
    times = interleave(sc, rounds if q else max(rounds, 9), {k: 1 for k in sc})
    res["sampling_10k_euler100"] = summary(times, "floor")
    for name, v in res["sampling_10k_euler100"].items():
        rows.append((f"{1000 if q else 10_000} samples, 100 Euler steps", name, v, "floor"))

    net.requires_grad_(True)
    lt, diff = likelihood_compare(net, 1000, 2 if q else 3)
    res["likelihood_1000_dopri5"] = summary(lt, "flow_matching")
    res["likelihood_max_abs_diff"] = diff
    for name, v in res["likelihood_1000_dopri5"].items():
        rows.append(("log-likelihood, 1000 points, dopri5 1e-5", name, v, "flow_matching"))

    res["assignment"] = assignment_compare((256, 1024) if q else (256, 1024, 4096), 2 if q else 3)
    res["quality_w2"] = quality(60 if q else 800, 500 if q else 1000)
    res["load_after"] = load()

    print(f"\nload average before {res['load_before']}, after {res['load_after']}; "
          f"{res['threads']} torch threads, OMP_WAIT_POLICY={res['omp_wait_policy']}, {rounds} interleaved rounds "
          f"({rounds if q else max(rounds, 9)} for sampling); "
          f"assignment: {res['assignment_backend']}\n")
    print("| figure | contestant | min | median | max | × reference: median of paired ratios [min, max] "
          "| × reference: ratio of minima | reference |")
    print("|---|---|---|---|---|---|---|---|")
    for fig, name, v, ref in rows:
        print(f"| {fig} | {name} | {v['min'] * 1e3:.2f} ms | {v['median'] * 1e3:.2f} ms | {v['max'] * 1e3:.2f} ms "
              f"| {v['ratio_median']:.2f} [{v['ratio_min']:.2f}, {v['ratio_max']:.2f}] | {v['ratio_of_minima']:.2f} "
              f"| {ref} |")
    for b in (256, 1024):
        for name, r in res[f"train_b{b}_ot_over_icfm"].items():
            print(f"| OT ÷ I-CFM train step, batch {b} | {name} | | | | {r['ratio_median']:.2f} "
                  f"| {r['ratio_of_minima']:.2f} | |")
    print(f"| log-likelihood values | max abs diff cfmlib vs flow_matching | | | | {diff:.1e} | |")
    for n, r in res["assignment"].items():
        ref = r["cfmlib"]["min"]
        for name, v in r.items():
            print(f"| exact OT plan alone, n = {n} | {name} | {v['min'] * 1e3:.2f} ms | {v['median'] * 1e3:.2f} ms "
                  f"| {v['max'] * 1e3:.2f} ms | | {v['min'] / ref:.2f} (× cfmlib) | optimal cost: {v['optimal']} |")
    for name, w in res["quality_w2"].items():
        print(f"| W2 to data (8 Gaussians) | {name} | | {w:.3f} | | | |")
    (HERE / "results.json").write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
