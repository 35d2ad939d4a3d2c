"""Accuracy, format rate and pass@k per evaluation split."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from specs_jax.metrics.passk import pass_at_k

RECORD_KEYS = ("split", "prompt_id", "correct", "formatted")


def aggregate_by_split(
    records: Iterable[Mapping[str, object]], ks: Sequence[int] = (1,)
) -> dict[str, dict[str, float]]:
    """Per split: ``accuracy`` and ``format_rate`` (means over all sampled responses),
    ``pass@k`` for each k in ``ks`` (unbiased estimator per prompt, then mean over prompts),
    ``n_samples`` and ``n_prompts``.

    Each record is one sampled response with keys ``split``, ``prompt_id``, ``correct``
    (bool) and ``formatted`` (bool). Every prompt needs at least ``max(ks)`` samples.
    """
    groups: dict[str, dict[object, list[tuple[bool, bool]]]] = defaultdict(lambda: defaultdict(list))
    for i, record in enumerate(records):
        missing = [key for key in RECORD_KEYS if key not in record]
        if missing:
            raise KeyError(f"record {i} lacks {missing}; records need keys {RECORD_KEYS}")
        groups[str(record["split"])][record["prompt_id"]].append(
            (bool(record["correct"]), bool(record["formatted"]))
        )
    return {split: _split_metrics(split, prompts, ks) for split, prompts in groups.items()}


def _split_metrics(
    split: str, prompts: Mapping[object, list[tuple[bool, bool]]], ks: Sequence[int]
) -> dict[str, float]:
    samples = np.array([s for group in prompts.values() for s in group], dtype=bool)
    metrics = {
        "accuracy": float(samples[:, 0].mean()),
        "format_rate": float(samples[:, 1].mean()),
        "n_samples": float(len(samples)),
        "n_prompts": float(len(prompts)),
    }
    for k in ks:
        short = [pid for pid, group in prompts.items() if len(group) < k]
        if short:
            raise ValueError(f"split {split!r}: prompt {short[0]!r} has fewer than k={k} samples")
        values = [pass_at_k(len(group), sum(c for c, _ in group), k) for group in prompts.values()]
        metrics[f"pass@{k}"] = float(np.mean(values))
    return metrics
