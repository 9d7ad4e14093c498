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
