"""Post-training losses in pure JAX: small, jittable functions of per-token arrays.

Every loss takes ``[B, T]`` per-token arrays (log-probs, or ``[B, T, V]`` logits for the
distillation losses) with a ``[B, T]`` 0/1 mask, and returns ``(loss, metrics)``: a float32
scalar and a dict of float32 scalar metrics (no gradient). Losses are registered by name::

    loss_fn = get_loss("grpo")          # sft | dpo_hybrid | grpo | opsd | vigos
    loss, metrics = loss_fn(logps, old_logps, ref_logps, advantages, mask, kl_coef=0.0)

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
from specs_jax.losses.grpo import group_advantages, grpo_loss
from specs_jax.losses.logprobs import token_logps, token_logps_from_hidden
from specs_jax.losses.registry import get_loss, list_losses, register_loss
from specs_jax.losses.sft import sft_loss

__all__ = [
    "VIGOS_PERCEPTION",
    "VIGOS_REASONING",
    "VIGOS_REFERENCE",
    "dpo_hybrid_loss",
    "get_loss",
    "group_advantages",
    "grpo_loss",
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
