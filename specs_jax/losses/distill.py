"""On-policy self-distillation losses: OPSD (one teacher) and ViGOS (three routed teachers).

All divergences are over the full next-token distribution at each response position, summed over
the vocabulary, then averaged over the valid response tokens. Teacher logits carry no gradient.
Logits of any float dtype are promoted to float32.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from specs_jax.losses._masking import (
    check_choice,
    check_shapes,
    masked_mean,
    masked_sum,
)
from specs_jax.losses.registry import register_loss

__all__ = [
    "VIGOS_PERCEPTION",
    "VIGOS_REASONING",
    "VIGOS_REFERENCE",
    "opsd_loss",
    "vigos_description_end",
    "vigos_loss",
    "vigos_teacher_index",
]

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")

# Positions of the ViGOS teachers along the leading axis of ``teacher_logits`` (and values of
# ``teacher_index``).
VIGOS_PERCEPTION = 0
VIGOS_REASONING = 1
VIGOS_REFERENCE = 2


def _kl(logp: jax.Array, logq: jax.Array) -> jax.Array:
    """``KL(p || q) = sum_v p_v (log p_v - log q_v)`` over the last axis."""
    return jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)


def _generalized_jsd(student_logp: jax.Array, teacher_logp: jax.Array, beta: float) -> jax.Array:
    """TRL GKD's generalized JSD: ``beta KL(T||M) + (1-beta) KL(S||M)``, ``M = (1-beta) S + beta T``.

    ``beta = 0`` is the forward KL(T||S) and ``beta = 1`` the reverse KL(S||T), exactly (as in TRL).
    """
    if beta == 0.0:
        return _kl(teacher_logp, student_logp)
    if beta == 1.0:
        return _kl(student_logp, teacher_logp)
    mix_logp = jnp.logaddexp(student_logp + jnp.log1p(-beta), teacher_logp + jnp.log(beta))
    return beta * _kl(teacher_logp, mix_logp) + (1.0 - beta) * _kl(student_logp, mix_logp)


def _token_mean(x: jax.Array, mask: jax.Array, num_items_in_batch: jax.Array | int | None) -> jax.Array:
    """``sum(x * mask) / sum(mask)`` (at least 1), or ``/ num_items_in_batch`` when given."""
    denom = jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0) if num_items_in_batch is None else num_items_in_batch
    return masked_sum(x, mask) / denom


def _clip_metrics(divergence: jax.Array, mask: jax.Array, token_clip: float | None) -> dict[str, jax.Array]:
    metrics = {"divergence": masked_mean(divergence, mask)}
    if token_clip is not None:
        metrics["clip_fraction"] = masked_mean(divergence > token_clip, mask)
    return metrics


def _check_common(
    fn: str, student_logits: jax.Array, mask: jax.Array, temperature: float, token_clip: float | None
) -> None:
    if student_logits.ndim != 3 or student_logits.shape[:2] != mask.shape:
        raise ValueError(
            f"{fn}: student_logits {student_logits.shape} must be [B, T, V] and mask {mask.shape} must be [B, T]"
        )
    if temperature <= 0:
        raise ValueError(f"{fn}: temperature must be > 0, got {temperature}")
    if token_clip is not None and token_clip <= 0:
        raise ValueError(f"{fn}: token_clip must be > 0 or None, got {token_clip}")


@register_loss("opsd")
def opsd_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    mask: jax.Array,
    *,
    divergence: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    top_k: int | None = None,
    token_clip: float | None = None,
    num_items_in_batch: jax.Array | int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Token-level distillation divergence between student and (privileged) teacher.

    With ``S = softmax(student_logits / temperature)``, ``T = softmax(teacher_logits / temperature)``
    at each position, the per-token divergence ``D_t`` is

    - ``"forward_kl"``: ``KL(T || S) = sum_v T_v (log T_v - log S_v)``;
    - ``"reverse_kl"``: ``KL(S || T)``;
    - ``"jsd"``: TRL GKD's generalized JSD ``beta KL(T||M) + (1-beta) KL(S||M)`` with
      ``M = (1-beta) S + beta T`` (``beta = 0``: forward KL, ``beta = 1``: reverse KL);

    and ``loss = sum_t mask_t * min(D_t, token_clip) / sum_t mask_t``. ``top_k`` restricts the
    vocabulary at each position to the student's ``top_k`` most likely tokens and renormalises
    both distributions there. With ``divergence="jsd"`` and ``token_clip=None`` this equals TRL's
    ``GKDTrainer.generalized_jsd_loss(student, teacher, labels, beta, temperature)``.

    Args:
      student_logits: ``[B, T, V]`` student logits at the response positions.
      teacher_logits: ``[B, T, V]`` teacher logits on the same tokens (no gradient).
      mask: ``[B, T]`` 1 on valid response tokens.
      divergence: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"``.
      beta: JSD interpolation in ``[0, 1]`` (``jsd`` only).
      temperature: both logits are divided by it.
      top_k: optional vocabulary restriction (static).
      token_clip: optional upper clamp of each token's divergence (0.05 in the OPSD/ViGOS code).
      num_items_in_batch: optional global token count replacing ``sum(mask)`` (gradient accumulation).

    Returns:
      ``(loss, metrics)``: ``divergence`` (mean unclipped ``D_t``), ``clip_fraction`` (share of
      tokens with ``D_t > token_clip``, when clipping).
    """
    fn = "opsd_loss"
    check_choice(fn, "divergence", divergence, DIVERGENCES)
    _check_common(fn, student_logits, mask, temperature, token_clip)
    check_shapes(fn, student_logits.shape, teacher_logits=teacher_logits)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"{fn}: beta must be in [0, 1], got {beta}")
    if top_k is not None and not 1 <= top_k <= student_logits.shape[-1]:
        raise ValueError(f"{fn}: top_k must be in [1, V={student_logits.shape[-1]}], got {top_k}")

    s = student_logits.astype(jnp.float32) / temperature
    t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)) / temperature
    if top_k is not None:
        _, idx = jax.lax.top_k(jax.lax.stop_gradient(s), top_k)
        s = jnp.take_along_axis(s, idx, axis=-1)
        t = jnp.take_along_axis(t, idx, axis=-1)
    s_logp = jax.nn.log_softmax(s, axis=-1)
    t_logp = jax.nn.log_softmax(t, axis=-1)
    mix = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": beta}[divergence]
    per_token = _generalized_jsd(s_logp, t_logp, mix)
    clipped = per_token if token_clip is None else jnp.minimum(per_token, token_clip)
    metrics = _clip_metrics(per_token, mask, token_clip)
    return _token_mean(clipped, mask, num_items_in_batch), jax.tree.map(jax.lax.stop_gradient, metrics)


@register_loss("vigos")
def vigos_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    teacher_index: jax.Array,
    mask: jax.Array,
    *,
    weights: tuple[float, float, float] = (1.0, 1.0, 2.0),
    token_clip: float | None = 0.05,
    temperature: float = 1.0,
    num_items_in_batch: jax.Array | int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """ViGOS: each response token is distilled from one of three teachers.

    ``teacher_index[b, t] = k`` routes token ``(b, t)`` to teacher ``k`` with divergence ``D_t``:

    - ``VIGOS_PERCEPTION`` (0), description tokens of a valid rollout: forward ``KL(T_0 || S)``;
    - ``VIGOS_REASONING`` (1), reasoning and answer tokens of a valid rollout: forward ``KL(T_1 || S)``;
    - ``VIGOS_REFERENCE`` (2), every token of an invalid rollout: reverse ``KL(S || T_2)``;

    where ``S``, ``T_k`` are the softmax of the logits divided by ``temperature``. Then::

        loss = sum_t mask_t * w[k_t] * min(D_t, token_clip) / sum_t mask_t

    i.e. one token-mean over the whole batch in which the three terms carry weights ``w``
    (default 1, 1, 2). Only the selected teacher's logits enter each token's divergence.

    Args:
      student_logits: ``[B, T, V]``.
      teacher_logits: ``[3, B, T, V]``: perception, reasoning and reference teachers on the
        student's tokens (no gradient).
      teacher_index: ``[B, T]`` integers in {0, 1, 2}, e.g. from :func:`vigos_teacher_index`.
      mask: ``[B, T]`` 1 on valid response tokens.
      weights: weights of the perception, reasoning and reference terms.
      token_clip: upper clamp of each token's divergence (ViGOS code: 0.05), or ``None``.
      temperature: all logits are divided by it.
      num_items_in_batch: optional global token count replacing ``sum(mask)``.

    Returns:
      ``(loss, metrics)``: ``divergence`` (mean unclipped ``D_t``), ``clip_fraction``, and per
      teacher ``divergence/{perception,reasoning,reference}`` (mean over its tokens) and
      ``tokens/{...}`` (share of valid tokens routed to it).
    """
    fn = "vigos_loss"
    _check_common(fn, student_logits, mask, temperature, token_clip)
    check_shapes(fn, (3, *student_logits.shape), teacher_logits=teacher_logits)
    check_shapes(fn, mask.shape, teacher_index=teacher_index)
    if len(weights) != 3:
        raise ValueError(f"{fn}: weights must have 3 entries (perception, reasoning, reference), got {weights}")

    s_logp = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    index = teacher_index.astype(jnp.int32)
    t = jnp.take_along_axis(jax.lax.stop_gradient(teacher_logits), index[None, :, :, None], axis=0)[0]
    t_logp = jax.nn.log_softmax(t.astype(jnp.float32) / temperature, axis=-1)
    # KL(p || q) with (p, q) = (T, S) for the forward-KL teachers and (S, T) for the reference one.
    reverse = (index == VIGOS_REFERENCE)[..., None]
    divergence = _kl(jnp.where(reverse, s_logp, t_logp), jnp.where(reverse, t_logp, s_logp))

    clipped = divergence if token_clip is None else jnp.minimum(divergence, token_clip)
    loss = _token_mean(jnp.asarray(weights, jnp.float32)[index] * clipped, mask, num_items_in_batch)
    metrics = _clip_metrics(divergence, mask, token_clip)
    n_valid = jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)
    for k, name in enumerate(("perception", "reasoning", "reference")):
        routed = jnp.logical_and(mask, index == k)
        metrics[f"divergence/{name}"] = masked_mean(divergence, routed)
        metrics[f"tokens/{name}"] = jnp.sum(routed.astype(jnp.float32)) / n_valid
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


_VIGOS_PATTERN = r"\s*<description>(.+?)</description>\s*<think>(.+?)</think>"
_VIGOS_TAGS = ("<description>", "</description>", "<think>", "</think>")


def vigos_description_end(text: str, *, answer_block: bool = False) -> int | None:
    """Parse a decoded ViGOS rollout; the character offset just past ``</description>``, or ``None``.

    A rollout is valid when it reads ``<description>D</description><think>R</think>`` followed by
    the answer (whitespace between blocks allowed), each of the four tags occurs exactly once, and
    the answer is a ``\\boxed{...}`` after ``</think>`` (default, as in the ViGOS code) or, with
    ``answer_block=True``, a single ``<answer>...</answer>`` block ending the text.

    Args:
      text: the decoded response (special tokens removed).
      answer_block: require ``<answer>...</answer>`` instead of ``\\boxed{}``.

    Returns:
      ``end`` such that ``text[:end]`` ends with ``</description>`` for a valid rollout, else ``None``.
    """
    tags = _VIGOS_TAGS + (("<answer>", "</answer>") if answer_block else ())
    if any(text.count(tag) != 1 for tag in tags):
        return None
    answer = r"\s*<answer>(.+?)</answer>\s*\Z" if answer_block else r".*\\boxed\{.+\}"
    match = re.match(_VIGOS_PATTERN + answer, text, flags=re.DOTALL)
    if match is None:
        return None
    return match.end(1) + len("</description>")


def vigos_teacher_index(token_char_starts: np.ndarray, description_end: Sequence[int | None]) -> np.ndarray:
    """Per-token ViGOS teacher index from each rollout's parse.

    Row ``b`` is valid when ``description_end[b]`` is an int (see :func:`vigos_description_end`):
    its tokens starting before that character offset get ``VIGOS_PERCEPTION`` and the later ones
    ``VIGOS_REASONING``. Every token of an invalid row (``None``) gets ``VIGOS_REFERENCE``.
    Padding positions receive some index too; the loss mask removes them.

    ``token_char_starts[b, t]`` is the offset in the decoded text where response token ``t``
    starts, e.g. ``len(tokenizer.decode(ids[:t]))``, or ``offset_mapping[t][0]`` from a fast
    tokenizer.

    Args:
      token_char_starts: ``[B, T]`` integer character offsets.
      description_end: length-``B`` sequence of offsets or ``None``.

    Returns:
      ``[B, T]`` int32 teacher index for :func:`vigos_loss`.
    """
    starts = np.asarray(token_char_starts)
    if starts.ndim != 2 or starts.shape[0] != len(description_end):
        raise ValueError(
            f"vigos_teacher_index: token_char_starts {starts.shape} must be [B, T] with B = "
            f"len(description_end) = {len(description_end)}"
        )
    index = np.full(starts.shape, VIGOS_REFERENCE, np.int32)
    for b, end in enumerate(description_end):
        if end is not None:
            index[b] = np.where(starts[b] < end, VIGOS_PERCEPTION, VIGOS_REASONING)
    return index
