"""Post-training losses in pure JAX: small, jittable functions of per-token arrays.

Every loss takes ``[B, T]`` per-token arrays (log-probs, or ``[B, T, V]`` logits for the
distillation losses) with a ``[B, T]`` 0/1 mask, and returns ``(loss, metrics)``: a float32
scalar and a dict of float32 scalar metrics (no gradient). Losses are registered by name::

    loss_fn = get_loss("grpo")          # cispo | dpo_hybrid | dr_grpo | grpo | gspo | opsd | sft | vigos
    loss, metrics = loss_fn(logps, old_logps, ref_logps, advantages, mask, kl_coef=0.0)

The GRPO family (``grpo``, ``dr_grpo``, ``gspo``, ``cispo``) shares one signature and one core;
``dpo_hybrid`` selects its preference loss with ``loss_type`` (sigmoid | ipo | hinge | robust).

Add a loss by decorating one function with ``@register_loss("name")``.
"""

from specs_jax.losses.distill import (
    VIGOS_PERCEPTION,
    VIGOS_REASONING,
    VIGOS_REFERENCE,
    opsd_loss,
    vigos_description_end,
    vigos_loss,
    vigos_teacher_index,
)
from specs_jax.losses.dpo import dpo_hybrid_loss
from specs_jax.losses.grpo import cispo_loss, dr_grpo_loss, group_advantages, grpo_loss, gspo_loss
from specs_jax.losses.logprobs import token_logps, token_logps_from_hidden
from specs_jax.losses.registry import get_loss, list_losses, register_loss
from specs_jax.losses.sft import sft_loss

__all__ = [
    "VIGOS_PERCEPTION",
    "VIGOS_REASONING",
    "VIGOS_REFERENCE",
    "cispo_loss",
    "dpo_hybrid_loss",
    "dr_grpo_loss",
    "get_loss",
    "group_advantages",
    "grpo_loss",
    "gspo_loss",
    "list_losses",
    "opsd_loss",
    "register_loss",
    "sft_loss",
    "token_logps",
    "token_logps_from_hidden",
    "vigos_description_end",
    "vigos_loss",
    "vigos_teacher_index",
]
