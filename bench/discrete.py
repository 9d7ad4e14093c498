"""Benchmark: discrete flow matching through cfmlib and Meta's flow_matching (chapter 12).

The same model (cfmlib.discrete.TokenMLP on 8x8 digits quantised to 4 grey levels: 64 tokens) and
the same batch go through both libraries:

* a training step with the generalised-KL loss of a mixture path (linear scheduler, uniform and
  masked source): cfmlib's ``train_step`` with ``PolynomialMixturePath(loss="gkl")`` against
  flow_matching's ``MixtureDiscreteProbPath.sample`` + ``MixturePathGeneralizedKL``, beside a floor
  (the bare forward + backward + Adam step of the model on a fixed noisy batch);
* sampling with Euler jumps: ``cfmlib.discrete.sample`` against ``MixtureDiscreteEulerSolver``,
  per step, beside a floor (the bare forward passes).

Agreement is checked, not assumed: the two losses on identical ``(x1, x_t, t, logits)`` (to float
precision for the uniform source; for the masked source on the masked tokens, because cfmlib counts
an unmasked token, whose value is known, as zero), and the two samplers' outputs on an enumerable
toy (3 tokens of 4 values) driven by the exact posterior, where each one's total-variation distance
to the data and their distance to each other are read against the band of two data draws.
flow_matching jumps with probability ``1 - exp(-h lambda)`` where cfmlib's Euler step uses
``h lambda``, so the two agree in law as the step shrinks, not draw for draw.

    python bench/discrete.py [--rounds R] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import cfmlib  # noqa: E402
from cfmlib import datasets, metrics, training  # noqa: E402
from cfmlib import discrete as D  # noqa: E402

LEVELS, LENGTH = 4, 64


def tokens():
    x, _ = datasets.load_digits()
    return D.quantise(x, LEVELS).flatten(1)


def model(path, seed=0):
    torch.manual_seed(seed)
    return D.TokenMLP(LENGTH, LEVELS, hidden=256, depth=3, mask=path.source == "mask")


def _timed_rounds(contestants: dict, rounds: int, per: dict):
    """Interleaved rounds in a shuffled order (one warm-up run each); seconds per unit, every round."""
    times = {k: [] for k in contestants}
    for fn in contestants.values():
        fn()
    rng = random.Random(0)
    for _ in range(rounds):
        order = list(contestants)
        rng.shuffle(order)
        for k in order:
            t0 = time.perf_counter()
            contestants[k]()
            times[k].append((time.perf_counter() - t0) / per[k])
    return times


def _row(name, ts, floor):
    return (f"| {name} | {min(ts) * 1e3:.2f} ms | {statistics.median(ts) * 1e3:.2f} ms | {max(ts) * 1e3:.2f} ms "
            f"| {min(ts) / min(floor):.2f} |")


# ----------------------------------------------------------------------------- training step
def _fm_path():
    from flow_matching.path import MixtureDiscreteProbPath
    from flow_matching.path.scheduler import PolynomialConvexScheduler
    return MixtureDiscreteProbPath(scheduler=PolynomialConvexScheduler(n=1.0))


def loss_agreement(source: str, n: int = 256) -> float:
    """Largest difference between the two libraries' per-token generalised-KL losses on one batch
    (every token for a uniform source, the masked tokens for a masked one)."""
    from flow_matching.loss import MixturePathGeneralizedKL
    path = D.PolynomialMixturePath(LEVELS, source, loss="gkl")
    data = tokens()
    g = torch.Generator().manual_seed(0)
    x1 = data[torch.randint(0, len(data), (n,), generator=g)]
    x0 = path.draw_x0(x1, g)
    t = torch.rand(n, generator=g) * path.t_max
    xt = path.sample_xt(x0, x1, t)
    with torch.no_grad():
        logits = model(path)(xt, t)
        ours = path.loss(lambda x, s: logits, x0, x1, t)  # the mean over tokens, known tokens as zero
        fm_logits = F.pad(logits, (0, path.num_states - LEVELS), value=-1e9)  # the mask is never data
        theirs = MixturePathGeneralizedKL(_fm_path(), reduction="none")(fm_logits, x1, xt, t)
        if source == "mask":
            theirs = torch.where(xt == path.mask_token, theirs, torch.zeros_like(theirs))
    return abs(float(ours) - float(theirs.mean()))


def make_train_steps(source: str, b: int, steps: int):
    from flow_matching.loss import MixturePathGeneralizedKL
    path = D.PolynomialMixturePath(LEVELS, source, loss="gkl")
    data = tokens()

    def floor_fn():
        net = model(path)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(1)
        x1 = data[torch.randint(0, len(data), (b,), generator=g)]
        t = torch.rand(b, generator=g) * path.t_max
        xt = path.sample_xt(path.draw_x0(x1, g), x1, t)

        def run():
            for _ in range(steps):
                loss = F.cross_entropy(net(xt, t).flatten(0, 1), x1.flatten())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return run

    def ours_fn():
        net = model(path)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        batches = training.Batches(data, b, path=path, generator=torch.Generator().manual_seed(2))

        def run():
            for _ in range(steps):
                training.train_step(net, opt, batches.next(), path, check=False)
        return run

    def fm_fn():
        fm_path, loss_fn = _fm_path(), MixturePathGeneralizedKL(_fm_path())
        net = model(path)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(3)

        def run():
            for _ in range(steps):
                x1 = data[torch.randint(0, len(data), (b,), generator=g)]
                x0 = path.sample_source(x1.shape, generator=g)
                t = torch.rand(b, generator=g) * path.t_max
                s = fm_path.sample(x_0=x0, x_1=x1, t=t)
                logits = net(s.x_t, s.t)
                if source == "mask":
                    logits = F.pad(logits, (0, 1), value=-1e9)
                loss = loss_fn(logits, x1, s.x_t, s.t)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return run
    return {"floor": floor_fn(), "cfmlib": ours_fn(), "flow_matching": fm_fn()}


# ----------------------------------------------------------------------------- sampling
class _Probs(torch.nn.Module):
    """flow_matching's solver reads posterior probabilities over every state; cfmlib's path turns the
    same model's logits into the same posterior (known tokens included)."""

    def __init__(self, net, path):
        super().__init__()
        self.net, self.path = net, path

    def forward(self, x, t, **extras):
        p = self.path.posterior(self.net(x, t), x)
        return F.pad(p, (0, self.path.num_states - self.path.vocab_size))


def make_sampling(source: str, n: int, steps: int):
    from flow_matching.solver import MixtureDiscreteEulerSolver
    path = D.PolynomialMixturePath(LEVELS, source)
    net = model(path).eval().requires_grad_(False)
    x0 = path.sample_source((n, LENGTH), generator=torch.Generator().manual_seed(4))
    t = torch.full((n,), 0.5)
    solver = MixtureDiscreteEulerSolver(model=_Probs(net, path), path=_fm_path(), vocabulary_size=path.num_states)

    @torch.no_grad()
    def floor():
        for _ in range(steps):
            net(x0, t)

    def ours():
        D.sample(net, x0=x0, path=path, steps=steps, generator=torch.Generator().manual_seed(5))

    def theirs():
        solver.sample(x_init=x0.clone(), step_size=1.0 / steps)
    return {"floor": floor, "cfmlib": ours, "flow_matching": theirs}


def sampler_agreement(source: str, n: int = 4000, steps: int = 256, pairs: int = 3, repeats: int = 20):
    """The two samplers driven by the exact posterior of an enumerable toy (x3 = x1 + x2 mod 4 with
    probability 0.85), each drawing ``pairs`` independent sets of ``n`` sequences: TV of each to a data
    sample, TV between the two libraries' sets, and the band of two data draws of ``n``. With 256 steps
    the laws of both samplers are within 0.01 of the data's, well inside the band's spread."""
    from flow_matching.solver import MixtureDiscreteEulerSolver
    path = D.PolynomialMixturePath(LEVELS, source)
    allx = D.enumerate_states(LEVELS, 3)
    good = allx[:, 2] == (allx[:, 0] + allx[:, 1]) % LEVELS
    w = torch.where(good, torch.tensor(0.85 / 16, dtype=torch.float64), torch.tensor(0.15 / 48, dtype=torch.float64))
    exact = D.Marginal(allx, path, w)

    def q(k, generator=None):
        return allx[torch.multinomial(w, k, replacement=True, generator=generator)]

    class Exact(torch.nn.Module):
        def forward(self, x, t, **extras):
            return F.pad(exact.posterior(x, t), (0, path.num_states - LEVELS)).float()

    solver = MixtureDiscreteEulerSolver(model=Exact(), path=_fm_path(), vocabulary_size=path.num_states)
    values = {"cfmlib vs data": [], "flow_matching vs data": [], "cfmlib vs flow_matching": []}
    g = torch.Generator().manual_seed(6)
    for k in range(pairs):
        x0 = path.sample_source((n, 3), generator=g)
        ours = D.sample(exact, x0=x0, path=path, steps=steps, generator=g).x
        torch.manual_seed(7 + k)  # flow_matching draws from the global generator
        theirs = solver.sample(x_init=x0.clone(), step_size=1.0 / steps)
        values["cfmlib vs data"].append(metrics.tv(ours, q(n, g)))
        values["flow_matching vs data"].append(metrics.tv(theirs, q(n, g)))
        values["cfmlib vs flow_matching"].append(metrics.tv(ours, theirs))
    band = metrics.data_band(q, n, metric="tv", repeats=repeats, generator=torch.Generator().manual_seed(8))
    return values, band


# ----------------------------------------------------------------------------- the section
def run(rounds: int = 5) -> str:
    """The discrete section of the benchmark: a markdown table of training-step and per-step sampling
    times through both libraries, and the checks of their agreement."""
    quick = rounds <= 2
    out = []
    agree = {s: loss_agreement(s) for s in D.SOURCES}
    for s, d in agree.items():
        if d > 1e-5:
            raise AssertionError(f"the generalised-KL losses of cfmlib and flow_matching differ by {d:.2e} "
                                 f"({s} source): the benchmark would compare different computations")
    out += ["Largest difference between the two libraries' generalised-KL losses on one batch of 256 digits: "
            + ", ".join(f"{s} source {d:.1e}" for s, d in agree.items()) + " (masked source: masked tokens).", ""]
    b, k = 256, 5 if quick else 20
    out += [f"Training step, batch {b}, TokenMLP (64 tokens, 4 values, hidden 256), generalised-KL loss:", "",
            "| source, contestant | min | median | max | × floor (ratio of minima) |", "|---|---|---|---|---|"]
    for source in D.SOURCES:
        c = make_train_steps(source, b, k)
        times = _timed_rounds(c, rounds, {name: k for name in c})
        for name in ("floor", "cfmlib", "flow_matching"):
            out.append(_row(f"{source}, {name}", times[name], times["floor"]))
    n, steps = (256, 16) if quick else (1000, 64)
    out += ["", f"Sampling {n} sequences with {steps} Euler jumps, time per step:", "",
            "| source, contestant | min | median | max | × floor (one bare forward; ratio of minima) |",
            "|---|---|---|---|---|"]
    for source in D.SOURCES:
        c = make_sampling(source, n, steps)
        times = _timed_rounds(c, rounds, {name: steps for name in c})
        for name in ("floor", "cfmlib", "flow_matching"):
            out.append(_row(f"{source}, {name}", times[name], times["floor"]))
    n_agree, pairs = (1000, 2) if quick else (4000, 3)
    out += ["", f"Agreement of the samplers (exact posterior of a 3-token toy, 256 Euler jumps; TV between sets of "
            f"{n_agree:,} sequences, mean ± sd over {pairs} independent pairs of sets, against the band of two data "
            "draws):", "",
            "| source | band | cfmlib vs data | flow_matching vs data | cfmlib vs flow_matching | verdict |",
            "|---|---|---|---|---|---|"]
    for source in D.SOURCES:
        values, band = sampler_agreement(source, n=n_agree, pairs=pairs, repeats=5 if quick else 20)
        verdicts = {k: band.compare(v) for k, v in values.items()}
        out.append(f"| {source} | {band.mean:.3f} ± {band.std:.3f} ({band.lo:.3f} to {band.hi:.3f}) | "
                   + " | ".join(f"{v.mean:.3f} ± {v.std:.3f}" for v in verdicts.values())
                   + f" | {verdicts['cfmlib vs flow_matching'].verdict} |")
        if verdicts["cfmlib vs flow_matching"].verdict == "worse":
            raise AssertionError(f"cfmlib's and flow_matching's samplers disagree ({source} source): {values}, {band}")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"cfmlib {cfmlib.__version__}, torch {torch.__version__}, {args.threads} threads\n")
    print(run(args.rounds))


if __name__ == "__main__":
    main()
