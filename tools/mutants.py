"""Do the unit tests notice when cfmlib is wrong?  Break it on purpose and see.

Each *mutant* below is one small, plausible mistake in cfmlib (a sign, a factor, a forgotten
step, a swapped argument).  For every mutant this script copies the repository (without its
virtual environments and build outputs) into a temporary folder, applies the change there, and
runs the unit tests in the copy (stopping at the first failure).  A mutant is *caught* when some test fails, *missed* when the whole suite passes:
then the tests would also pass with that bug in the library.

    python tools/mutants.py              # every mutant; prints a table and the score
    python tools/mutants.py ema-formula  # only the named ones
    python tools/mutants.py --list

Exit status 1 when a mutant is missed or no longer applies (its code has changed: update the
list).  The notebooks are not run (they check the book, not the library); expect a few
minutes on two cores, most of it for the mutants that are caught late.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UNIT_TESTS = ["tests", "--ignore=tests/test_book_html.py", "--ignore=tests/test_fresh_runtime.py",
              "--ignore=tests/test_pdf.py", "--ignore=tests/test_workflows.py", "--ignore=tests/test_colab.py",
              "--ignore=tests/test_mutants_list.py"]  # it checks this list against the unbroken code


@dataclass
class Mutant:
    name: str
    file: str  # inside cfmlib/
    old: str
    new: str
    why: str


MUTANTS = [
    # --- the breakages the library issue lists ---------------------------------------------------
    Mutant("hutchinson-estimator", "likelihood.py",
           "return (vjp * eps).flatten(2).sum(-1).mean(0)", "return (vjp * vjp).flatten(2).sum(-1).mean(0)",
           "Hutchinson's estimate uses eps^T J J^T eps instead of eps^T J eps"),
    Mutant("ema-formula", "training.py",
           "torch._foreach_lerp_(self._dst, self._src, 1.0 - self.decay_at(step))",
           "torch._foreach_lerp_(self._dst, self._src, self.decay_at(step))",
           "the EMA moves by d instead of 1 - d towards the weights"),
    Mutant("label-dropout", "training.py",
           "drop = torch.rand(b, generator=gen, device=dev) < self.label_dropout",
           "drop = torch.rand(b, generator=gen, device=dev) < 0.0 * self.label_dropout",
           "labels are never replaced by the null label (guidance cannot work)"),
    Mutant("t-max-cap", "paths.py",
           "return t * self.t_max if self.t_max != 1.0 else t", "return t",
           "training times are not capped at the path's t_max (VP trains where its target is infinite)"),
    Mutant("gradient-clipping", "training.py",
           "torch.nn.utils.clip_grad_norm_(params, grad_clip)", "pass",
           "grad_clip is accepted and ignored"),
    Mutant("ot-source-scale", "paths.py",
           "return x0 if scale == 1.0 else scale * x0", "return x0",
           "the OT coupling pairs unscaled noise with data (wrong plan for the VE path)"),
    # --- more of the same kind: parameters and formulas a test could leave unchecked ------------------
    Mutant("ema-warmup", "training.py",
           "return min(self.decay, (1.0 + step) / (10.0 + step))", "return self.decay",
           "no EMA warm-up: the average is dominated by the random initial weights"),
    Mutant("condot-sigma-min", "paths.py",
           "ut = torch.add(x1, x0, alpha=-(1.0 - self.sigma_min))", "ut = torch.add(x1, x0, alpha=-1.0)",
           "the fused CondOT target ignores sigma_min"),
    Mutant("loss-weight", "paths.py",
           "        err = err * weight.to(dt)\n", "        err = err\n",
           "per-sample loss weights are ignored"),
    Mutant("weight-decay", "training.py",
           "torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay) if weight_decay",
           "torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0) if weight_decay",
           "weight_decay is accepted and ignored"),
    Mutant("logit-normal-scale", "timesteps.py",
           "return torch.sigmoid(loc + scale * z)", "return torch.sigmoid(loc + z)",
           "the logit-normal time sampler ignores its scale"),
    Mutant("sde-cap", "solvers.py",
           "g_eff = min(gi, sig / math.sqrt(h))", "g_eff = gi",
           "the SDE sampler's diffusion cap near the data end is gone"),
    Mutant("score-sign", "paths.py",
           "return -(a * v - da * x) / ((a * ds - s * da) * s)", "return (a * v - da * x) / ((a * ds - s * da) * s)",
           "the velocity-to-score conversion has the wrong sign"),
    Mutant("marginal-noise-term", "analytic.py",
           "return (g * (da * x1_hat + sds * diff / var)).sum(1)", "return (g * (da * x1_hat - sds * diff / var)).sum(1)",
           "the analytic marginal field has the wrong sign on its noise term"),
    Mutant("prefetch-rewind", "training.py",
           "            self.gen.set_state(boundary)\n", "",
           "drawing ahead for the OT coupling does not rewind the generator"),
    Mutant("ot-cost-transposed", "couplings.py",
           "return _solve(_cost(x1, source)).to(source.device), None", "return _solve(_cost(source, x1)).to(source.device), None",
           "the OT permutation is read in the wrong direction"),
    Mutant("sample-t-max", "solvers.py",
           "return odeint(model, x0, 0.0, path.t_max,", "return odeint(model, x0, 0.0, 1.0,",
           "sampling integrates to t = 1 for a path whose field is infinite there"),
    Mutant("log-prob-sign", "likelihood.py",
           "gaussian_log_prob(x0, path.source_scale) + ell0", "gaussian_log_prob(x0, path.source_scale) - ell0",
           "the log-likelihood adds the divergence integral with the wrong sign"),
    Mutant("exact-divergence", "likelihood.py",
           'return torch.einsum("ibi->b", jac_rows.reshape(d, x.shape[0], d))',
           'return torch.einsum("ibj->b", jac_rows.reshape(d, x.shape[0], d))',
           "the exact divergence sums every Jacobian entry instead of the diagonal"),
    Mutant("adaptive-overshoot", "solvers.py",
           "out = torchdiffeq.odeint(inside, x, grid, method=method, atol=atol, rtol=rtol,\n"
           "                             options=dict(step_t=grid[-1:].detach().to(\"cpu\", torch.float64)))",
           "out = torchdiffeq.odeint(counted, x, grid, method=method, atol=atol, rtol=rtol)",
           "adaptive solves step past the end time and evaluate the field outside [t0, t1]"),
    Mutant("adaptive-clamp-only", "solvers.py",
           "atol=atol, rtol=rtol,\n                             options=dict(step_t=grid[-1:].detach().to(\"cpu\", torch.float64)))",
           "atol=atol, rtol=rtol)",
           "adaptive solves step past the end time (the clamp would hide it from the field)"),
    Mutant("band-same-draw", "metrics.py",
           "a, b = data(n, generator=g), data(n, generator=g)", "a = b = data(n, generator=g)",
           "the data band compares a draw with itself"),
    Mutant("compare-runs-z", "metrics.py", "elif diff < -z * se:", "elif diff < -0.1 * z * se:",
           "compare_runs calls a difference real at a fraction of its standard error"),
    Mutant("check-every", "training.py",
           "if done - self.checked >= self.check_every or done == self.steps:",
           "if done == self.steps:",
           "a NaN loss is noticed only at the end of training"),
    Mutant("resume-history", "training.py",
           "monitor.history[:start] = state[\"history\"][:start].to(monitor.history.device)", "pass",
           "a resumed run forgets the losses before the checkpoint"),
    # --- Part IV and the assignment solver ----------------------------------------------------------
    Mutant("discrete-rate", "discrete.py",
           "return self.d_kappa(t) / (1.0 - self.kappa(t))", "return self.d_kappa(t)",
           "the mixture path's jump rate forgets the 1 / (1 - kappa_t) (tokens jump too rarely)"),
    Mutant("discrete-jump-step", "discrete.py",
           "return (h * self.rate(t)).clamp(0.0, 1.0)", "return self.rate(t).clamp(0.0, 1.0)",
           "an Euler jump ignores its step length h"),
    Mutant("sphere-geodesic-speed", "manifolds.py",
           "return cos * x0 + sin * e, theta * (cos * e - sin * x0)", "return cos * x0 + sin * e, cos * e - sin * x0",
           "the sphere's conditional field has unit speed instead of the geodesic's length"),
    Mutant("sphere-log-length", "manifolds.py",
           "        return ratio * w\n", "        return w\n",
           "the sphere's logarithm returns the chord's tangent part, not the arc length"),
    Mutant("meanflow-target-sign", "fewstep.py",
           "target = (vp + _bc(tp - rp, vp) * d_dr).detach()", "target = (vp - _bc(tp - rp, vp) * d_dr).detach()",
           "the MeanFlow target subtracts the (t - r) d/dr term instead of adding it"),
    Mutant("certificate-slackness", "assignment.py",
           "if np.abs(cost[rows, col].astype(np.float64) - u - v[col]).max() > tol:",
           "if np.abs(cost[rows, col].astype(np.float64) - u - v[col]).max() > 1e300:",
           "the dual certificate no longer checks complementary slackness (a non-optimal plan passes)"),
]


def apply(mutant: Mutant, package: Path) -> bool:
    path = package / mutant.file
    text = path.read_text()
    if text.count(mutant.old) != 1:
        return False
    path.write_text(text.replace(mutant.old, mutant.new))
    return True


_SKIP = shutil.ignore_patterns(".git", ".venv", ".venv-colab", "_build", ".cache", "_static", "__pycache__",
                               ".pytest_cache", ".hypothesis", "*.egg-info", "runs")


def _copy(tmp: str) -> Path:
    """A copy of the repository in which ``import cfmlib`` (run from its root) finds the copy's package."""
    repo = Path(tmp) / "repo"
    shutil.copytree(ROOT, repo, ignore=_SKIP)
    return repo


def run(mutant: Mutant, timeout: float) -> tuple[str, str, float]:
    with tempfile.TemporaryDirectory(prefix="cfmlib-mutant-") as tmp:
        repo = _copy(tmp)
        if not apply(mutant, repo / "cfmlib"):
            return "stale", "its code is not in cfmlib (once): update the mutant", 0.0
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", CFMLIB_MUTANT=mutant.name)
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *UNIT_TESTS]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "timeout", f"the tests ran longer than {timeout:.0f} s", time.perf_counter() - start
        seconds = time.perf_counter() - start
        failed = [line.split(" ")[1] for line in proc.stdout.splitlines() if line.startswith("FAILED ")]
        if proc.returncode == 0:
            return "missed", "every unit test passed", seconds
        if failed:
            return "caught", failed[0], seconds
        return "caught", (proc.stdout.strip().splitlines() or ["(no output)"])[-1], seconds


def _check_copy_is_used() -> None:
    """The mutated copy must shadow the installed cfmlib, or every mutant would look missed."""
    with tempfile.TemporaryDirectory() as tmp:
        repo = _copy(tmp)
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--co",
                              "tests/test_metrics.py", "-o", "addopts="], cwd=repo, capture_output=True, text=True)
        where = subprocess.run([sys.executable, "-c", "import cfmlib; print(cfmlib.__file__)"], cwd=repo,
                               capture_output=True, text=True, check=True).stdout.strip()
        if out.returncode != 0 or not where.startswith(str(repo)):
            raise SystemExit(f"the mutated copy is not imported (cfmlib comes from {where})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant")
    args = parser.parse_args(argv)
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:24s} {m.file:15s} {m.why}")
        return 0
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    unknown = set(args.names) - {m.name for m in MUTANTS}
    if unknown:
        raise SystemExit(f"unknown mutants: {', '.join(sorted(unknown))} (see --list)")
    _check_copy_is_used()
    rows = []
    for m in chosen:
        status, detail, seconds = run(m, args.timeout)
        rows.append((m, status, detail, seconds))
        print(f"{status:8s} {m.name:24s} {seconds:6.1f} s  {detail}", flush=True)
    caught = sum(status == "caught" for _, status, _, _ in rows)
    print(f"\n| mutant | what is broken | result | first failing test |\n|---|---|---|---|")
    for m, status, detail, _ in rows:
        print(f"| {m.name} | {m.why} | {status} | {detail if status == 'caught' else '—'} |")
    print(f"\n{caught} of {len(rows)} mutants caught by the unit tests")
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
