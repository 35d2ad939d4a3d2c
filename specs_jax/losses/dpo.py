"""DPO-hybrid loss of SPECS stage 2: a preference loss (sigmoid DPO, IPO, hinge, robust) plus an SFT
(NLL) term on the chosen response."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from specs_jax.losses._masking import check_choice, check_shapes, masked_sum
from specs_jax.losses.registry import register_loss

__all__ = ["dpo_hybrid_loss"]

SFT_NORMS = ("token", "sequence")
LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


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
    loss_type: str = "sigmoid",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``L = L_pref + sft_weight * L_SFT`` from per-token log-probs.

    With sequence log-probs ``pi_c = sum_t policy_chosen_logps * chosen_mask`` (likewise
    ``pi_r``, ``ref_c``, ``ref_r``; each ``[B]``), ``h = (pi_c - ref_c) - (pi_r - ref_r)`` and
    ``e = label_smoothing``, the preference loss is a mean over the ``B`` pairs,
    ``L_pref = mean_b[l_b]``, with ``l_b`` by ``loss_type`` (TRL ``DPOTrainer`` loss types):

    - ``"sigmoid"`` (DPO): ``-(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)``; ``e > 0`` is
      conservative DPO (cDPO, the sigmoid loss of earlier TRL releases), ``e = 0``
      plain DPO (TRL 1.x ``sigmoid``);
    - ``"ipo"`` (IPO, Azar et al. 2023, on length-averaged log-ratios as TRL):
      ``(d - 1 / (2 beta))^2`` with ``d = (pi_c - ref_c) / n_c - (pi_r - ref_r) / n_r``,
      ``n = max(sum_t mask, 1)``;
    - ``"hinge"`` (SLiC): ``relu(1 - beta h)``;
    - ``"robust"`` (rDPO, Chowdhury et al. 2024, an unbiased loss under label noise ``e``):
      ``(-(1 - e) log sigmoid(beta h) + e log sigmoid(-beta h)) / (1 - 2 e)``.

    ``label_smoothing`` applies to ``sigmoid`` and ``robust`` only (nonzero with ``ipo`` or
    ``hinge`` is refused). Since every type is a mean over pairs, a micro-batch of ``b`` of the
    ``B`` pairs contributes ``(b / B) * L_pref`` of the whole batch's value.
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
      loss_type: ``"sigmoid"``, ``"ipo"``, ``"hinge"`` or ``"robust"``.

    Returns:
      ``(loss, metrics)``; metrics are batch means: ``rewards/chosen`` = beta*(pi_c - ref_c),
      ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies`` (chosen reward strictly
      greater), ``logps/chosen`` = pi_c, ``logps/rejected`` = pi_r, ``nll`` = L_SFT.
    """
    fn = "dpo_hybrid_loss"
    check_choice(fn, "sft_norm", sft_norm, SFT_NORMS)
    check_choice(fn, "loss_type", loss_type, LOSS_TYPES)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"{fn}: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type in ("ipo", "hinge"):
        raise ValueError(f"{fn}: label_smoothing ({label_smoothing}) does not apply to loss_type {loss_type!r}")
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
    n_chosen = jnp.sum(chosen_mask.astype(jnp.float32), axis=-1)
    e = label_smoothing
    if loss_type == "sigmoid":
        pref = -(1.0 - e) * jax.nn.log_sigmoid(beta * h) - e * jax.nn.log_sigmoid(-beta * h)
    elif loss_type == "robust":
        pref = (-(1.0 - e) * jax.nn.log_sigmoid(beta * h) + e * jax.nn.log_sigmoid(-beta * h)) / (1.0 - 2.0 * e)
    elif loss_type == "hinge":
        pref = jax.nn.relu(1.0 - beta * h)
    else:
        n_rejected = jnp.sum(rejected_mask.astype(jnp.float32), axis=-1)
        d = (pi_c - ref_c) / jnp.maximum(n_chosen, 1.0) - (pi_r - ref_r) / jnp.maximum(n_rejected, 1.0)
        pref = (d - 1.0 / (2.0 * beta)) ** 2

    if sft_norm == "token":
        nll = -jnp.sum(pi_c) / jnp.maximum(jnp.sum(n_chosen), 1.0)
    else:
        nll = jnp.mean(-pi_c / jnp.maximum(n_chosen, 1.0))

    loss = jnp.mean(pref) + sft_weight * nll
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
