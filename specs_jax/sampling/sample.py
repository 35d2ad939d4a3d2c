"""Next-token sampling: temperature, top-k, top-p, min-p, greedy; log-probs of the sampled tokens.

Pure functions of ``logits [R, V]`` (float32); no I/O.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Sampling controls (static: a change recompiles the decode loop).

    ``temperature == 0`` is greedy decoding. The filters apply in HF's order to ``logits / T``:
    ``top_k`` (0 = off) keeps the k largest; ``top_p`` (1 = off) keeps the smallest set of most
    likely tokens whose mass reaches p; ``min_p`` (0 = off) keeps tokens with
    ``p >= min_p * p_max``. Log-probs are always those of the unfiltered ``softmax(logits / T)``
    (``T = 1`` when greedy), i.e. the old-policy log-probs GRPO needs.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """Set to ``-inf`` the logits that top-k / top-p / min-p exclude. ``logits [R, V]`` (already / T)."""
    neg = jnp.asarray(-jnp.inf, logits.dtype)
    if params.top_k > 0:
        kth = jax.lax.top_k(logits, params.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if params.top_p < 1.0:
        sorted_logits = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = mass_before < params.top_p  # the first token is always kept
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, neg, logits)
    if params.min_p > 0.0:
        probs = jax.nn.softmax(logits, axis=-1)
        logits = jnp.where(probs < params.min_p * probs.max(-1, keepdims=True), neg, logits)
    return logits


def sample_tokens(logits: jax.Array, keys: jax.Array, params: SamplingParams, top_probs: int = 0,
                  banned: tuple[int, ...] = ()) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Sample one token per row, row ``r`` with its own key ``keys[r]`` (so a row's draw does not depend on the
    other rows). ``logits [R, V]``, ``keys [R]`` -> ``tokens [R]``, ``logps [R]`` and, when
    ``top_probs > 0``, the ``top_probs`` largest probabilities of ``softmax(logits / T)`` ``[R, k]``.
    ``banned`` token ids are never chosen (their mass still counts in the log-probs)."""
    logits = logits.astype(jnp.float32)
    scaled = logits if params.greedy else logits / params.temperature
    choice = scaled.at[:, list(banned)].set(-jnp.inf) if banned else scaled
    if params.greedy:
        tokens = jnp.argmax(choice, axis=-1)
    else:
        tokens = jax.vmap(jax.random.categorical)(keys, filter_logits(choice, params))
    logprobs = jax.nn.log_softmax(scaled, axis=-1)
    logps = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    top = jax.lax.top_k(jnp.exp(logprobs), top_probs)[0] if top_probs else None
    return tokens.astype(jnp.int32), logps, top
