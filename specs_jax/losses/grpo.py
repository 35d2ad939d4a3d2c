"""GRPO family: group-relative advantages and the policy-gradient losses (TRL / verl semantics).

``grpo`` (token ratio, clipped), ``dr_grpo`` (its constant length normaliser), ``gspo`` (sequence
ratio, clipped) and ``cispo`` (clipped stop-gradient weight on the log-prob) share one core
(:func:`_policy_gradient_loss`): the same positional inputs, KL penalty, sampler/trainer
importance-sampling correction, aggregations and metrics; each supplies only its per-token
objective. METHOD.md sections 4 and 4b.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from specs_jax.losses._masking import (
    check_choice,
    check_shapes,
    masked_mean,
    masked_sum,
)
from specs_jax.losses.registry import register_loss

__all__ = ["cispo_loss", "dr_grpo_loss", "group_advantages", "grpo_loss", "gspo_loss"]

ADVANTAGE_SCALES = ("group", "batch", "none")
KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
LOG_RATIO_CLAMP = 20.0
SAMPLER_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


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


# A per-token objective of the family: ``(logps, log_ratio, adv, mask) -> (pg, metrics)``, with ``logps``
# ``[B, T]`` float32 (carries the gradient), ``log_ratio = logps - stop_gradient(old_logps)`` ``[B, T]``,
# ``adv`` ``[B, 1]`` or ``[B, T]`` (no gradient) and ``mask`` ``[B, T]``; ``pg`` is the ``[B, T]``
# policy-gradient term per token and ``metrics`` are masked batch means (no gradient needed).
Objective = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def _ratio(log_ratio: jax.Array) -> jax.Array:
    """``exp(clip(log_ratio, -20, 20))``."""
    return jnp.exp(jnp.clip(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


def _clipped_objective(
    fn: str, eps_low: float, eps_high: float, dual_clip: float | None, *, sequence: bool
) -> Objective:
    """PPO clip (and verl's dual clip) of the token ratio (grpo, dr_grpo) or of the sequence ratio (gspo)."""
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"{fn}: dual_clip must be > 1, got {dual_clip}")

    def objective(logps, log_ratio, adv, mask):
        if sequence:  # GSPO: mean log-ratio over the sequence's tokens, [B, 1]
            count = jnp.maximum(jnp.sum(mask.astype(jnp.float32), axis=-1, keepdims=True), 1.0)
            log_ratio = masked_sum(log_ratio, mask, axis=-1)[:, None] / count
        ratio = _ratio(log_ratio)
        pg = jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high))
        if dual_clip is not None:
            pg = jnp.where(adv < 0, jnp.minimum(pg, -adv * dual_clip), pg)
        low = (ratio < 1.0 - eps_low) & (adv < 0)
        high = (ratio > 1.0 + eps_high) & (adv > 0)

        def mean(x):
            return masked_mean(jnp.broadcast_to(x, mask.shape), mask)

        metrics = {
            "ratio": mean(ratio),
            "clip_ratio/low": mean(low),
            "clip_ratio/high": mean(high),
            "clip_ratio/region": mean(low | high),
        }
        if dual_clip is not None:
            metrics["clip_ratio/dual"] = mean((ratio > dual_clip) & (adv < 0))
        return jnp.broadcast_to(pg, mask.shape), metrics

    return objective


def _cispo_objective(fn: str, eps_high: float) -> Objective:
    """CISPO: ``-stop_gradient(min(ratio, eps_high)) * A * logp``."""
    if eps_high <= 0.0:
        raise ValueError(f"{fn}: eps_high (the weight cap eps_max) must be > 0, got {eps_high}")

    def objective(logps, log_ratio, adv, mask):
        ratio = _ratio(log_ratio)
        pg = -jax.lax.stop_gradient(jnp.minimum(ratio, eps_high)) * adv * logps
        high = (ratio > eps_high) & (adv > 0)
        metrics = {
            "ratio": masked_mean(ratio, mask),
            "clip_ratio/high": masked_mean(jnp.broadcast_to(high, mask.shape), mask),
        }
        return jnp.broadcast_to(pg, mask.shape), metrics

    return objective


def _check_sampler_is(
    fn: str, mode: str | None, clip_min: float | None, clip_max: float | None, sampler_logps: jax.Array | None
) -> None:
    """``ValueError`` naming the option when the importance-sampling correction is misconfigured."""
    if mode is None:
        return
    check_choice(fn, "sampler_is_mode", mode, SAMPLER_IS_MODES)
    if sampler_logps is None:
        raise ValueError(
            f"{fn}: sampler_is_mode is {mode!r} but sampler_logps is None; the step must pass the sampler's "
            "log-probs, or set sampler_is_mode=None"
        )
    if mode.endswith("_truncate") and clip_min is None and clip_max is None:
        raise ValueError(f"{fn}: sampler_is_mode {mode!r} needs sampler_is_clip_min or sampler_is_clip_max")
    if clip_min is not None and clip_max is not None and clip_min >= clip_max:
        raise ValueError(f"{fn}: sampler_is_clip_min ({clip_min}) must be < sampler_is_clip_max ({clip_max})")


def _sampler_weights(
    old: jax.Array,
    sampler_logps: jax.Array,
    mask: jax.Array,
    mode: str,
    clip_min: float | None,
    clip_max: float | None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Importance weights ``w`` (``[B, T]`` or ``[B, 1]``, no gradient) of the trainer's old log-probs over
    the sampler's, and their metrics; TRL ``vllm_importance_sampling_*``.

    ``d_t = old_t - sampler_t`` on the mask (0 elsewhere, and where the sampler's log-prob is NaN);
    ``w = exp(d_t)`` per token or ``exp(sum_t d_t)`` per sequence (exponent clamped to +-20);
    ``*_truncate`` clamps w to ``[clip_min, clip_max]``, ``*_mask`` sets w outside it to 0 (a
    ``None`` bound is open).
    """
    d = old - jax.lax.stop_gradient(sampler_logps.astype(jnp.float32))
    d = jnp.where((mask != 0) & ~jnp.isnan(d), d, 0.0)
    sequence = mode.startswith("sequence")
    if sequence:
        d = jnp.sum(d, axis=-1, keepdims=True)
    w = _ratio(d)
    lo = -jnp.inf if clip_min is None else clip_min
    hi = jnp.inf if clip_max is None else clip_max
    outside = (w < lo) | (w > hi)
    w = jnp.clip(w, lo, hi) if mode.endswith("_truncate") else jnp.where(outside, 0.0, w)
    if sequence:  # metrics over the non-empty sequences
        w_m, outside_m, over = w[:, 0], outside[:, 0], jnp.sum(mask.astype(jnp.float32), axis=-1) > 0
    else:  # over the tokens
        w_m, outside_m, over = w, outside, mask
    metrics = {"sampler_is/mean": masked_mean(w_m, over), "sampler_is/clipped": masked_mean(outside_m, over)}
    return jax.lax.stop_gradient(w), metrics


def _policy_gradient_loss(
    fn: str,
    objective: Objective,
    logps: jax.Array,
    old_logps: jax.Array | None,
    ref_logps: jax.Array | None,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    kl_coef: float,
    kl_estimator: str,
    loss_agg: str,
    max_completion_length: int | None,
    sampler_is_mode: str | None,
    sampler_is_clip_min: float | None,
    sampler_is_clip_max: float | None,
    logits: jax.Array | None,
    num_items_in_batch: jax.Array | int | None,
    sampler_logps: jax.Array | None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The core of the GRPO family: checks, ``objective``'s per-token term, the sampler importance
    weights, the KL penalty, the aggregation and the metrics (see :func:`grpo_loss`)."""
    check_choice(fn, "loss_agg", loss_agg, LOSS_AGGS)
    check_choice(fn, "kl_estimator", kl_estimator, KL_ESTIMATORS)
    if mask.ndim != 2:
        raise ValueError(f"{fn}: mask must be [B, T], got shape {mask.shape}")
    check_shapes(fn, mask.shape, logps=logps, old_logps=old_logps, ref_logps=ref_logps, sampler_logps=sampler_logps)
    if advantages.shape not in ((mask.shape[0],), tuple(mask.shape)):
        raise ValueError(f"{fn}: advantages has shape {advantages.shape}, expected ({mask.shape[0]},) or {mask.shape}")
    if ref_logps is None and kl_coef != 0.0:
        raise ValueError(f"{fn}: ref_logps is None but kl_coef is {kl_coef}; pass ref_logps or set kl_coef=0")
    if logits is not None and logits.shape[:-1] != mask.shape:
        raise ValueError(f"{fn}: logits has shape {logits.shape}, expected {mask.shape} + (V,)")
    _check_sampler_is(fn, sampler_is_mode, sampler_is_clip_min, sampler_is_clip_max, sampler_logps)
    batch, length = mask.shape
    if max_completion_length is not None and max_completion_length < 1:
        raise ValueError(f"{fn}: max_completion_length must be >= 1, got {max_completion_length}")

    logps = logps.astype(jnp.float32)
    old = jax.lax.stop_gradient(logps if old_logps is None else old_logps.astype(jnp.float32))
    adv = jax.lax.stop_gradient(advantages.astype(jnp.float32))
    adv = adv[:, None] if adv.ndim == 1 else adv

    pg, metrics = objective(logps, logps - old, adv, mask)
    if sampler_is_mode is not None:
        weight, is_metrics = _sampler_weights(
            old, sampler_logps, mask, sampler_is_mode, sampler_is_clip_min, sampler_is_clip_max
        )
        pg = pg * weight
        metrics.update(is_metrics)
    per_token = pg
    if ref_logps is not None:
        kl = _kl(logps, jax.lax.stop_gradient(ref_logps.astype(jnp.float32)), kl_estimator)
        per_token = pg + kl_coef * kl
        metrics["kl"] = masked_mean(kl, mask)

    def aggregate(x: jax.Array) -> jax.Array:
        if loss_agg == "token-mean":
            total, count = masked_sum(x, mask), jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)
        elif loss_agg == "seq-mean-token-mean":
            total, count = jnp.sum(masked_mean(x, mask, axis=-1)), batch
        else:
            total, count = masked_sum(x, mask) / (max_completion_length or length), batch
        return total / (count if num_items_in_batch is None else num_items_in_batch)

    metrics["policy_loss"] = aggregate(pg)
    if logits is not None:
        metrics["entropy"] = masked_mean(_entropy(logits), mask)
    return aggregate(per_token), jax.tree.map(jax.lax.stop_gradient, metrics)


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
    sampler_is_mode: str | None = None,
    sampler_is_clip_min: float | None = None,
    sampler_is_clip_max: float | None = 3.0,
    logits: jax.Array | None = None,
    num_items_in_batch: jax.Array | int | None = None,
    sampler_logps: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped GRPO/PPO objective with an optional KL penalty.

    Per token, with ``r = exp(clip(logp - old_logp, -20, 20))`` and advantage ``A``::

        pg  = max(-A * r, -A * clip(r, 1 - eps_low, 1 + eps_high))
        pg  = min(pg, -A * dual_clip)        where A < 0, if dual_clip is set (verl)
        pg  = pg * w                         if sampler_is_mode is set (see below)
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
    ``k3 = exp(d) - d - 1`` (not weighted by the ratio: TRL with ``use_bias_correction_kl=False``).
    ``old_logps``, ``ref_logps``, ``sampler_logps`` and ``advantages`` carry no gradient.

    Sampler/trainer importance-sampling correction (TRL ``vllm_importance_sampling_mode``,
    ``_clip_min``, ``_clip_max``; off by default), for when the rollout engine's log-probs differ
    from the trainer's (another precision or layout): with ``d_t = old_logp_t - sampler_logp_t`` on
    the mask, ``w = exp(d_t)`` per token (``token_*``) or ``w = exp(sum_t d_t)`` per sequence
    (``sequence_*``, broadcast to its tokens), exponent clamped to +-20; ``*_truncate`` clamps ``w``
    to ``[sampler_is_clip_min, sampler_is_clip_max]``, ``*_mask`` sets ``w`` outside that range to 0
    (a ``None`` bound is open). ``w`` is a stopped weight on the policy term only (as in TRL, the KL
    term is not weighted). Every GRPO-family loss has this option.

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
      max_completion_length: ``L`` of Dr. GRPO (the longest completion the sampler may produce; the rows
        may also hold prompt columns, so it may be < T); used by ``seq-mean-token-sum-norm`` only.
      dual_clip: dual-clip constant ``c > 1`` for negative advantages (verl uses 3), or ``None``.
      sampler_is_mode: ``None`` (off), ``"token_truncate"``, ``"token_mask"``,
        ``"sequence_truncate"`` or ``"sequence_mask"``.
      sampler_is_clip_min, sampler_is_clip_max: the bounds of ``w`` (TRL's defaults: none, 3).
      logits: optional ``[B, T, V]`` temperature-scaled policy logits, only to report the entropy.
      num_items_in_batch: optional global normaliser, see above.
      sampler_logps: ``[B, T]`` the sampler's log-probs of the sampled tokens; required when
        ``sampler_is_mode`` is set, ignored otherwise.

    Returns:
      ``(loss, metrics)`` with masked batch means: ``policy_loss`` (the aggregated ``pg``),
      ``ratio``, ``clip_ratio/low`` (``r < 1 - eps_low`` and ``A < 0``), ``clip_ratio/high``
      (``r > 1 + eps_high`` and ``A > 0``), ``clip_ratio/region`` (either), ``clip_ratio/dual``
      (``r > c`` and ``A < 0``, with dual_clip), ``kl`` (with ref_logps), ``entropy`` (with logits),
      ``sampler_is/mean`` (mean applied ``w``, over tokens, or over non-empty sequences for the
      ``sequence_*`` modes) and ``sampler_is/clipped`` (fraction of those outside the bounds),
      with sampler_is_mode.
    """
    fn = "grpo_loss"
    return _policy_gradient_loss(
        fn,
        _clipped_objective(fn, eps_low, eps_high, dual_clip, sequence=False),
        logps,
        old_logps,
        ref_logps,
        advantages,
        mask,
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
        loss_agg=loss_agg,
        max_completion_length=max_completion_length,
        sampler_is_mode=sampler_is_mode,
        sampler_is_clip_min=sampler_is_clip_min,
        sampler_is_clip_max=sampler_is_clip_max,
        logits=logits,
        num_items_in_batch=num_items_in_batch,
        sampler_logps=sampler_logps,
    )


@register_loss("dr_grpo")
def dr_grpo_loss(
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
    loss_agg: str = "seq-mean-token-sum-norm",
    max_completion_length: int | None = None,
    dual_clip: float | None = None,
    sampler_is_mode: str | None = None,
    sampler_is_clip_min: float | None = None,
    sampler_is_clip_max: float | None = 3.0,
    logits: jax.Array | None = None,
    num_items_in_batch: jax.Array | int | None = None,
    sampler_logps: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-like training"): :func:`grpo_loss`'s
    clipped objective and defaults with a constant length normaliser::

        loss = sum_{b,t}(l_bt * m_bt) / (B * L)        L = max_completion_length (default T)

    (``loss_agg="seq-mean-token-sum-norm"``, TRL ``loss_type="dr_grpo"``), so that a response's
    gradient does not shrink with its length. Dr. GRPO's other change, advantages not divided by
    the group std (``A = r - mean_group(r)``), is the advantage computation:
    :func:`group_advantages` with ``scale="none"``, which the trainer sets for this loss. Set
    ``max_completion_length`` to the rollout's maximum response length when the batch is padded to
    less. Inputs ``[B, T]`` (``advantages`` ``[B]`` or ``[B, T]``), options, the importance-sampling
    correction and the metrics: as :func:`grpo_loss`.
    """
    fn = "dr_grpo_loss"
    return _policy_gradient_loss(
        fn,
        _clipped_objective(fn, eps_low, eps_high, dual_clip, sequence=False),
        logps,
        old_logps,
        ref_logps,
        advantages,
        mask,
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
        loss_agg=loss_agg,
        max_completion_length=max_completion_length,
        sampler_is_mode=sampler_is_mode,
        sampler_is_clip_min=sampler_is_clip_min,
        sampler_is_clip_max=sampler_is_clip_max,
        logits=logits,
        num_items_in_batch=num_items_in_batch,
        sampler_logps=sampler_logps,
    )


@register_loss("gspo")
def gspo_loss(
    logps: jax.Array,
    old_logps: jax.Array | None,
    ref_logps: jax.Array | None,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
    kl_coef: float = 0.01,
    kl_estimator: str = "k3",
    loss_agg: str = "seq-mean-token-mean",
    max_completion_length: int | None = None,
    dual_clip: float | None = None,
    sampler_is_mode: str | None = None,
    sampler_is_clip_min: float | None = None,
    sampler_is_clip_max: float | None = 3.0,
    logits: jax.Array | None = None,
    num_items_in_batch: jax.Array | int | None = None,
    sampler_logps: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization"): the clipped objective of
    :func:`grpo_loss` on one importance ratio per sequence (TRL ``importance_sampling_level=
    "sequence"``)::

        s_b = exp(clip(sum_t (logp_bt - old_logp_bt) * m_bt / max(sum_t m_bt, 1), -20, 20))   [B, 1]
        pg  = max(-A * s_b, -A * clip(s_b, 1 - eps_low, 1 + eps_high))                     broadcast to [B, T]

    (then dual clip, importance-sampling weight, KL and aggregation as :func:`grpo_loss`). The
    gradient flows through ``s_b`` into every token of the sequence (``ds_b/dlogp_bt = s_b m_bt / n_b``).
    Defaults: ``eps_low = 3e-4``, ``eps_high = 4e-4`` (the GSPO paper's clip range, which TRL's GSPO
    recipe uses; a sequence ratio is a geometric mean and moves far less than a token ratio) and
    the sequence-level aggregation ``seq-mean-token-mean`` (TRL ``loss_type="grpo"``, as the
    paper). Inputs ``[B, T]`` (``advantages`` ``[B]`` or ``[B, T]``), the other options and the
    metrics: as :func:`grpo_loss`; ``ratio`` and ``clip_ratio/*`` are token-weighted means of the
    sequence values.
    """
    fn = "gspo_loss"
    return _policy_gradient_loss(
        fn,
        _clipped_objective(fn, eps_low, eps_high, dual_clip, sequence=True),
        logps,
        old_logps,
        ref_logps,
        advantages,
        mask,
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
        loss_agg=loss_agg,
        max_completion_length=max_completion_length,
        sampler_is_mode=sampler_is_mode,
        sampler_is_clip_min=sampler_is_clip_min,
        sampler_is_clip_max=sampler_is_clip_max,
        logits=logits,
        num_items_in_batch=num_items_in_batch,
        sampler_logps=sampler_logps,
    )


@register_loss("cispo")
def cispo_loss(
    logps: jax.Array,
    old_logps: jax.Array | None,
    ref_logps: jax.Array | None,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    eps_high: float = 5.0,
    kl_coef: float = 0.01,
    kl_estimator: str = "k3",
    loss_agg: str = "token-mean",
    max_completion_length: int | None = None,
    sampler_is_mode: str | None = None,
    sampler_is_clip_min: float | None = None,
    sampler_is_clip_max: float | None = 3.0,
    logits: jax.Array | None = None,
    num_items_in_batch: jax.Array | int | None = None,
    sampler_logps: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """CISPO (MiniMax-M1, 2025; ScaleRL): a clipped, stop-gradient importance weight on the
    log-prob, so that clipped tokens still get a gradient::

        r   = exp(clip(logp - old_logp, -20, 20))                      [B, T]
        pg  = -stop_gradient(min(r, eps_high)) * A * logp               [B, T]

    (then importance-sampling weight, KL and aggregation as :func:`grpo_loss`). ``eps_high`` is
    ``eps_max`` of the papers, TRL's ``epsilon_high`` with ``loss_type="cispo"``; default 5.0, the
    value TRL's documentation recommends (ScaleRL). Default aggregation ``token-mean``: a token sum
    over the whole generation batch's token count (TRL ``cispo``, with ``num_items_in_batch``).
    On-policy (``r = 1``) the gradient is REINFORCE's ``-A / n``, as GRPO's. Inputs ``[B, T]``
    (``advantages`` ``[B]`` or ``[B, T]``), the other options and the metrics: as
    :func:`grpo_loss`, except ``clip_ratio/high`` = fraction of tokens with ``r > eps_high`` and
    ``A > 0`` (TRL's ``cispo_clip_ratio``) and no ``clip_ratio/low``, ``/region``; ``policy_loss``
    is the aggregated ``pg``, whose value is ``-w A logp`` (not a ratio objective).
    """
    fn = "cispo_loss"
    return _policy_gradient_loss(
        fn,
        _cispo_objective(fn, eps_high),
        logps,
        old_logps,
        ref_logps,
        advantages,
        mask,
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
        loss_agg=loss_agg,
        max_completion_length=max_completion_length,
        sampler_is_mode=sampler_is_mode,
        sampler_is_clip_min=sampler_is_clip_min,
        sampler_is_clip_max=sampler_is_clip_max,
        logits=logits,
        num_items_in_batch=num_items_in_batch,
        sampler_logps=sampler_logps,
    )


dr_grpo_loss.scale_rewards = "none"  # Dr. GRPO's advantages are not divided by the std (the RL trainer reads this)
