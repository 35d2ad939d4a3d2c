"""GF, pass@k, RBF and per-split aggregation against independent expressions."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specs_jax.metrics import (
    aggregate_by_split,
    generalization_factor,
    gf_curve,
    nucleus_sizes,
    pass_at_k,
    rollout_branching_factor,
    weighted_ood_gain,
)

GAIN = st.floats(min_value=1e-4, max_value=1.0)
BETA = st.floats(min_value=0.1, max_value=10.0)


def harmonic_form(g_id: float, g_ood: float, beta: float) -> float:
    """F-beta as a weighted harmonic mean, weight b^2/(1+b^2) on the OOD gain."""
    w_ood = beta**2 / (1 + beta**2)
    return 1.0 / ((1 - w_ood) / g_id + w_ood / g_ood)


@settings(max_examples=200, deadline=None)
@given(g_id=GAIN, g_ood=GAIN, beta=BETA)
def test_gf_is_the_weighted_harmonic_mean(g_id: float, g_ood: float, beta: float) -> None:
    expected = harmonic_form(g_id, g_ood, beta)
    assert generalization_factor(g_id, g_ood, beta) == pytest.approx(expected, rel=1e-9)


@settings(max_examples=200, deadline=None)
@given(a=st.floats(min_value=-1.0, max_value=1.0), b=st.floats(min_value=-1.0, max_value=1.0), beta=BETA)
def test_gf_swapping_gains_inverts_beta(a: float, b: float, beta: float) -> None:
    assert generalization_factor(a, b, beta) == pytest.approx(generalization_factor(b, a, 1 / beta), rel=1e-9)


def test_gf_hand_values() -> None:
    assert generalization_factor(0.1, 0.1) == pytest.approx(0.1)
    assert generalization_factor(0.2, 0.05) == pytest.approx(1 / 17)
    assert generalization_factor(0.2, 0.05, beta=1.0) == pytest.approx(2 * 0.2 * 0.05 / 0.25)
    assert generalization_factor(0.05, 0.2) > generalization_factor(0.2, 0.05)


@pytest.mark.parametrize(
    "g_id,g_ood", [(0.0, 0.3), (0.3, 0.0), (-1.0, 4.0), (4.0, -1.0), (-0.2, -0.1), (0.0, 0.0)]
)
def test_gf_is_zero_unless_both_gains_are_positive(g_id: float, g_ood: float) -> None:
    assert generalization_factor(g_id, g_ood) == 0.0


def test_gf_is_continuous_at_zero_gain() -> None:
    assert generalization_factor(0.3, 1e-12) < 1e-10


@pytest.mark.parametrize(
    "args,message",
    [((0.1, 0.1, 0.0), "beta"), ((0.1, 0.1, float("nan")), "beta"), ((float("inf"), 0.1, 2.0), "finite")],
)
def test_gf_bad_input(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generalization_factor(*args)


def test_weighted_ood_gain() -> None:
    assert weighted_ood_gain([0.1, 0.3], [1, 3]) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="equal length"):
        weighted_ood_gain([0.1, 0.3], [1])
    with pytest.raises(ValueError, match="positive sum"):
        weighted_ood_gain([0.1], [0])


def test_gf_curve_uses_row_zero_as_baseline() -> None:
    curve = gf_curve(
        [0, 100, 200],
        acc_id=[0.5, 0.6, 0.7],
        acc_ood=[[0.3, 0.4], [0.30, 0.50], [0.2, 0.4]],
        ood_sizes=[3, 1],
    )
    g_ood_1 = (3 * 0.0 + 1 * 0.1) / 4
    assert curve[0] == 0.0
    assert curve[1] == pytest.approx(harmonic_form(0.1, g_ood_1, 2.0))
    assert curve[2] == 0.0  # OOD accuracy fell: no credit
    one_set = gf_curve([0, 10], [0.5, 0.6], [0.3, 0.5])
    assert one_set[1] == pytest.approx(harmonic_form(0.1, 0.2, 2.0))


@pytest.mark.parametrize(
    "samples,acc_id,acc_ood,sizes,message",
    [
        ([10, 20], [0.5, 0.6], [0.3, 0.4], None, "start at 0"),
        ([0, 20, 10], [0.5, 0.6, 0.7], [0.3, 0.4, 0.5], None, "increasing"),
        ([0, 20], [0.5], [0.3, 0.4], None, "shape"),
        ([0, 20], [0.5, 0.6], [[0.3, 0.4], [0.3, 0.5]], None, "ood_sizes"),
    ],
)
def test_gf_curve_bad_input(samples, acc_id, acc_ood, sizes, message) -> None:
    with pytest.raises(ValueError, match=message):
        gf_curve(samples, acc_id, acc_ood, sizes)


def brute_force_pass_at_k(n: int, c: int, k: int) -> Fraction:
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(samples[i] for i in s) for s in subsets), len(subsets))


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_enumeration(n: int) -> None:
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(float(brute_force_pass_at_k(n, c, k)), abs=1e-12)


def test_pass_at_k_large_n_is_stable() -> None:
    assert pass_at_k(1000, 1, 1) == pytest.approx(0.001)
    assert pass_at_k(10_000, 0, 100) == 0.0
    assert pass_at_k(200, 10, 32) == pytest.approx(1 - math.comb(190, 32) / math.comb(200, 32))


@pytest.mark.parametrize(
    "args,error",
    [((4, 5, 1), ValueError), ((4, 2, 0), ValueError), ((4, 2, 5), ValueError), ((4.0, 2, 1), TypeError)],
)
def test_pass_at_k_bad_input(args: tuple, error: type) -> None:
    with pytest.raises(error):
        pass_at_k(*args)


def test_rbf_one_hot_is_one() -> None:
    probs = np.eye(7)[[0, 3, 6, 2]]
    assert rollout_branching_factor(probs) == 1.0


@pytest.mark.parametrize("p", [Fraction(95, 100), Fraction(1, 2), Fraction(9, 10), Fraction(1)])
def test_rbf_uniform_is_ceil_pm(p: Fraction) -> None:
    for m in range(1, 60):
        probs = np.zeros((1, 64), dtype=np.float32)
        probs[0, :m] = 1.0 / m
        assert rollout_branching_factor(probs, p=float(p)) == math.ceil(p * m), m


def test_rbf_hand_distributions_and_mask() -> None:
    dist = np.array([0.05, 0.3, 0.6, 0.05])
    assert nucleus_sizes(dist, 0.95) == 3
    assert nucleus_sizes(dist, 0.9) == 2
    assert nucleus_sizes(dist, 0.5) == 1
    probs = np.stack([np.stack([dist, np.eye(4)[1], np.full(4, 0.25)]), np.stack([np.eye(4)[0]] * 3)])
    mask = np.array([[True, True, False], [True, False, False]])
    assert rollout_branching_factor(probs, mask) == pytest.approx((3 + 1 + 1) / 3)
    assert rollout_branching_factor(probs) == pytest.approx((3 + 1 + 4 + 1 + 1 + 1) / 6)


def test_rbf_top_k_caps_at_k() -> None:
    top2 = np.array([[0.5, 0.3], [0.97, 0.01]])
    np.testing.assert_array_equal(nucleus_sizes(top2), [2, 1])


@pytest.mark.parametrize(
    "probs,mask,p,message",
    [
        (np.array([[2.0, -1.0]]), None, 0.95, "non-negative"),
        (np.array([[3.0, 1.0]]), None, 0.95, "logits"),
        (np.array([[0.5, 0.5]]), np.array([False]), 0.95, "no decoding step"),
        (np.array([[0.5, 0.5]]), np.array([True, True]), 0.95, "mask shape"),
        (np.array([[0.5, 0.5]]), None, 0.0, "p must be"),
        (np.zeros((2, 0)), None, 0.95, "vocabulary"),
    ],
)
def test_rbf_bad_input(probs, mask, p, message) -> None:
    with pytest.raises(ValueError, match=message):
        rollout_branching_factor(probs, mask, p)


def test_aggregate_by_split() -> None:
    rows = [
        ("id", "q1", True, True), ("id", "q1", False, True),
        ("id", "q2", False, False), ("id", "q2", False, True),
        ("ood", "q3", True, False), ("ood", "q3", True, True),
    ]
    records = [dict(zip(("split", "prompt_id", "correct", "formatted"), r)) for r in rows]
    out = aggregate_by_split(records, ks=(1, 2))
    assert out["id"] == {
        "accuracy": 0.25,
        "format_rate": 0.75,
        "n_samples": 4.0,
        "n_prompts": 2.0,
        "pass@1": 0.25,
        "pass@2": 0.5,
    }
    assert out["ood"]["accuracy"] == 1.0 and out["ood"]["format_rate"] == 0.5 and out["ood"]["pass@2"] == 1.0
    with pytest.raises(ValueError, match="fewer than k=3"):
        aggregate_by_split(records, ks=(3,))
    with pytest.raises(KeyError, match="formatted"):
        aggregate_by_split([{"split": "id", "prompt_id": 1, "correct": True}])
