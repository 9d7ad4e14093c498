"""Metrics: exact W2 identities, MMD, bits per dimension, straightness."""
import math

import pytest
import torch

from cfmlib.metrics import bits_per_dim, mmd, straightness, w2


def test_w2_identities():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 2, generator=g, dtype=torch.float64)
    b = torch.randn(300, 2, generator=g, dtype=torch.float64) * 2 + 1
    assert w2(a, a) == pytest.approx(0.0, abs=1e-12)
    c = torch.tensor([3.0, -4.0], dtype=torch.float64)
    assert w2(a, a + c) == pytest.approx(5.0, abs=1e-9)  # translation by c: exactly |c|
    assert w2(a, b) == pytest.approx(w2(b, a), abs=1e-12)
    # a permutation of the same set is at distance 0
    assert w2(a, a[torch.randperm(300, generator=g)]) == pytest.approx(0.0, abs=1e-12)


def test_w2_unequal_sizes_matches_equal_case_for_duplicates():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(50, 2, generator=g, dtype=torch.float64)
    b = torch.randn(50, 2, generator=g, dtype=torch.float64)
    # duplicating every point of b does not change the empirical distribution
    assert w2(a, torch.cat([b, b])) == pytest.approx(w2(a, b), abs=1e-8)


def test_mmd_zero_in_expectation_and_positive_for_shift():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(2, 400, 2, generator=g)
    same = mmd(a, b)
    shifted = mmd(a, b + 2.0)
    assert abs(same) < 0.02 and shifted > 0.2


def test_bits_per_dim():
    assert bits_per_dim(2 * math.log(2.0), 2) == pytest.approx(1.0)


def test_straightness_zero_for_straight_constant_speed_and_positive_for_curved():
    s = torch.linspace(0, 1, 11)
    x0, x1 = torch.randn(5, 2), torch.randn(5, 2)
    straight = x0[None] + s[:, None, None] * (x1 - x0)[None]
    assert straightness(straight) == pytest.approx(0.0, abs=1e-10)
    ang = s * math.pi
    arc = torch.stack([torch.cos(ang), torch.sin(ang)], -1)[:, None, :]
    assert straightness(arc) > 1.0


# --- bands and comparisons -----------------------------------------------------------------------

from cfmlib.datasets import get_dataset  # noqa: E402
from cfmlib.metrics import Band, compare_runs, data_band  # noqa: E402


def test_data_band_spread_matches_independent_draws_and_is_seeded():
    data = get_dataset("8gaussians")
    band = data_band(data, 300, repeats=12, generator=torch.Generator().manual_seed(0))
    again = data_band(data, 300, repeats=12, generator=torch.Generator().manual_seed(0))
    assert band.values == again.values and len(band.values) == 12
    # every repeat is a W2 between two independent draws, recomputed here by hand
    g = torch.Generator().manual_seed(0)
    first = w2(data(300, generator=g), data(300, generator=g))
    assert band.values[0] == pytest.approx(first, abs=1e-12)
    assert 0 < band.lo <= band.mean <= band.hi and band.std > 0
    # the band shrinks with n (W2 between two draws of n points goes to 0)
    big = data_band(data, 1200, repeats=6, generator=torch.Generator().manual_seed(1))
    assert big.mean < band.mean


def test_band_from_a_tensor_uses_disjoint_subsets():
    x = torch.randn(100, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    band = data_band(x, 50, repeats=5, generator=torch.Generator().manual_seed(4))
    assert min(band.values) > 0  # disjoint halves: never the same set twice
    with pytest.raises(ValueError, match="fewer than the 2 n"):
        data_band(x, 60, repeats=5)


def test_band_verdicts():
    band = Band("w2", 100, (0.2, 0.25, 0.3))
    assert band.compare(0.27).verdict == "indistinguishable"
    assert band.compare([0.35, 0.5]).verdict == "worse"
    assert band.compare(0.1).verdict == "below"
    v = band.compare([0.22, 0.4])
    assert v.verdict == "mixed" and (v.inside, v.above, v.below) == (1, 1, 0)
    assert "inside the band" in str(v) and "n = 100" in str(band)


def test_model_from_the_data_distribution_lands_in_the_band_and_a_shifted_one_does_not():
    data = get_dataset("8gaussians")
    g = torch.Generator().manual_seed(5)
    band = data_band(data, 400, repeats=20, generator=g)
    ref = data(400, generator=g)
    exact = [w2(data(400, generator=g), ref) for _ in range(3)]
    shifted = [w2(data(400, generator=g) + 1.0, ref) for _ in range(3)]
    assert band.compare(shifted).verdict == "worse"
    assert band.compare(exact).inside >= 2


def test_compare_runs():
    assert compare_runs([1.0, 1.1, 0.9], [2.0, 2.1, 1.9]).verdict == "a lower"
    assert compare_runs([2.0, 2.1, 1.9], [1.0, 1.1, 0.9]).verdict == "b lower"
    assert compare_runs([1.0, 1.5, 0.5], [1.2, 0.7, 1.7]).verdict == "no clear difference"
    assert compare_runs([1.0], [2.0]).verdict == "no clear difference"  # one seed each: nothing claimed
    r = compare_runs([1.0, 1.1, 0.9], [2.0, 2.1, 1.9], names=("OT", "I"))
    assert "OT lower" in str(r)
    with pytest.raises(ValueError, match="NaN"):
        compare_runs([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(TypeError, match="names"):
        compare_runs([1.0], [2.0], names="ab")


def test_band_compare_mean_tests_the_mean_not_each_value():
    data = get_dataset("8gaussians")
    g = torch.Generator().manual_seed(9)
    band = data_band(data, 200, repeats=20, generator=g)
    ref = data(200, generator=g)
    exact = [w2(data(200, generator=g), ref) for _ in range(8)]
    shifted = [w2(data(200, generator=g) + 0.7, ref) for _ in range(8)]
    assert band.compare_mean(exact).verdict == "no clear difference"
    assert band.compare_mean(shifted).verdict == "b lower"  # the data-vs-data distances are lower
    assert "data vs data lower" in str(band.compare_mean(shifted))
