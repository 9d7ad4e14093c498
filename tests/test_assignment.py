"""cfmlib.assignment: exact plans (SciPy as the reference) on random, tied, integer, offset and
label-masked costs, for every instruction set this processor has; the dual certificate and what
it rejects; every fallback (POT, SciPy) and its warning; bad input."""
import sys
import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from cfmlib import assignment, couplings, datasets


def _optimum(cost):
    c = np.asarray(cost, dtype=np.float64)
    r, col = linear_sum_assignment(c)
    return c[r, col].sum()


def _assert_optimal(cost, col):
    c = np.asarray(cost, dtype=np.float64)
    n = c.shape[0]
    assert sorted(col.tolist()) == list(range(n))
    got, best = c[np.arange(n), col].sum(), _optimum(c)
    assert abs(got - best) <= 1e-9 * max(1.0, abs(best)), (got, best)


def _clouds(n, seed, dtype=np.float32, scale=1.0):
    """Squared distances between 8 Gaussians and N(0, I) points, as in training."""
    g = torch.Generator().manual_seed(seed)
    x1 = datasets.get_dataset("8gaussians")(n, generator=g)
    x0 = torch.randn(n, 2, generator=g) * scale
    return couplings.sq_cost(x1, x0).numpy().astype(dtype)


def _costs(kind, n, rng):
    if kind == "uniform":
        return rng.random((n, n))
    if kind == "clouds":
        return _clouds(n, int(rng.integers(1000)), np.float64, scale=float(rng.uniform(0.5, 3)))
    if kind == "integer_ties":
        return rng.integers(0, 3, size=(n, n)).astype(float)
    if kind == "all_equal":
        return np.full((n, n), 3.0)
    if kind == "duplicated_points":
        a = np.repeat(rng.normal(size=(max(1, n // 5), 2)), 5, axis=0)[:n]
        a = np.concatenate([a, rng.normal(size=(n - len(a), 2))])
        b = np.repeat(rng.normal(size=(max(1, n // 10), 2)), 10, axis=0)[:n]
        b = np.concatenate([b, rng.normal(size=(n - len(b), 2))])
        return ((a[:, None] - b[None]) ** 2).sum(-1)
    if kind == "one_point":
        return ((rng.normal(size=(1, 1, 2)) - rng.normal(size=(1, n, 2))) ** 2).sum(-1).repeat(n, 0)
    if kind == "offset":  # a large offset, as in float32 costs shifted by 1e5
        return rng.random((n, n)) + 1e5
    if kind == "label_masked":  # as couplings.ot_permutation does for label-aware couplings
        c = _clouds(n, int(rng.integers(1000)), np.float64)
        la, lb = rng.permutation(np.arange(n) % 3), rng.permutation(np.arange(n) % 3)
        return np.where(la[:, None] != lb[None, :], c.max() * 2 * n + 1.0, c)
    raise ValueError(kind)


KINDS = ["uniform", "clouds", "integer_ties", "all_equal", "duplicated_points", "one_point", "offset", "label_masked"]


@pytest.fixture(autouse=True)
def _fresh_warning(monkeypatch):
    """Each test sees the once-per-process warning afresh."""
    monkeypatch.setattr(assignment, "_warned", False)
    monkeypatch.delenv("CFMLIB_ASSIGNMENT", raising=False)


def compiled():
    solver, reason = assignment._load()
    if solver is None:
        pytest.skip(f"no compiled solver here: {reason}")
    return solver


def test_compiled_solver_is_in_use_where_a_compiler_exists():
    """The editable install (make venv) and pip install build it; only a machine without a C compiler
    may lack it (tests/test_assignment_build.py covers that case)."""
    import shutil
    import sysconfig

    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None and shutil.which("cc") is None:
        pytest.skip("no C compiler on this machine")
    assert assignment.backend().startswith("compiled ("), assignment.backend()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 2, 3, 17, 64, 255, 300])
def test_solve_agrees_with_scipy(kind, n, dtype):
    rng = np.random.default_rng(n + 1000 * KINDS.index(kind))
    cost = _costs(kind, n, rng).astype(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", assignment.AssignmentFallbackWarning)  # the compiled solver answers
        col = assignment.solve(cost)
    assert col.dtype == np.int64 and col.shape == (n,)
    _assert_optimal(cost, col)


def test_training_sized_batch_as_a_tensor():
    """n = 1024, float32 squared distances (what training passes, without a copy), as a tensor."""
    cost = torch.from_numpy(_clouds(1024, 0))
    col = assignment.solve(cost)
    _assert_optimal(cost.numpy(), col)


@pytest.mark.parametrize("level", [0, 1, 2])
def test_every_instruction_set_gives_certified_optima(level):
    """One build carries several kernel sets (SSE2/baseline, AVX2, AVX-512 on x86-64) and picks one
    at run time; each that this processor has must give the same optimal plans."""
    solver = compiled()
    if solver.lib.cfm_set_isa(level) != 0:
        pytest.skip(f"kernel set {level} not available on this processor or architecture")
    try:
        rng = np.random.default_rng(level)
        for cost in (_clouds(300, level), _clouds(256, 7, np.float64), _costs("integer_ties", 100, rng),
                     _costs("offset", 80, rng).astype(np.float32)):
            rc, col, v, _ = solver(np.ascontiguousarray(cost))
            assert rc == 0
            u = cost[np.arange(len(col)), col].astype(np.float64) - v[col]
            assert assignment.verify(cost, col, u, v)
            _assert_optimal(cost, col)
    finally:
        solver.lib.cfm_set_isa(-1)


def test_exact_without_the_auction():
    """The exact phase alone (no warm start) is exact too."""
    solver = compiled()
    rng = np.random.default_rng(1)
    for cost in (rng.random((40, 40)), _clouds(200, 3)):
        rc, col, v, stats = solver(np.ascontiguousarray(cost), max_bids=0)
        assert rc == 0 and stats[0] == 0
        _assert_optimal(cost, col)


def test_float32_offset_is_shifted_before_the_auction():
    """A float32 matrix with a large offset: float32 keeps too few digits of 1e5 + x for the auction's
    small steps, so the auction runs on a copy shifted to start at 0, the one a float64 matrix gets:
    the float32 matrix and its float64 copy are then solved with exactly the same work."""
    solver = compiled()
    cost = _clouds(512, 5) + np.float32(1e5)
    rc32, col32, _, stats32 = solver(np.ascontiguousarray(cost))
    rc64, col64, _, stats64 = solver(np.ascontiguousarray(cost, dtype=np.float64))
    assert rc32 == rc64 == 0
    _assert_optimal(cost, col32)
    assert stats32.tolist() == stats64.tolist()  # bids, listings, free rows, settled columns, ...


# ----------------------------------------------------------------------------- the certificate
def _certified(cost):
    solver = compiled()
    cost = np.ascontiguousarray(cost)
    rc, col, v, _ = solver(cost)
    assert rc == 0
    return col, cost[np.arange(len(col)), col].astype(np.float64) - v[col], v


def test_certificate_accepts_the_optimum_and_rejects_a_wrong_assignment():
    cost = _clouds(200, 11, np.float64)
    col, u, v = _certified(cost)
    assert assignment.verify(cost, col, u, v)
    # swap the partners of two rows: still a permutation, no longer optimal
    wrong = col.copy()
    wrong[[0, 1]] = wrong[[1, 0]]
    assert cost[np.arange(200), wrong].sum() > cost[np.arange(200), col].sum()
    assert not assignment.verify(cost, wrong, cost[np.arange(200), wrong] - v[wrong], v)
    assert not assignment.verify(cost, wrong, u, v)
    # potentials that are not dual feasible: column col[5] priced just past another row's slack
    j = col[5]
    r = cost[:, j] - u - v[j]
    r[5] = np.inf
    v_bad = v.copy()
    v_bad[j] += r.min() + 1e-6
    assert not assignment.verify(cost, col, cost[np.arange(200), col] - v_bad[col], v_bad)
    # not a permutation
    dup = col.copy()
    dup[0] = dup[1]
    assert not assignment.verify(cost, dup, u, v)
    assert not assignment.verify(cost, np.r_[col[:-1], 200], u, v)
    with pytest.raises(ValueError, match="verify needs"):
        assignment.verify(cost, col[:-1], u, v)


def test_certificate_tolerance_is_tight():
    """A reduced cost of -1e-6 (far below the rounding tolerance) is caught."""
    cost = _clouds(100, 12, np.float64)
    col, u, v = _certified(cost)
    i, j = 3, int(col[4])
    cost2 = cost.copy()
    cost2[i, j] = u[i] + v[j] - 1e-6  # now row 3 would rather take row 4's column
    assert not assignment.verify(cost2, col, u, v)


# ----------------------------------------------------------------------------- fallbacks
class _Wrong:
    """A stand-in for the compiled solver that returns a permutation that is not optimal."""

    def __call__(self, cost, max_bids=None):
        n = cost.shape[0]
        return 0, np.arange(n, dtype=np.int64), np.zeros(n), np.zeros(8, dtype=np.int64)

    def isa(self):
        return "wrong"


def _spy(monkeypatch, name):
    calls = []
    real = getattr(assignment, name)

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out)
        return out

    monkeypatch.setattr(assignment, name, spy)
    return calls


def test_failed_certificate_falls_back_to_pot_with_a_warning(monkeypatch):
    monkeypatch.setattr(assignment, "_load", lambda folder=None: (_Wrong(), None))
    pot = _spy(monkeypatch, "_solve_pot")
    cost = _clouds(120, 13, np.float64)
    with pytest.warns(assignment.AssignmentFallbackWarning, match="failed the optimality certificate"):
        col = assignment.solve(cost)
    _assert_optimal(cost, col)
    assert pot and pot[-1][0] is not None


class _Failing:
    """A stand-in for the compiled solver that returns an error code."""

    def __init__(self, rc):
        self.rc = rc

    def __call__(self, cost, max_bids=None):
        n = cost.shape[0]
        return self.rc, np.zeros(n, dtype=np.int64), np.zeros(n), np.zeros(8, dtype=np.int64)

    def isa(self):
        return "failing"


def test_solver_errors(monkeypatch):
    """Code 3 (internal failure): POT answers, with the warning; code 1 (out of memory): MemoryError."""
    cost = _clouds(40, 14, np.float64)
    monkeypatch.setattr(assignment, "_load", lambda folder=None: (_Failing(3), None))
    with pytest.warns(assignment.AssignmentFallbackWarning, match=r"failed on a 40 x 40 matrix \(code 3\)"):
        _assert_optimal(cost, assignment.solve(cost))
    monkeypatch.setattr(assignment, "_load", lambda folder=None: (_Failing(1), None))
    with pytest.raises(MemoryError, match="n = 40"):
        assignment.solve(cost)


def test_missing_compiled_solver_uses_pot_and_warns_once(monkeypatch):
    monkeypatch.setattr(assignment, "_load", lambda folder=None: (None, "it is not installed (test)"))
    pot = _spy(monkeypatch, "_solve_pot")
    assert assignment.backend().startswith("pot (the compiled solver is not in use: it is not installed (test)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for seed in range(3):
            cost = _costs("integer_ties", 60, np.random.default_rng(seed))
            _assert_optimal(cost, assignment.solve(cost))
    fallback = [w for w in caught if issubclass(w.category, assignment.AssignmentFallbackWarning)]
    assert len(fallback) == 1 and "not installed (test)" in str(fallback[0].message)
    assert len(pot) == 3 and all(col is not None for col, _ in pot)


def test_pot_at_its_iteration_limit_goes_to_scipy(monkeypatch):
    import ot

    real = ot.emd
    monkeypatch.setattr(ot, "emd", lambda a, b, M, numItermax=100000, log=False: real(a, b, M, numItermax=3, log=log))
    col, why = assignment._solve_pot(_clouds(50, 1, np.float64))
    assert col is None and "numItermax" in why
    monkeypatch.setattr(assignment, "_load", lambda folder=None: (None, "test"))
    scipy = _spy(monkeypatch, "_solve_scipy")
    cost = _clouds(50, 2, np.float64)
    with pytest.warns(assignment.AssignmentFallbackWarning):
        _assert_optimal(cost, assignment.solve(cost))
    assert len(scipy) == 1


def test_pot_plan_is_checked_before_it_is_used(monkeypatch):
    """A POT answer that is not an optimal permutation is not returned: a permuted plan with POT's
    duals fails the certificate; a plan that splits mass is not a permutation."""
    import ot

    real = ot.emd
    n = 40

    def swapped(a, b, M, numItermax=100000, log=False):
        plan, info = real(a, b, M, numItermax=numItermax, log=True)
        return plan[[1, 0] + list(range(2, n))], info

    monkeypatch.setattr(ot, "emd", swapped)
    col, why = assignment._solve_pot(_clouds(n, 3, np.float64))
    assert col is None and "certificate" in why

    def split(a, b, M, numItermax=100000, log=False):
        plan, info = real(a, b, M, numItermax=numItermax, log=True)
        return np.full_like(plan, 1.0 / n**2), info

    monkeypatch.setattr(ot, "emd", split)
    col, why = assignment._solve_pot(_clouds(n, 3, np.float64))
    assert col is None and "permutation" in why


def test_without_pot_scipy_is_used(monkeypatch):
    monkeypatch.setitem(sys.modules, "ot", None)  # import ot raises ImportError
    monkeypatch.setattr(assignment, "_load", lambda folder=None: (None, "test"))
    assert assignment.backend().startswith("scipy (") and "POT is not installed" in assignment.backend()
    cost = _clouds(30, 4, np.float64)
    with pytest.warns(assignment.AssignmentFallbackWarning):
        _assert_optimal(cost, assignment.solve(cost))


@pytest.mark.parametrize("choice", ["pot", "scipy"])
def test_environment_selects_a_fallback(monkeypatch, choice):
    monkeypatch.setenv("CFMLIB_ASSIGNMENT", choice)
    calls = _spy(monkeypatch, f"_solve_{choice}")
    cost = _clouds(64, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asked for: no warning
        _assert_optimal(cost, assignment.solve(cost))
    assert len(calls) == 1
    assert assignment.backend() == f"{choice} (requested by CFMLIB_ASSIGNMENT={choice})"


def test_environment_compiled_makes_a_missing_solver_an_error(monkeypatch):
    monkeypatch.setenv("CFMLIB_ASSIGNMENT", "compiled")
    monkeypatch.setattr(assignment, "_load", lambda folder=None: (None, "it is not installed (test)"))
    with pytest.raises(RuntimeError, match="not installed"):
        assignment.solve(np.eye(3))
    monkeypatch.setenv("CFMLIB_ASSIGNMENT", "fast")
    with pytest.raises(ValueError, match="CFMLIB_ASSIGNMENT"):
        assignment.solve(np.eye(3))


# ----------------------------------------------------------------------------- input
def test_inputs_of_other_types():
    rng = np.random.default_rng(0)
    c = rng.integers(0, 5, size=(20, 20))
    ref = assignment.solve(c.astype(np.float64))
    for cost in (c, c.tolist(), torch.from_numpy(c), torch.from_numpy(c).to(torch.bfloat16), c.astype(np.float16),
                 torch.from_numpy(c.astype(np.float32)).requires_grad_()):
        col = assignment.solve(cost)
        assert c[np.arange(20), col].sum() == c[np.arange(20), ref].sum()
    assert assignment.solve(np.zeros((0, 0))).shape == (0,)
    assert assignment.solve(torch.zeros(0, 0)).dtype == np.int64
    assert assignment.solve(np.ones((1, 1))).tolist() == [0]


@pytest.mark.parametrize("bad, error, match", [
    (np.zeros((3, 4)), ValueError, "square"),
    (np.zeros(3), ValueError, "square"),
    (np.zeros((2, 2, 2)), ValueError, "square"),
    (np.zeros((0, 3)), ValueError, "square"),
    (np.array([[0.0, np.nan], [1.0, 0.0]]), ValueError, r"cost\[0, 1\] is nan"),
    (np.array([[0.0, -np.inf], [1.0, 0.0]], dtype=np.float32), ValueError, r"cost\[0, 1\] is -inf"),
    (np.array([[1j, 0], [0, 1j]]), TypeError, "real matrix"),
    (np.array([["a", "b"], ["c", "d"]]), TypeError, "real matrix"),
    ("cost", TypeError, "real matrix"),
])
def test_bad_input_is_rejected_with_a_clear_error(bad, error, match):
    with pytest.raises(error, match=match):
        assignment.solve(bad)


def test_inf_marks_a_forbidden_pair():
    cost = np.array([[np.inf, 1.0], [1.0, 5.0]])
    assert assignment.solve(cost).tolist() == [1, 0]
    with pytest.raises(ValueError):  # no assignment avoids every forbidden pair
        assignment.solve(np.array([[np.inf, np.inf], [1.0, 5.0]]))
