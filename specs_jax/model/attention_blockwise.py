"""Blockwise (flash-style) attention in pure JAX: O(T) memory, a custom VJP, block skipping.

Forward: the queries are processed one block of ``block_q`` rows at a time (``lax.map``); each block
runs an online softmax (running max ``m``, normaliser ``l``, fp32 accumulator) over the KV blocks
that any of its queries can see, and keeps only the output and the log-sum-exp ``lse`` per query.
Backward (FlashAttention-2): one pass over the KV blocks (``lax.scan``), each visiting the query
blocks that can see it, recomputes ``p = exp(s - lse)`` from the saved ``lse`` and accumulates
``dk, dv`` for the block and ``dq`` in place. Nothing of size ``T x S`` is ever materialised: the
largest temporaries are ``[B, heads, block_q, block_kv]`` scores.

Block skipping: the visible KV blocks of a query block are the span between the first and the last
block pair that may hold a visible key (segment id ranges overlap, causality, ``kv_lengths``; over
the whole batch). Skipping is exact for any segment ids; it saves the most when the ids are sorted
along the sequence (padding around one sequence, the vision tower's consecutive windows / images):
causal attention then visits about half the blocks and window attention only the diagonal ones.

GQA: ``q`` is viewed as ``[B, K, G, T, D]`` (``G = N / K`` query heads per KV head); ``k, v`` stay
``[B, K, S, D]``. Scores and softmax are fp32; ``p`` meets ``v`` in ``v``'s dtype (as the reference).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from specs_jax.model.attention import Segments, query_positions

BLOCK_Q = 512
BLOCK_KV = 512
NEG = -1e30  # finite mask value: a row with no visible key in the visited blocks stays finite (uniform)


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: Segments, *, scale: float,
                        causal: bool, block_q: int | None = None, block_kv: int | None = None) -> jax.Array:
    """Same contract as :func:`specs_jax.model.attention.attention`; ``q [B,T,N,D]``, ``k, v [B,S,K,D]``.
    Block sizes default to the module's ``BLOCK_Q`` / ``BLOCK_KV`` (read at trace time)."""
    b, t, n, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    bq, bk = min(block_q or BLOCK_Q, t), min(block_kv or BLOCK_KV, s)
    tp, sp = -(-t // bq) * bq, -(-s // bk) * bk
    qpos = query_positions(segments, t)
    kv_len = jnp.full((b,), s, jnp.int32)
    if segments.kv_lengths is not None:
        kv_len = jnp.minimum(jnp.asarray(segments.kv_lengths, jnp.int32), s)
    # padded query rows repeat the last real one (they do not widen the block spans; sliced off after),
    # padded keys lie beyond kv_len (never visible)
    edge = lambda x, extra: jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2), mode="edge")
    qseg, qpos = edge(segments.q.astype(jnp.int32), tp - t), edge(qpos, tp - t)
    kseg = edge(segments.kv.astype(jnp.int32), sp - s)
    qh = jnp.pad(q.reshape(b, t, kh, g, d), [(0, 0), (0, tp - t), (0, 0), (0, 0), (0, 0)])
    qh = qh.transpose(0, 2, 3, 1, 4)  # [B, K, G, Tp, D]
    kh_ = jnp.pad(k, [(0, 0), (0, sp - s), (0, 0), (0, 0)]).transpose(0, 2, 1, 3)  # [B, K, Sp, D]
    vh = jnp.pad(v, [(0, 0), (0, sp - s), (0, 0), (0, 0)]).transpose(0, 2, 1, 3)
    out = _flash(qh, kh_, vh, qseg, kseg, qpos, kv_len, causal, float(scale), bq, bk)
    return out.transpose(0, 3, 1, 2, 4)[:, :t].reshape(b, t, n, d)


# --------------------------------------------------------------------------------------------
# core on padded, head-major arrays: q [B,K,G,Tp,D], k/v [B,K,Sp,D], qseg/qpos [B,Tp], kseg [B,Sp]
# --------------------------------------------------------------------------------------------

def _visible(qseg, qpos, kseg, kstart, kv_len, causal):
    """``[B, 1, 1, bq, bk]`` visibility of a block pair (keys ``kstart .. kstart + bk``)."""
    kpos = kstart + jnp.arange(kseg.shape[1], dtype=jnp.int32)
    vis = (qseg[:, :, None] == kseg[:, None, :]) & (kpos[None, None, :] < kv_len[:, None, None])
    if causal:
        vis &= kpos[None, None, :] <= qpos[:, :, None]
    return vis[:, None, None]


def _spans(qseg, qpos, kseg, kv_len, causal, bq, bk):
    """Block pairs that may hold a visible key -> per query block the KV-block span ``[lo, hi)`` and per
    KV block the query-block span (both over the whole batch)."""
    b, tp = qseg.shape
    nq, nk = tp // bq, kseg.shape[1] // bk
    qs, ks = qseg.reshape(b, nq, bq), kseg.reshape(b, nk, bk)
    may = (qs.max(-1)[:, :, None] >= ks.min(-1)[:, None, :]) & (qs.min(-1)[:, :, None] <= ks.max(-1)[:, None, :])
    kstart = jnp.arange(nk, dtype=jnp.int32) * bk
    may &= kstart[None, None, :] < kv_len[:, None, None]
    if causal:
        may &= kstart[None, None, :] <= qpos.reshape(b, nq, bq).max(-1)[:, :, None]
    may = may.any(0)  # [nq, nk]

    def span(m, n):  # first / one past the last True along the last axis, empty -> (0, 0)
        anyv = m.any(-1)
        lo = jnp.argmax(m, -1)
        hi = n - jnp.argmax(m[..., ::-1], -1)
        return jnp.where(anyv, lo, 0).astype(jnp.int32), jnp.where(anyv, hi, 0).astype(jnp.int32)

    return span(may, nk), span(may.T, nq)


def _scores(qi, kj, scale):
    return jnp.einsum("bkgqd,bksd->bkgqs", qi, kj, preferred_element_type=jnp.float32) * scale


def _forward(q, k, v, qseg, kseg, qpos, kv_len, causal, scale, bq, bk):
    b, kh, g, tp, d = q.shape
    nq, nk = tp // bq, k.shape[2] // bk
    single = nq == nk == 1
    (lo, hi), _ = _spans(qseg, qpos, kseg, kv_len, causal, bq, bk)

    def q_block(i):
        qi = jax.lax.dynamic_slice_in_dim(q, i * bq, bq, axis=3)
        qs = jax.lax.dynamic_slice_in_dim(qseg, i * bq, bq, axis=1)
        qp = jax.lax.dynamic_slice_in_dim(qpos, i * bq, bq, axis=1)

        def kv_step(j, carry):
            m, l, acc = carry
            kj = jax.lax.dynamic_slice_in_dim(k, j * bk, bk, axis=2)
            vj = jax.lax.dynamic_slice_in_dim(v, j * bk, bk, axis=2)
            ks = jax.lax.dynamic_slice_in_dim(kseg, j * bk, bk, axis=1)
            s = jnp.where(_visible(qs, qp, ks, j * bk, kv_len, causal), _scores(qi, kj, scale), NEG)
            m_new = jnp.maximum(m, s.max(-1))
            alpha = jnp.exp(m - m_new)
            p = jnp.exp(s - m_new[..., None])
            l = alpha * l + p.sum(-1)
            pv = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(v.dtype), vj, preferred_element_type=jnp.float32)
            return m_new, l, alpha[..., None] * acc + pv

        init = (jnp.full((b, kh, g, bq), NEG, jnp.float32), jnp.zeros((b, kh, g, bq), jnp.float32),
                jnp.zeros((b, kh, g, bq, d), jnp.float32))
        if single:  # one block pair: no loop
            m, l, acc = kv_step(0, init)
        else:
            m, l, acc = jax.lax.fori_loop(lo[i], hi[i], kv_step, init)
        l_safe = jnp.where(l == 0, 1.0, l)
        return (acc / l_safe[..., None]).astype(q.dtype), m + jnp.log(l_safe)

    if nq == 1:
        out, lse = q_block(0)
        return out, lse
    out, lse = jax.lax.map(q_block, jnp.arange(nq))  # [nq, B, K, G, bq, (D)]
    out = jnp.moveaxis(out, 0, 3).reshape(b, kh, g, tp, d)
    lse = jnp.moveaxis(lse, 0, 3).reshape(b, kh, g, tp)
    return out, lse


def _backward(q, k, v, qseg, kseg, qpos, kv_len, out, lse, dout, causal, scale, bq, bk):
    b, kh, g, tp, d = q.shape
    sp = k.shape[2]
    nq, nk = tp // bq, sp // bk
    single = nq == nk == 1
    _, (lo, hi) = _spans(qseg, qpos, kseg, kv_len, causal, bq, bk)
    delta = jnp.einsum("bkgqd,bkgqd->bkgq", dout.astype(jnp.float32), out.astype(jnp.float32))

    def kv_block(dq, j):
        kj = jax.lax.dynamic_slice_in_dim(k, j * bk, bk, axis=2)
        vj = jax.lax.dynamic_slice_in_dim(v, j * bk, bk, axis=2)
        ks = jax.lax.dynamic_slice_in_dim(kseg, j * bk, bk, axis=1)

        def q_step(i, carry):
            dq, dk, dv = carry
            sl = lambda x, axis: jax.lax.dynamic_slice_in_dim(x, i * bq, bq, axis=axis)
            qi, doi, lse_i, delta_i = sl(q, 3), sl(dout, 3), sl(lse, 3), sl(delta, 3)
            vis = _visible(sl(qseg, 1), sl(qpos, 1), ks, j * bk, kv_len, causal)
            s = jnp.where(vis, _scores(qi, kj, scale), NEG)
            p = jnp.exp(s - lse_i[..., None])  # [B, K, G, bq, bk]
            dv = dv + jnp.einsum("bkgqs,bkgqd->bksd", p.astype(doi.dtype), doi, preferred_element_type=jnp.float32)
            dp = jnp.einsum("bkgqd,bksd->bkgqs", doi, vj, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_i[..., None]) * scale
            dk = dk + jnp.einsum("bkgqs,bkgqd->bksd", ds.astype(qi.dtype), qi, preferred_element_type=jnp.float32)
            dqi = jnp.einsum("bkgqs,bksd->bkgqd", ds.astype(kj.dtype), kj, preferred_element_type=jnp.float32)
            dq = jax.lax.dynamic_update_slice_in_dim(dq, sl(dq, 3) + dqi, i * bq, axis=3)
            return dq, dk, dv

        zeros = jnp.zeros((b, kh, bk, d), jnp.float32)
        if single:
            dq, dk, dv = q_step(0, (dq, zeros, zeros))
        else:
            dq, dk, dv = jax.lax.fori_loop(lo[j], hi[j], q_step, (dq, zeros, zeros))
        return dq, (dk, dv)

    dq0 = jnp.zeros((b, kh, g, tp, d), jnp.float32)
    if nk == 1:
        dq, (dk, dv) = kv_block(dq0, 0)
    else:
        dq, (dk, dv) = jax.lax.scan(kv_block, dq0, jnp.arange(nk))  # dk, dv [nk, B, K, bk, D]
        dk = jnp.moveaxis(dk, 0, 2).reshape(b, kh, sp, d)
        dv = jnp.moveaxis(dv, 0, 2).reshape(b, kh, sp, d)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _flash(q, k, v, qseg, kseg, qpos, kv_len, causal, scale, bq, bk):
    return _forward(q, k, v, qseg, kseg, qpos, kv_len, causal, scale, bq, bk)[0]


def _flash_fwd(q, k, v, qseg, kseg, qpos, kv_len, causal, scale, bq, bk):
    out, lse = _forward(q, k, v, qseg, kseg, qpos, kv_len, causal, scale, bq, bk)
    return out, (q, k, v, qseg, kseg, qpos, kv_len, out, lse)


def _flash_bwd(causal, scale, bq, bk, res, dout):
    q, k, v, qseg, kseg, qpos, kv_len, out, lse = res
    dq, dk, dv = _backward(q, k, v, qseg, kseg, qpos, kv_len, out, lse, dout, causal, scale, bq, bk)
    return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
