"""Rollout Branching Factor (METHOD.md section 3).

RBF is the mean, over the decoding steps of sampled responses, of the nucleus size at ``p``:
the smallest number of tokens whose probabilities, taken from the largest down, sum to at
least ``p`` (default 0.95, as in Deng et al.) in the policy's next-token distribution. It
measures how many continuations the policy effectively keeps open where it samples; a
deterministic policy has RBF 1.

With top-k inputs (only the k largest probabilities per step) a step whose top-k mass stays
below ``p`` counts as k, so the value is a lower bound of the full-distribution RBF.
A tolerance of 1e-6 on the cumulative sum absorbs float rounding (e.g. 19 x 0.05 vs 0.95).
"""

from __future__ import annotations

import numpy as np

_TOLERANCE = 1e-6


def nucleus_sizes(probs: np.ndarray, p: float = 0.95) -> np.ndarray:
    """Nucleus size at ``p`` for each distribution along the last axis of ``probs``.

    ``probs`` holds full or top-k next-token probabilities, shape ``(..., V)``; the result has
    shape ``probs.shape[:-1]`` and integer dtype.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if not 0 < p <= 1:
        raise ValueError(f"p must be in (0, 1], got {p}")
    if probs.ndim < 1 or probs.shape[-1] == 0:
        raise ValueError(f"probs must have a non-empty last (vocabulary) axis, got shape {probs.shape}")
    if not np.all(np.isfinite(probs)) or np.any(probs < 0):
        raise ValueError("probs must be finite and non-negative")
    if np.any(probs.sum(axis=-1) > 1 + 1e-3):
        raise ValueError("probs along the last axis sum to more than 1: pass probabilities, not logits")
    cumulative = np.cumsum(-np.sort(-probs, axis=-1), axis=-1)
    reached = cumulative >= p - _TOLERANCE
    return np.where(reached.any(axis=-1), reached.argmax(axis=-1) + 1, probs.shape[-1])


def rollout_branching_factor(probs: np.ndarray, mask: np.ndarray | None = None, p: float = 0.95) -> float:
    """Mean nucleus size at ``p`` over the valid decoding steps (module docstring).

    ``probs``: ``(..., steps, V)`` full or top-k next-token probabilities of the sampled
    responses (e.g. ``(batch, steps, V)``). ``mask``: ``probs.shape[:-1]``, true at real
    response steps (false at padding); all steps count when omitted. The mean is over all
    valid steps of all responses.
    """
    sizes = nucleus_sizes(probs, p)
    valid = np.ones(sizes.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if valid.shape != sizes.shape:
        raise ValueError(f"mask shape {valid.shape} does not match probs.shape[:-1] = {sizes.shape}")
    if not valid.any():
        raise ValueError("mask selects no decoding step")
    return float(sizes[valid].mean())
