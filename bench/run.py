"""Benchmark: the same flow-matching workload through cfmlib, torchcfm and flow_matching.

Every figure is measured in repeated, interleaved rounds (each round runs every
contestant once, in a shuffled order) and reported as min / median / max, with
a ratio to a floor measured in the same round: the bare model forward +
backward + Adam step on a fixed batch for training, NFE bare forwards on the
same points for sampling, and NFE evaluations of the field with its exact
divergence for the log-likelihood.  cfmlib appears twice in training: through
``cfmlib.train`` and through a reader's own loop written with the public pieces
(``Batches``, ``cfm_loss``, ``ot_pair``), as Chapters 5, 7 and 8 teach it.
Sections of their own: the exact OT plan alone (bench/assignment.py), discrete
and Riemannian flow matching against flow_matching (bench/discrete.py,
bench/manifolds.py) and the execution time of every chapter (bench/book.py).
The machine's load average is recorded before and after.  Prints markdown
tables, then every target with its measured value and the peers' beside it, and
writes bench/results.json.

    python bench/run.py [--quick] [--rounds R] [--threads 2] [--no-book]
"""
from __future__ import annotations

import argparse
import copy
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
from cfmlib import assignment, couplings, datasets, likelihood, metrics, paths, solvers, training  # noqa: E402
from cfmlib.models import MLP  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


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


def make_public(b, steps, data, coupling):
    """A reader's own loop with the public pieces: ``Batches`` (which solves the next batch's OT
    plan in the background while this step runs) and ``cfm_loss``."""
    m = model()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    path = paths.CondOTPath()
    batches = training.Batches(data, b, path=path, coupling=coupling, generator=torch.Generator().manual_seed(4))

    def run():
        for _ in range(steps):
            x0, x1, t, _ = next(batches)
            loss = training.cfm_loss(m, x0, x1, t, path)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return run


def make_public_plain(b, steps, data, coupling):
    """The loop of Chapter 5 written out: draw, ``ot_pair`` (solved in the step), ``cfm_loss``."""
    m = model()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    path = paths.CondOTPath()
    g = torch.Generator().manual_seed(5)

    def run():
        for _ in range(steps):
            x1 = data(b, generator=g)
            x0 = torch.randn(b, 2, generator=g)
            t = torch.rand(b, generator=g)
            if coupling == "ot":
                x0, x1 = couplings.ot_pair(x0, x1, path=path)
            loss = training.cfm_loss(m, x0, x1, t, path)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return run


def make_torchcfm(b, steps, data, coupling, seed=0):
    from torchcfm.conditional_flow_matching import (ConditionalFlowMatcher,
                                                    ExactOptimalTransportConditionalFlowMatcher)
    fm = ExactOptimalTransportConditionalFlowMatcher(sigma=0.0) if coupling == "ot" else ConditionalFlowMatcher(0.0)
    m = model(seed)  # seeds the global generator too, from which torchcfm draws its times
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(2 + seed)

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
    """Exact log-likelihood of n points, dopri5 at 1e-5, through cfmlib and flow_matching (same model,
    same points, same tolerances), and the floor: NFE evaluations of the field with its exact
    divergence, the work any solver must do, timed without a solver."""
    x1 = datasets.get_dataset("8gaussians")(n, generator=torch.Generator().manual_seed(5))
    from flow_matching.solver import ODESolver
    calls = [0]

    def velocity(x, t):
        calls[0] += 1
        return net(x, t.expand(x.shape[0]))
    solver = ODESolver(velocity_model=velocity)
    res = {}

    def ours():
        out = likelihood.log_prob(net, x1, method="dopri5", atol=1e-5, rtol=1e-5)
        res["cfmlib"], res["nfe"] = out.log_prob, out.nfe

    def fm():
        _, lp = solver.compute_likelihood(x_1=x1, log_p0=lambda x: likelihood.gaussian_log_prob(x),
                                          step_size=None, method="dopri5", atol=1e-5, rtol=1e-5,
                                          exact_divergence=True)
        res["flow_matching"] = lp
    ours()
    fm()
    res["nfe_flow_matching"] = calls[0]
    t_fixed = torch.full((n,), 0.5)
    basis = torch.eye(2).reshape(2, 1, 2).expand(2, n, 2)

    def floor():  # per evaluation: one forward pass and the exact divergence, inline torch autograd
        for _ in range(res["nfe"]):
            x = x1.detach().requires_grad_(True)
            v = net(x, t_fixed)
            (rows,) = torch.autograd.grad(v, x, grad_outputs=basis, is_grads_batched=True)
            torch.einsum("ibi->b", rows)

    times = interleave({"flow_matching": fm, "cfmlib": ours, "floor": floor}, rounds,
                       {"cfmlib": 1, "flow_matching": 1, "floor": 1}, floor="flow_matching")
    # Both solve to the same tolerance along different step sequences (cfmlib's never leave [0, 1]),
    # so they differ by about the tolerance; each is compared with a float64 solve at 1e-10.
    ref = likelihood.log_prob(copy.deepcopy(net).double(), x1.double(), method="dopri5", atol=1e-10,
                              rtol=1e-10).log_prob
    diff = {"between": float((res["cfmlib"] - res["flow_matching"]).abs().max()),
            **{k: float((res[k].double() - ref).abs().max()) for k in ("cfmlib", "flow_matching")}}
    return times, diff, (res["nfe"], res["nfe_flow_matching"])


# ----------------------------------------------------------------------------- quality
def quality(steps, n_eval, data_name="8gaussians", seeds=(0, 1, 2)):
    """W2 of cfmlib's and torchcfm's I-CFM and OT-CFM samples at NFE 2, 4 and 100 (Euler), each
    trained with several seeds, against the band of two data draws of the same size."""
    data = datasets.get_dataset(data_name)
    ref = data(n_eval, generator=torch.Generator().manual_seed(6))
    x0 = torch.randn(n_eval, 2, generator=torch.Generator().manual_seed(7))
    w = {}
    for seed in seeds:
        nets = {}
        for coupling in ("independent", "ot"):
            torch.manual_seed(seed)
            nets[f"cfmlib {coupling}"] = training.train(MLP(dim=2, hidden=256, depth=3), data, coupling=coupling,
                                                        steps=steps, batch_size=256, ema_decay=0.0, device="cpu",
                                                        seed=seed, progress=False).model
            np.random.seed(seed)  # torchcfm's exact OT plan breaks ties with NumPy's generator
            run = make_torchcfm(256, steps, data, coupling, seed=seed)
            run()
            # the trained model lives in the closure: retrieve it
            nets[f"torchcfm {coupling}"] = run.__closure__[[c.cell_contents.__class__.__name__ for c in
                                                            run.__closure__].index("MLP")].cell_contents
        for name, net in nets.items():
            net.eval()
            for nfe in (2, 4, 100):
                x = solvers.sample(net, x0=x0.clone(), method="euler", steps=nfe).x
                w.setdefault(f"{name} nfe{nfe}", []).append(metrics.w2(x, ref))
    band = metrics.data_band(data, n_eval, repeats=10, generator=torch.Generator().manual_seed(8))
    return w, band


def _fmt(v):
    return f"{v['min'] * 1e3:.2f} ms | {v['median'] * 1e3:.2f} ms | {v['max'] * 1e3:.2f} ms"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="few rounds and steps (a smoke test)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-book", action="store_true", help="skip executing every chapter (bench/book.py)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    q = args.quick
    rounds = args.rounds or (2 if q else 5)
    res = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": f"{platform.machine()} {platform.processor()}",
           "cpus": os.cpu_count(), "threads": args.threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
           "torch": torch.__version__, "cfmlib": cfmlib.__version__, "load_before": load(), "rounds": rounds,
           "assignment_backend": assignment.backend()}
    g8, moons = datasets.get_dataset("8gaussians"), datasets.get_dataset("moons")
    out = [f"# cfmlib {cfmlib.__version__} benchmark, {res['date']}", "",
           f"{res['machine']}, {res['cpus']} CPUs, torch {res['torch']} with {args.threads} threads, "
           f"OMP_WAIT_POLICY={res['omp_wait_policy']}; assignment solver: {res['assignment_backend']}; "
           f"load average before {res['load_before']}; {rounds} interleaved rounds.", ""]

    # --- training steps ---------------------------------------------------------------------------
    out += ["## Training step", "",
            "| batch | contestant | min | median | max | × floor: median of paired ratios [min, max] "
            "| × floor: ratio of minima |", "|---|---|---|---|---|---|---|"]
    for b, k in ((256, 10 if q else 40), (1024, 3 if q else 10)):
        c = {"floor": make_floor(b, k),
             "cfmlib I-CFM, reader's loop (Batches + cfm_loss)": make_public(b, k, g8, "independent"),
             "cfmlib OT-CFM, reader's loop (Batches + cfm_loss)": make_public(b, k, g8, "ot"),
             "cfmlib OT-CFM, reader's loop (ot_pair in the step)": make_public_plain(b, k, g8, "ot"),
             "cfmlib I-CFM, train()": make_cfmlib(b, k, g8, "independent"),
             "cfmlib OT-CFM, train()": make_cfmlib(b, k, g8, "ot"),
             "torchcfm OT-CFM": make_torchcfm(b, k, g8, "ot")}
        if b == 256:
            c.update({"plain torch I-CFM (inline)": make_plain(b, k, g8),
                      "cfmlib I-CFM, reader's loop (path.sample by hand)": make_public_plain(b, k, g8, "independent"),
                      "torchcfm I-CFM": make_torchcfm(b, k, g8, "independent"),
                      "flow_matching I-CFM": make_flow_matching(b, k, g8),
                      "cfmlib I-CFM, train() (moons)": make_cfmlib(b, k, moons, "independent")})
        s = summary(interleave(c, rounds, {name: k for name in c}), "floor")
        res[f"train_b{b}"] = s
        for name, v in s.items():
            out.append(f"| {b} | {name} | {_fmt(v)} | {v['ratio_median']:.2f} [{v['ratio_min']:.2f}, "
                       f"{v['ratio_max']:.2f}] | {v['ratio_of_minima']:.2f} |")

    # --- sampling -------------------------------------------------------------------------------------
    net = model()
    training.train(net, g8, steps=30 if q else 300, batch_size=256, ema_decay=0.0, device="cpu", progress=False)
    net.eval().requires_grad_(False)
    n_samp = 1000 if q else 10_000
    sc = make_sampling(net, n_samp, 100)
    # contestants differ by a few per cent at most: more rounds than the other figures
    res["sampling"] = summary(interleave(sc, rounds if q else max(rounds, 9), {k: 1 for k in sc}), "floor")
    out += ["", f"## Sampling: {n_samp:,} samples, 100 Euler steps", "",
            "| contestant | min | median | max | × floor (100 bare forwards): median [min, max] | ratio of minima |",
            "|---|---|---|---|---|---|"]
    for name, v in res["sampling"].items():
        out.append(f"| {name} | {_fmt(v)} | {v['ratio_median']:.2f} [{v['ratio_min']:.2f}, {v['ratio_max']:.2f}] "
                   f"| {v['ratio_of_minima']:.2f} |")

    # --- likelihood -----------------------------------------------------------------------------------
    net.requires_grad_(True)
    lt, diff, lnfe = likelihood_compare(net, 1000, 2 if q else 5)
    res["likelihood"], res["likelihood_max_abs_diff"], res["likelihood_nfe"] = summary(lt, "flow_matching"), diff, lnfe
    out += ["", f"## Exact log-likelihood: 1,000 points, dopri5 at 1e-5 ({lnfe[0]} field evaluations in cfmlib, "
            f"{lnfe[1]} in flow_matching)", "",
            "| contestant | min | median | max | × flow_matching: median [min, max] | ratio of minima |",
            "|---|---|---|---|---|---|"]
    for name, v in res["likelihood"].items():
        out.append(f"| {name} | {_fmt(v)} | {v['ratio_median']:.2f} [{v['ratio_min']:.2f}, {v['ratio_max']:.2f}] "
                   f"| {v['ratio_of_minima']:.2f} |")
    out.append(f"\nLargest difference between the two libraries' log-likelihoods: {diff['between']:.1e} nats; "
               f"largest error against a float64 solve at 1e-10: cfmlib {diff['cfmlib']:.1e}, "
               f"flow_matching {diff['flow_matching']:.1e} nats.")

    # --- the coupling alone, discrete and Riemannian flow matching -------------------------------------
    import assignment as bench_assignment
    sizes = (256, 1024) if q else (256, 1024, 4096, 8192)
    out += ["", "## Exact OT plan of one minibatch", "", bench_assignment.run(2 if q else rounds, sizes=sizes)]
    ot4096 = bench_assignment.measure(4096, 1 if q else 3)
    res["ot_4096_ms"] = 1e3 * statistics.median(ot4096["times"]["cfmlib"])
    res["ot_4096_floor_ms"] = 1e3 * statistics.median(ot4096["times"]["cost matrix (floor)"])
    for section, module in (("Discrete flow matching", "discrete"), ("Flow matching on manifolds", "manifolds")):
        try:
            mod = __import__(module)
        except ImportError:
            continue
        out += ["", f"## {section}", "", mod.run(2 if q else rounds)]

    # --- quality ------------------------------------------------------------------------------------------
    w, band = quality(60 if q else 800, 500 if q else 1000, seeds=(0,) if q else (0, 1, 2))
    res["quality_w2"], res["quality_band"] = w, band.values
    out += ["", f"## Sample quality: W2 to {band.n} data points (8 Gaussians), Euler, over training seeds", "",
            str(band), "", "| model, NFE | W2: mean ± sd over seeds | against the band |", "|---|---|---|"]
    for name, values in w.items():
        v = band.compare(values)
        out.append(f"| {name} | {v.mean:.3f} ± {v.std:.3f} | {v.verdict} |")
    for nfe in (2, 4):
        cmp_ = metrics.compare_runs(w[f"cfmlib ot nfe{nfe}"], w[f"cfmlib independent nfe{nfe}"], names=("OT", "I-CFM"))
        out.append(f"\nNFE {nfe}, cfmlib OT-CFM against I-CFM: {cmp_}")

    # --- the book -------------------------------------------------------------------------------------------
    book = None
    if not args.no_book and not q:
        import book as bench_book
        table, book = bench_book.run()
        res["book_seconds"] = book
        out += ["", "## Executing the book (each chapter in a fresh kernel)", "", table]
    res["load_after"] = load()

    # --- targets --------------------------------------------------------------------------------------------
    s256, s1024, L = res["train_b256"], res["train_b1024"], res["likelihood"]
    pub_i, pub_ot = "cfmlib I-CFM, reader's loop (Batches + cfm_loss)", "cfmlib OT-CFM, reader's loop (Batches + cfm_loss)"
    rows = [
        ("I-CFM step in a reader's loop ÷ floor, batch 256", "≤ 1.10", s256[pub_i]["ratio_median"],
         s256[pub_i]["ratio_median"] <= 1.10,
         f"inline torch {s256['plain torch I-CFM (inline)']['ratio_median']:.2f}, torchcfm "
         f"{s256['torchcfm I-CFM']['ratio_median']:.2f}, flow_matching {s256['flow_matching I-CFM']['ratio_median']:.2f}"),
    ]
    for b, s_, limit in ((256, s256, 1.3), (1024, s1024, 1.6)):
        r = s_[pub_ot]["ratio_median"] / s_[pub_i]["ratio_median"]
        rows.append((f"OT-CFM ÷ I-CFM step in a reader's loop, batch {b}", f"≤ {limit}", r, r <= limit,
                     f"torchcfm OT-CFM ÷ cfmlib I-CFM {s_['torchcfm OT-CFM']['ratio_median'] / s_[pub_i]['ratio_median']:.2f}"))
    rows.append(("exact OT plan, n = 4,096 (ms, certificate included)", "≤ 200", res["ot_4096_ms"],
                 res["ot_4096_ms"] <= 200, f"cost matrix alone {res['ot_4096_floor_ms']:.0f} ms; POT and scipy above"))
    lr = L["cfmlib"]["ratio_median"]
    floor_ratio = L["floor"]["median"] / L["flow_matching"]["median"]
    within = L["cfmlib"]["median"] / L["floor"]["median"]
    rows.append((f"log-likelihood ÷ flow_matching's time, NFE {lnfe[0]} / {lnfe[1]}", "≤ 0.5, or within 10 % of the floor", lr,
                 lr <= 0.5 or within <= 1.10,
                 f"floor (NFE evaluations with divergence) {floor_ratio:.2f} of flow_matching's time; cfmlib "
                 f"{within:.2f} × floor; errors vs a 1e-10 solve {diff['cfmlib']:.1e} (cfmlib), {diff['flow_matching']:.1e} (flow_matching)"))
    if book:
        total, worst = sum(book.values()), max(book.values())
        rows.append(("whole book (min)", "≤ 10", total / 60, total <= 600, f"{len(book)} chapters"))
        rows.append(("slowest chapter (s)", "≤ 60", worst, worst <= 60, max(book, key=book.get)))
    res["targets"] = [dict(figure=r[0], target=r[1], value=r[2], met=r[3], beside=r[4]) for r in rows]
    out += ["", "## Targets", "", "| figure | target | cfmlib | met | beside it |", "|---|---|---|---|---|"]
    out += [f"| {f} | {t} | {v:.2f} | {'yes' if m else 'NO'} | {b} |" for f, t, v, m, b in rows]
    out.append(f"\nload average after: {res['load_after']}")
    print("\n".join(out))
    (HERE / "results.json").write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
