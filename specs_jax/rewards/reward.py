"""The SPECS reward ``R = R_format + R_acc`` for one response and for a batch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from specs_jax.rewards.extract import extract_answer
from specs_jax.rewards.format import format_reward
from specs_jax.rewards.math_equal import answers_equal

ACCURACY_REWARD = 1.0


def accuracy_reward(text: str, ground_truth: str) -> float:
    """1.0 when the judged answer of ``text`` equals ``ground_truth``, else 0.0.

    The judged answer is the last ``\\boxed{...}`` (nested braces allowed) inside the answer
    block, or anywhere in the text when there is no answer block (so a correct response whose
    format was broken still counts as a correct answer); see
    :func:`~specs_jax.rewards.extract.extract_answer`. Equality is
    :func:`~specs_jax.rewards.math_equal.answers_equal`.
    """
    if not isinstance(ground_truth, str):
        raise TypeError(f"ground_truth must be str, got {type(ground_truth).__name__}")
    answer = extract_answer(text)
    return ACCURACY_REWARD if answer is not None and answers_equal(answer, ground_truth) else 0.0


def specs_reward(text: str, ground_truth: str) -> float:
    """``format_reward(text) + accuracy_reward(text, ground_truth)``: 0, 0.5, 1.0 or 1.5."""
    return format_reward(text) + accuracy_reward(text, ground_truth)


class RewardBatch(NamedTuple):
    """Per-response rewards of a batch, float32 arrays of equal length."""

    format: np.ndarray
    accuracy: np.ndarray
    total: np.ndarray


def score_batch(texts: Sequence[str], ground_truths: Sequence[str]) -> RewardBatch:
    """Score ``texts[i]`` against ``ground_truths[i]`` for every i (same rules as above)."""
    if len(texts) != len(ground_truths):
        raise ValueError(
            f"texts and ground_truths differ in length: {len(texts)} != {len(ground_truths)}"
        )
    fmt = np.fromiter(map(format_reward, texts), dtype=np.float32, count=len(texts))
    acc = np.fromiter(map(accuracy_reward, texts, ground_truths), dtype=np.float32, count=len(texts))
    return RewardBatch(format=fmt, accuracy=acc, total=fmt + acc)
