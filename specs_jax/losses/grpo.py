"""GRPO: group-relative advantages and the clipped policy-gradient loss (TRL / verl semantics)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from specs_jax.losses._masking import (
    check_choice,
    check_shapes,
    masked_mean,
    masked_sum,
)
from specs_jax.losses.registry import register_loss

__all__ = ["group_advantages", "grpo_loss"]

ADVANTAGE_SCALES = ("group", "batch", "none")
KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
LOG_RATIO_CLAMP = 20.0


def group_advantages(rewards: jax.Array, group_size: int, *, scale: str = "group", eps: float = 1e-4) -> jax.Array:
    """Group-relative advantages ``A_i = (r_i - mean_group(r)) / (std + eps)``.

    ``rewards`` holds consecutive groups of ``group_size`` responses to the same prompt. ``std`` is
    the Bessel-corrected (ddof 1) standard deviation of the group (``scale="group"``) or of the whole
    batch (``scale="batch"``); ``scale="none"`` only subtracts the group mean (Dr. GRPO). A
    single-element group or batch has std 0, as in TRL.

    Args:
      rewards: ``[N]`` scalar rewards, ``N = num_prompts * group_size``.
      group_size: responses per prompt (G).
      scale: ``"group"``, ``"batch"`` or ``"none"``.
      eps: added to the std.

    Returns:
      ``[N]`` float32 advantages.
    """
    fn = "group_advantages"
    check_choice(fn, "scale", scale, ADVANTAGE_SCALES)
    if rewards.ndim != 1 or group_size < 1 or rewards.shape[0] % group_size:
        raise ValueError(
            f"{fn}: rewards must be [N] with N a multiple of group_size; got shape {rewards.shape}, "
            f"group_size {group_size}"
        )
    r = rewards.astype(jnp.float32)
    groups = r.reshape(-1, group_size)
    centred = (groups - jnp.mean(groups, axis=1, keepdims=True)).reshape(-1)
    if scale == "none":
        return centred
    if scale == "group":
        std = jnp.std(groups, axis=1, ddof=1) if group_size > 1 else jnp.zeros(groups.shape[0])
        std = jnp.repeat(std, group_size)
    else:
        std = jnp.std(r, ddof=1) if r.shape[0] > 1 else jnp.zeros(())
    return centred / (std + eps)


def _kl(logps: jax.Array, ref_logps: jax.Array, estimator: str) -> jax.Array:
    """Per-token estimate of KL(pi || ref) from ``d = clip(ref - logp, -20, 20)``.

    k1 = -d, k2 = d^2 / 2, k3 = exp(d) - d - 1 (Schulman's estimators; k3 is TRL's and verl's
    ``low_var_kl`` without verl's extra clamp of k3 to [-10, 10]).
    """
    d = jnp.clip(ref_logps - logps, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d**2
    return jnp.exp(d) - d - 1.0


def _entropy(logits: jax.Array) -> jax.Array:
    """``[B, T, V] -> [B, T]`` entropy of ``softmax(logits)`` in float32."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


@register_loss("grpo")
def grpo_loss(
    logps: jax.Array,
    old_logps: jax.Array | None,
    ref_logps: jax.Array | None,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    kl_coef: float = 0.01,
    kl_estimator: str = "k3",
    loss_agg: str = "token-mean",
    max_completion_length: int | None = None,
    dual_clip: float | None = None,
    logits: jax.Array | None = None,
    num_items_in_batch: jax.Array | int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped GRPO/PPO objective with an optional KL penalty.

    Per token, with ``r = exp(clip(logp - old_logp, -20, 20))`` and advantage ``A``::

        pg  = max(-A * r, -A * clip(r, 1 - eps_low, 1 + eps_high))
        pg  = min(pg, -A * dual_clip)        where A < 0, if dual_clip is set (verl)
        l_t = pg + kl_coef * KL_t            KL_t from kl_estimator (k1 | k2 | k3, see below)

    then aggregated over the response tokens (``mask``) by ``loss_agg``:

    - ``"token-mean"``: ``sum(l * mask) / n_tok`` (DAPO / TRL ``dapo`` / verl default);
    - ``"seq-mean-token-mean"``: ``sum_b(sum_t l*mask / sum_t mask) / n_seq`` (original GRPO);
    - ``"seq-mean-token-sum-norm"``: ``sum(l * mask) / (n_seq * L)`` with
      ``L = max_completion_length`` (default ``T``) (Dr. GRPO).

    ``n_tok`` / ``n_seq`` default to this batch's token / sequence count; pass
    ``num_items_in_batch`` (the global token count for ``token-mean``, the global sequence count
    for the ``seq-*`` modes) to normalise over a whole generation batch split into
    gradient-accumulation steps, so that summing the micro-batch losses gives the global value.
    (Under ``jit`` with a sharded batch the counts are already global across devices.)

    KL estimators with ``d = clip(ref_logp - logp, -20, 20)``: ``k1 = -d``, ``k2 = d^2/2``,
    ``k3 = exp(d) - d - 1``. ``old_logps``, ``ref_logps`` and ``advantages`` carry no gradient.

    Args:
      logps: ``[B, T]`` log-probs of the sampled tokens under the current policy (logits divided
        by the sampling temperature).
      old_logps: ``[B, T]`` log-probs under the policy that sampled; ``None`` means on-policy
        (``stop_gradient(logps)``, ratio 1).
      ref_logps: ``[B, T]`` reference log-probs; may be ``None`` only when ``kl_coef == 0``.
      advantages: ``[B]`` (one per sequence) or ``[B, T]``.
      mask: ``[B, T]`` 1 on completion tokens up to and including the first EOS.
      eps_low, eps_high: clip range ``[1 - eps_low, 1 + eps_high]`` (DAPO clip-higher).
      kl_coef: weight of the KL penalty; 0 disables it (the KL is still reported if ``ref_logps``
        is given).
      kl_estimator: ``"k1"``, ``"k2"`` or ``"k3"``.
      loss_agg: ``"token-mean"``, ``"seq-mean-token-mean"`` or ``"seq-mean-token-sum-norm"``.
      max_completion_length: ``L`` of Dr. GRPO (>= T); used by ``seq-mean-token-sum-norm`` only.
      dual_clip: dual-clip constant ``c > 1`` for negative advantages (verl uses 3), or ``None``.
      logits: optional ``[B, T, V]`` temperature-scaled policy logits, only to report the entropy.
      num_items_in_batch: optional global normaliser, see above.

    Returns:
      ``(loss, metrics)`` with masked batch means: ``policy_loss`` (the aggregated ``pg``),
      ``ratio``, ``clip_ratio/low`` (``r < 1 - eps_low`` and ``A < 0``), ``clip_ratio/high``
      (``r > 1 + eps_high`` and ``A > 0``), ``clip_ratio/region`` (either), ``clip_ratio/dual``
      (``r > c`` and ``A < 0``, with dual_clip), ``kl`` (with ref_logps) and ``entropy`` (with logits).
    """
    fn = "grpo_loss"
    check_choice(fn, "loss_agg", loss_agg, LOSS_AGGS)
    check_choice(fn, "kl_estimator", kl_estimator, KL_ESTIMATORS)
    if mask.ndim != 2:
        raise ValueError(f"{fn}: mask must be [B, T], got shape {mask.shape}")
    check_shapes(fn, mask.shape, logps=logps, old_logps=old_logps, ref_logps=ref_logps)
    if advantages.shape not in ((mask.shape[0],), tuple(mask.shape)):
        raise ValueError(f"{fn}: advantages has shape {advantages.shape}, expected ({mask.shape[0]},) or {mask.shape}")
    if ref_logps is None and kl_coef != 0.0:
        raise ValueError(f"{fn}: ref_logps is None but kl_coef is {kl_coef}; pass ref_logps or set kl_coef=0")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"{fn}: dual_clip must be > 1, got {dual_clip}")
    if logits is not None and logits.shape[:-1] != mask.shape:
        raise ValueError(f"{fn}: logits has shape {logits.shape}, expected {mask.shape} + (V,)")
    batch, length = mask.shape
    if max_completion_length is not None and max_completion_length < length:
        raise ValueError(f"{fn}: max_completion_length {max_completion_length} is smaller than T = {length}")

    logps = logps.astype(jnp.float32)
    old = jax.lax.stop_gradient(logps if old_logps is None else old_logps.astype(jnp.float32))
    adv = jax.lax.stop_gradient(advantages.astype(jnp.float32))
    adv = adv[:, None] if adv.ndim == 1 else adv

    ratio = jnp.exp(jnp.clip(logps - old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    pg = jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high))
    if dual_clip is not None:
        pg = jnp.where(adv < 0, jnp.minimum(pg, -adv * dual_clip), pg)
    per_token = pg
    kl = None
    if ref_logps is not None:
        kl = _kl(logps, jax.lax.stop_gradient(ref_logps.astype(jnp.float32)), kl_estimator)
        per_token = pg + kl_coef * kl

    def aggregate(x: jax.Array) -> jax.Array:
        if loss_agg == "token-mean":
            total, count = masked_sum(x, mask), jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)
        elif loss_agg == "seq-mean-token-mean":
            total, count = jnp.sum(masked_mean(x, mask, axis=-1)), batch
        else:
            total, count = masked_sum(x, mask) / (max_completion_length or length), batch
        return total / (count if num_items_in_batch is None else num_items_in_batch)

    low = (ratio < 1.0 - eps_low) & (adv < 0)
    high = (ratio > 1.0 + eps_high) & (adv > 0)
    metrics = {
        "policy_loss": aggregate(pg),
        "ratio": masked_mean(ratio, mask),
        "clip_ratio/low": masked_mean(low, mask),
        "clip_ratio/high": masked_mean(high, mask),
        "clip_ratio/region": masked_mean(low | high, mask),
    }
    if dual_clip is not None:
        metrics["clip_ratio/dual"] = masked_mean((ratio > dual_clip) & (adv < 0), mask)
    if kl is not None:
        metrics["kl"] = masked_mean(kl, mask)
    if logits is not None:
        metrics["entropy"] = masked_mean(_entropy(logits), mask)
    return aggregate(per_token), jax.tree.map(jax.lax.stop_gradient, metrics)
