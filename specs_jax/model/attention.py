"""One attention interface for the whole model, with interchangeable backends.

Every attention of the model (the decoder's causal self-attention, with or without a KV cache,
and the vision tower's window / full attention) calls :func:`attention` with

- ``q [B, T, N, D]``, ``k, v [B, S, K, D]``: grouped-query attention (``N % K == 0``); the KV heads are
  never repeated to ``N``;
- ``causal``: key ``j`` is visible to query ``i`` only when ``j <= pos(i)``;
- :class:`Segments`: per-token segment ids instead of a dense mask. Query ``i`` sees key ``j`` only
  when ``segments.q[b, i] == segments.kv[b, j]``. Padding is a segment of its own (id 0 by the
  model's convention, real tokens 1), so real tokens never see padding and no row is ever empty;
  the same ids express packed sequences and the vision tower's windows / images;
- ``segments.kv_lengths [B]`` (optional, cached decode): only keys ``j < kv_lengths[b]`` exist and the
  ``T`` queries are the last ``T`` of them, ``pos(i) = kv_lengths[b] - T + i``. Without it the
  queries sit at positions ``0 .. T-1`` (self-attention, or a prefill written at the start of a
  longer cache whose later keys causality hides).

Backends (``ModelConfig.attention``, run config ``model.attention``):

- ``xla``: the reference, ``jax.nn.dot_product_attention`` with the dense ``[B, 1, T, S]`` mask built
  *here* from the segment ids (the math of the model before this interface). O(T*S) memory.
- ``blockwise``: pure-JAX flash attention (online softmax over KV blocks, Q blocks in sequence,
  blocks that no query can see are skipped) with a custom VJP that recomputes the probabilities
  in the backward pass: O(T) memory. Portable; the default on CPU.
- ``splash``: the Pallas TPU splash-attention kernel (causal mask + segment ids, GQA), under
  ``shard_map`` over the batch and head axes of the ambient mesh. Off TPU it runs in Pallas
  interpret mode (tests). Default on TPU.
- ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")`` where its constraints hold
  (a CUDA GPU, bf16/fp16, cuDNN's head_dim limits, causal self-attention whose segment ids are
  padding around one contiguous real span), else a logged fallback to ``blockwise``. Default on GPU.
- ``auto``: splash on TPU, cudnn on GPU, blockwise elsewhere (resolved when the model is traced).

A cached decode step (``kv_lengths`` given) on splash/cudnn uses ``xla`` (one query per row: its
scores are O(S)); a ragged paged-attention decode kernel is future work.
"""

from __future__ import annotations

import functools
import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

BACKENDS = ("auto", "xla", "splash", "cudnn", "blockwise")
PADDING_SEGMENT = 0  # the model's segment id of padding tokens (real tokens: 1)


class Segments(NamedTuple):
    """What the kernels need instead of a dense mask (see the module docstring)."""

    q: jax.Array  # [B, T] int32
    kv: jax.Array  # [B, S] int32
    kv_lengths: jax.Array | None = None  # [B] int32: cached decode


def self_segments(segment_ids: jax.Array) -> Segments:
    """Self-attention segments: queries and keys share ``segment_ids [B, T]``."""
    segment_ids = jnp.asarray(segment_ids, jnp.int32)
    return Segments(segment_ids, segment_ids)


def padding_segments(attention_mask: jax.Array) -> Segments:
    """Self-attention of a padded batch: ``attention_mask [B, T]`` (1 real, 0 padding) -> segments
    1 (real) / 0 (padding)."""
    return self_segments(jnp.asarray(attention_mask).astype(jnp.int32))


def resolve_backend(name: str, platform: str | None = None) -> str:
    """``auto`` -> ``splash`` on TPU, ``cudnn`` on GPU, ``blockwise`` elsewhere; others pass through."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of {list(BACKENDS)}")
    if name != "auto":
        return name
    platform = platform or jax.default_backend()
    return {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn", "rocm": "cudnn"}.get(platform, "blockwise")


_LOGGED: set[tuple] = set()


def _log_once(key: tuple, msg: str, *args) -> None:
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.warning(msg, *args)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: Segments | None = None, *, scale: float,
              causal: bool = False, backend: str = "xla") -> jax.Array:
    """Softmax attention ``[B, T, N, D]`` of ``q [B,T,N,D]`` over ``k, v [B,S,K,D]`` (see the module docstring).

    ``segments=None``: one segment (every key visible, up to causality)."""
    b, t, n, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d or n % kh:
        raise ValueError(f"attention: q {q.shape} and k {k.shape} / v {v.shape} do not form [B,T,N,D] / [B,S,K,D] "
                         f"with N a multiple of K")
    if segments is None:
        segments = Segments(jnp.zeros((b, t), jnp.int32), jnp.zeros((b, s), jnp.int32))
    if segments.q.shape != (b, t) or segments.kv.shape != (b, s):
        raise ValueError(f"attention: segment ids q {segments.q.shape} / kv {segments.kv.shape} do not match "
                         f"[B, T] = {(b, t)} / [B, S] = {(b, s)}")
    backend = resolve_backend(backend)
    if backend in ("splash", "cudnn") and segments.kv_lengths is not None:
        _log_once((backend, "decode"), "attention: %s has no cached-decode path (kv_lengths); using xla for the "
                  "decode steps", backend)
        backend = "xla"
    if backend == "xla":
        return xla_attention(q, k, v, segments, scale=scale, causal=causal)
    if backend == "blockwise":
        from specs_jax.model.attention_blockwise import blockwise_attention

        return blockwise_attention(q, k, v, segments, scale=scale, causal=causal)
    if backend == "splash":
        from specs_jax.model.attention_splash import splash_attention

        return splash_attention(q, k, v, segments, scale=scale, causal=causal)
    return cudnn_attention(q, k, v, segments, scale=scale, causal=causal)


# --------------------------------------------------------------------------------------------
# XLA reference
# --------------------------------------------------------------------------------------------

def query_positions(segments: Segments, t: int) -> jax.Array:
    """``[B, T]`` int32 position of each query among the keys (for causality)."""
    b = segments.q.shape[0]
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segments.kv_lengths is None:
        return pos
    return pos + (jnp.asarray(segments.kv_lengths, jnp.int32) - t)[:, None]


def dense_mask(segments: Segments, causal: bool) -> jax.Array:
    """The ``[B, 1, T, S]`` boolean mask the segments describe (the reference backend's input)."""
    t, s = segments.q.shape[1], segments.kv.shape[1]
    mask = segments.q[:, :, None] == segments.kv[:, None, :]
    kpos = jnp.arange(s, dtype=jnp.int32)
    if segments.kv_lengths is not None:
        mask &= kpos[None, None, :] < jnp.asarray(segments.kv_lengths, jnp.int32)[:, None, None]
    if causal:
        mask &= kpos[None, None, :] <= query_positions(segments, t)[:, :, None]
    return mask[:, None]


def xla_attention(q, k, v, segments: Segments, *, scale: float, causal: bool) -> jax.Array:
    """The reference: dense mask + ``jax.nn.dot_product_attention`` (fully masked rows: uniform output)."""
    return jax.nn.dot_product_attention(q, k, v, mask=dense_mask(segments, causal), scale=scale)


# --------------------------------------------------------------------------------------------
# cuDNN (GPU)
# --------------------------------------------------------------------------------------------

def cudnn_unsupported_reason(q, *, causal: bool, self_attention: bool) -> str | None:
    """Why ``jax.nn.dot_product_attention(implementation="cudnn")`` cannot serve this call (checked before
    tracing it; cuDNN's own checks, e.g. the head_dim limit of the GPU, raise while tracing), or None."""
    if jax.default_backend() not in ("gpu", "cuda"):
        return f"the default backend is {jax.default_backend()}, not a CUDA GPU"
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"dtype {q.dtype} (cuDNN flash attention takes bfloat16/float16)"
    if not (causal and self_attention):
        return ("not causal self-attention over one sequence per row (e.g. the vision tower's windows: "
                "jax.nn.dot_product_attention takes sequence lengths, not segment ids)")
    return None


def cudnn_attention(q, k, v, segments: Segments, *, scale: float, causal: bool) -> jax.Array:
    """cuDNN flash attention for causal self-attention of padded rows, else blockwise (logged).

    cuDNN's API takes per-row sequence lengths, not segment ids. When every row's segment ids are
    ``PADDING_SEGMENT`` around one contiguous span of one real id (left or right padding: the model's
    decoder batches; checked at run time), the rows are rolled so the span starts at 0, cuDNN runs with
    ``query_seq_lengths = key_value_seq_lengths = span length`` and the output is rolled back (zero at
    padding positions). Batches that do not have this form take the blockwise path (``lax.cond``)."""
    from specs_jax.model.attention_blockwise import blockwise_attention

    blockwise = lambda q, k, v: blockwise_attention(q, k, v, segments, scale=scale, causal=causal)
    self_attention = q.shape[1] == k.shape[1] and segments.kv_lengths is None
    reason = cudnn_unsupported_reason(q, causal=causal, self_attention=self_attention)
    if reason is None:
        seg = segments.q
        try:
            jax.eval_shape(functools.partial(_cudnn_padded, scale=scale), q, k, v, seg)  # runs cuDNN's checks
        except Exception as e:  # noqa: BLE001 - cuDNN refuses while tracing (version, head_dim, shapes)
            reason = f"cuDNN refused: {type(e).__name__}: {e}"
    if reason is not None:
        _log_once(("cudnn", reason), "attention: cudnn unavailable (%s); falling back to blockwise", reason)
        return blockwise(q, k, v)
    ok = _one_padded_span(segments.q) & jnp.all(segments.q == segments.kv)
    return jax.lax.cond(ok, lambda q, k, v: _cudnn_padded(q, k, v, segments.q, scale=scale), blockwise, q, k, v)


def _one_padded_span(seg: jax.Array) -> jax.Array:
    """True when every row of ``seg [B, T]`` is padding around at most one span of one real segment id."""
    real = seg != PADDING_SEGMENT
    starts = real & ~jnp.pad(real, ((0, 0), (1, 0)))[:, :-1]
    big = jnp.iinfo(jnp.int32).max
    lo = jnp.where(real, seg, big).min(1)
    hi = jnp.where(real, seg, -big).max(1)
    return jnp.all(starts.sum(1) <= 1) & jnp.all((lo == hi) | ~real.any(1))


def _cudnn_padded(q, k, v, seg, *, scale):
    t = q.shape[1]
    real = seg != PADDING_SEGMENT
    length = jnp.maximum(real.sum(1), 1).astype(jnp.int32)
    start = jnp.argmax(real, axis=1).astype(jnp.int32)
    idx = (jnp.arange(t)[None, :] + start[:, None]) % t  # rolled[i] = x[start + i]
    roll = lambda x: jnp.take_along_axis(x, idx[:, :, None, None], axis=1)
    out = jax.nn.dot_product_attention(roll(q), roll(k), roll(v), scale=scale, is_causal=True,
                                       query_seq_lengths=length, key_value_seq_lengths=length,
                                       implementation="cudnn")
    back = (jnp.arange(t)[None, :] - start[:, None]) % t
    out = jnp.take_along_axis(out, back[:, :, None, None], axis=1)
    return jnp.where(real[:, :, None, None], out, 0).astype(q.dtype)


__all__ = ["BACKENDS", "PADDING_SEGMENT", "Segments", "attention", "cudnn_attention", "dense_mask",
           "padding_segments", "query_positions", "resolve_backend", "self_segments", "xla_attention"]
