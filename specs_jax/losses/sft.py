"""SFT loss: token-mean negative log-likelihood of the response tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from specs_jax.losses._masking import check_shapes, masked_sum
from specs_jax.losses.registry import register_loss

__all__ = ["sft_loss"]


@register_loss("sft")
def sft_loss(
    logps: jax.Array, mask: jax.Array, *, num_items_in_batch: jax.Array | int | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``L = -sum(logps * mask) / N`` with ``N = num_items_in_batch`` (default ``sum(mask)``, at least 1).

    Args:
      logps: ``[B, T]`` log-probs of the target tokens.
      mask: ``[B, T]`` 1 on response tokens.
      num_items_in_batch: the global response-token count when the batch is split into micro-batches,
        so that the micro-batch losses sum to the batch loss.

    Returns:
      ``(loss, {"nll": loss})``.
    """
    check_shapes("sft_loss", mask.shape, logps=logps)
    n = jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0) if num_items_in_batch is None else num_items_in_batch
    nll = -masked_sum(logps.astype(jnp.float32), mask) / n
    return nll, {"nll": jax.lax.stop_gradient(nll)}
