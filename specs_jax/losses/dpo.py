"""DPO-hybrid loss of SPECS stage 2: sigmoid DPO plus an SFT (NLL) term on the chosen response."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from specs_jax.losses._masking import check_choice, check_shapes, masked_sum
from specs_jax.losses.registry import register_loss

__all__ = ["dpo_hybrid_loss"]

SFT_NORMS = ("token", "sequence")


@register_loss("dpo_hybrid")
def dpo_hybrid_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    chosen_mask: jax.Array,
    rejected_mask: jax.Array,
    *,
    beta: float = 0.1,
    sft_weight: float = 1.0,
    sft_norm: str = "token",
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``L = L_DPO + sft_weight * L_SFT`` from per-token log-probs.

    With sequence log-probs ``pi_c = sum_t policy_chosen_logps * chosen_mask`` (likewise
    ``pi_r``, ``ref_c``, ``ref_r``) and ``h = (pi_c - ref_c) - (pi_r - ref_r)``::

        L_DPO = mean_b[ -(1 - ls) * log sigmoid(beta * h) - ls * log sigmoid(-beta * h) ]

    (``ls = label_smoothing``: conservative DPO, TRL's sigmoid loss; ``ls = 0`` is plain DPO).
    ``L_SFT`` is the NLL of the chosen response only:

    - ``sft_norm="token"``: ``-sum(policy_chosen_logps * chosen_mask) / sum(chosen_mask)`` (TRL);
    - ``sft_norm="sequence"``: ``mean_b[-sum_t(...) / sum_t chosen_mask]`` (LLaMA-Factory pref_ftx).

    An empty chosen row counts as NLL 0 in the sequence mean. The reference log-probs carry no
    gradient.

    Args:
      policy_chosen_logps, policy_rejected_logps: ``[B, T]`` per-token log-probs of the policy.
      ref_chosen_logps, ref_rejected_logps: ``[B, T]`` per-token log-probs of the frozen reference.
      chosen_mask, rejected_mask: ``[B, T]`` 1 on response tokens (prompt and padding 0). The
        chosen and rejected tensors may have different ``T``.
      beta: DPO temperature.
      sft_weight: lambda, weight of ``L_SFT``.
      sft_norm: ``"token"`` or ``"sequence"``.
      label_smoothing: probability that a preference label is flipped, in ``[0, 0.5)``.

    Returns:
      ``(loss, metrics)``; metrics are batch means: ``rewards/chosen`` = beta*(pi_c - ref_c),
      ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies`` (chosen reward strictly
      greater), ``logps/chosen`` = pi_c, ``logps/rejected`` = pi_r, ``nll`` = L_SFT.
    """
    fn = "dpo_hybrid_loss"
    check_choice(fn, "sft_norm", sft_norm, SFT_NORMS)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"{fn}: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    check_shapes(fn, chosen_mask.shape, policy_chosen_logps=policy_chosen_logps, ref_chosen_logps=ref_chosen_logps)
    check_shapes(
        fn, rejected_mask.shape, policy_rejected_logps=policy_rejected_logps, ref_rejected_logps=ref_rejected_logps
    )
    if chosen_mask.ndim != 2 or chosen_mask.shape[0] != rejected_mask.shape[0]:
        raise ValueError(
            f"{fn}: chosen_mask {chosen_mask.shape} and rejected_mask {rejected_mask.shape} must be [B, T] "
            "with the same B"
        )

    pi_c = masked_sum(policy_chosen_logps, chosen_mask, axis=-1)
    pi_r = masked_sum(policy_rejected_logps, rejected_mask, axis=-1)
    ref_c = jax.lax.stop_gradient(masked_sum(ref_chosen_logps, chosen_mask, axis=-1))
    ref_r = jax.lax.stop_gradient(masked_sum(ref_rejected_logps, rejected_mask, axis=-1))

    h = (pi_c - ref_c) - (pi_r - ref_r)
    dpo = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h) - label_smoothing * jax.nn.log_sigmoid(-beta * h)

    n_chosen = jnp.sum(chosen_mask.astype(jnp.float32), axis=-1)
    if sft_norm == "token":
        nll = -jnp.sum(pi_c) / jnp.maximum(jnp.sum(n_chosen), 1.0)
    else:
        nll = jnp.mean(-pi_c / jnp.maximum(n_chosen, 1.0))

    loss = jnp.mean(dpo) + sft_weight * nll
    chosen_rewards = beta * (pi_c - ref_c)
    rejected_rewards = beta * (pi_r - ref_r)
    metrics = {
        "rewards/chosen": jnp.mean(chosen_rewards),
        "rewards/rejected": jnp.mean(rejected_rewards),
        "rewards/margins": jnp.mean(chosen_rewards - rejected_rewards),
        "rewards/accuracies": jnp.mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
        "logps/chosen": jnp.mean(pi_c),
        "logps/rejected": jnp.mean(pi_r),
        "nll": nll,
    }
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)
