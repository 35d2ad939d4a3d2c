"""Evaluation of a policy on named prompt splits (``specs-jax eval``): greedy accuracy and format
rate, and pass@k (unbiased estimator) from ``num_samples`` samples per prompt.

- :func:`evaluate_model`: every split of an :class:`~specs_jax.training.config.EvalConfig`;
- :func:`evaluate_split`: one split with a given sampler;
- :func:`split_metrics`: the pure aggregation of one split's scored responses.
"""

from specs_jax.evaluation.evaluate import evaluate_model, evaluate_split, split_metrics

__all__ = ["evaluate_model", "evaluate_split", "split_metrics"]
