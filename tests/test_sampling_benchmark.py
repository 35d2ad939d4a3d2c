"""The rollout benchmark's pure parts: the stop schedule, the engine's iteration count, the bytes moved."""

from __future__ import annotations

import numpy as np
import pytest

from specs_jax.sampling.benchmark import decode_bytes, engine_iterations, skewed_caps


def test_skewed_caps():
    np.testing.assert_array_equal(skewed_caps(6, 3, 10, 3), [10, 3, 3, 10, 3, 3])
    with pytest.raises(ValueError, match="short"):
        skewed_caps(4, 10, 3, 2)


def test_engine_iterations_by_hand():
    # 2 slots: [5, 1, 1, 1]: slot A runs 5; slot B runs 1, 1, 1 -> ends at 3; total 5
    assert engine_iterations(np.array([5, 1, 1, 1]), 2) == 5
    # 2 slots: [1, 1, 5]: the 5 starts at iteration 1 -> ends at 6
    assert engine_iterations(np.array([1, 1, 5]), 2) == 6
    # static: as many slots as samples -> the longest
    assert engine_iterations(np.array([2, 7, 3]), 3) == 7 == engine_iterations(np.array([2, 7, 3]), 10)
    assert engine_iterations(np.array([2, 2, 2, 2]), 1) == 8


def test_decode_bytes():
    assert decode_bytes(100, 2, 10, 3, 4) == 4 * (100 + 2 * 10 * 3)
