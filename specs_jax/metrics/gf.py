"""Generalization Factor (SPECS, METHOD.md section 3).

``GF = (1 + b^2) * G_ood * G_id / (b^2 * G_id + G_ood)``: the F-beta score of the two
accuracy gains over the starting model, i.e. their weighted harmonic mean with weight
``b^2 / (1 + b^2)`` on ``G_ood`` (b = 2 weights OOD four times as much as ID).

Zero and negative gains: GF is 0 whenever either gain is <= 0. A harmonic mean is only
defined for positive values; it is the continuous extension at a zero gain (GF -> 0 as either
gain -> 0+); and it avoids the formula's pathologies for signed gains (the denominator
``b^2 * G_id + G_ood`` reaches 0, e.g. ``G_id = -1, G_ood = 4``, and two negative gains would
give a negative "harmonic mean" or a positive one of the wrong size). A method that does not
improve on both distributions gets no generalization credit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _check_beta(beta: float) -> None:
    if not (np.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite positive number, got {beta}")


def generalization_factor(gain_id: float, gain_ood: float, beta: float = 2.0) -> float:
    """F-beta of ``gain_id`` and ``gain_ood`` (module docstring); 0 when either gain is <= 0."""
    _check_beta(beta)
    if not (np.isfinite(gain_id) and np.isfinite(gain_ood)):
        raise ValueError(f"gains must be finite, got gain_id={gain_id}, gain_ood={gain_ood}")
    if gain_id <= 0 or gain_ood <= 0:
        return 0.0
    b2 = beta * beta
    return float((1 + b2) * gain_ood * gain_id / (b2 * gain_id + gain_ood))


def weighted_ood_gain(gains: Sequence[float], sizes: Sequence[float]) -> float:
    """Average of the per-set OOD gains weighted by the set sizes (``sum(s*g) / sum(s)``)."""
    g = np.asarray(gains, dtype=np.float64)
    s = np.asarray(sizes, dtype=np.float64)
    if g.ndim != 1 or g.shape != s.shape or g.size == 0:
        raise ValueError(
            f"gains and sizes must be non-empty 1-D of equal length, got {g.shape} and {s.shape}"
        )
    if np.any(s < 0) or s.sum() <= 0:
        raise ValueError(f"sizes must be non-negative with a positive sum, got {s.tolist()}")
    return float(g @ s / s.sum())


def gf_curve(
    samples_seen: Sequence[int],
    acc_id: Sequence[float],
    acc_ood: Sequence[float] | Sequence[Sequence[float]],
    ood_sizes: Sequence[float] | None = None,
    beta: float = 2.0,
) -> np.ndarray:
    """GF after each evaluation point ``n`` of a cold-start run.

    ``samples_seen`` is strictly increasing and starts at 0, the starting model, so that
    ``G(n) = Psi(n) - Psi(0)`` uses row 0 as the baseline. ``acc_id`` has shape ``(T,)``;
    ``acc_ood`` has shape ``(T,)`` for one OOD set or ``(T, S)`` for S sets, pooled per point
    by :func:`weighted_ood_gain` with ``ood_sizes`` (required when S > 1). Returns ``(T,)``
    GF values (the first is 0).
    """
    n = np.asarray(samples_seen)
    a_id = np.asarray(acc_id, dtype=np.float64)
    a_ood = np.asarray(acc_ood, dtype=np.float64)
    if n.ndim != 1 or n.size == 0 or n[0] != 0 or np.any(np.diff(n) <= 0):
        raise ValueError("samples_seen must be 1-D, strictly increasing and start at 0 (the starting model)")
    if a_id.shape != n.shape or a_ood.shape[:1] != n.shape or a_ood.ndim not in (1, 2):
        raise ValueError(
            f"acc_id must have shape {n.shape} and acc_ood {n.shape} or {n.shape + ('S',)}; "
            f"got {a_id.shape} and {a_ood.shape}"
        )
    if a_ood.ndim == 2 and a_ood.shape[1] > 1 and ood_sizes is None:
        raise ValueError("ood_sizes is required with several OOD sets")
    gains_ood = a_ood - a_ood[0]
    if a_ood.ndim == 2:
        sizes = np.ones(a_ood.shape[1]) if ood_sizes is None else ood_sizes
        gains_ood = np.array([weighted_ood_gain(row, sizes) for row in gains_ood])
    gains_id = a_id - a_id[0]
    return np.array([generalization_factor(i, o, beta) for i, o in zip(gains_id, gains_ood)])
