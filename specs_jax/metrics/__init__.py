"""Metrics of the SPECS papers (METHOD.md section 3); pure numpy, no I/O.

- :func:`generalization_factor`, :func:`weighted_ood_gain`, :func:`gf_curve`: GF, the F-beta
  of the ID and OOD accuracy gains (0 when either gain is <= 0).
- :func:`rollout_branching_factor`: mean nucleus size at p over decoding steps.
- :func:`pass_at_k`: unbiased pass@k; :func:`aggregate_by_split`: accuracy, format rate and
  pass@k per evaluation split.
"""

from specs_jax.metrics.aggregate import aggregate_by_split
from specs_jax.metrics.gf import generalization_factor, gf_curve, weighted_ood_gain
from specs_jax.metrics.passk import pass_at_k
from specs_jax.metrics.rbf import nucleus_sizes, rollout_branching_factor

__all__ = [
    "aggregate_by_split",
    "generalization_factor",
    "gf_curve",
    "nucleus_sizes",
    "pass_at_k",
    "rollout_branching_factor",
    "weighted_ood_gain",
]
