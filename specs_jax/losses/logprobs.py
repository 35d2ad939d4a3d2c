"""Per-token log-probabilities of label tokens.

Both functions return ``log softmax(z / temperature)[label]`` for every position, where ``z``
are the next-token logits. Labels are already aligned with the positions (the caller shifts
them: position ``t`` scores token ``t + 1`` of the sequence). Negative labels (HF's ``-100``
ignore index) are looked up as token 0; the losses mask those positions out.

:func:`token_logps_from_hidden` fuses the lm-head matmul with the log-softmax and walks the
sequence in blocks and the vocabulary in chunks with an online logsumexp, so the ``[B, T, V]`` logits (V = 151,936 for
Qwen2.5-VL) are never materialised, neither in the forward nor in the backward pass.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

__all__ = ["token_logps", "token_logps_from_hidden"]


def _safe_labels(labels: jax.Array) -> jax.Array:
    return jnp.where(labels < 0, 0, labels)


def token_logps(logits: jax.Array, labels: jax.Array, temperature: float = 1.0) -> jax.Array:
    """Log-probabilities of ``labels`` under ``softmax(logits / temperature)``.

    ``out[b, t] = z[b, t, labels[b, t]] - logsumexp_v z[b, t, v]`` with ``z = logits / temperature``,
    computed in float32.

    Args:
      logits: ``[B, T, V]`` next-token logits (any float dtype).
      labels: ``[B, T]`` integer token ids aligned with ``logits``.
      temperature: sampling temperature the logits are divided by.

    Returns:
      ``[B, T]`` float32 log-probabilities.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"token_logps: logits shape {logits.shape} does not match labels shape {labels.shape} "
            "(expected logits [B, T, V] and labels [B, T])"
        )
    z = logits.astype(jnp.float32) / temperature
    label_z = jnp.take_along_axis(z, _safe_labels(labels)[..., None], axis=-1)[..., 0]
    return label_z - jax.nn.logsumexp(z, axis=-1)


def _logits_chunk(h: jax.Array, w_chunk: jax.Array, temperature: float) -> jax.Array:
    """``[N, H] x [C, H] -> [N, C]`` float32 logits divided by the temperature."""
    z = jax.lax.dot_general(h, w_chunk, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return z / temperature


def _vocab_chunks(vocab: int, chunk_size: int) -> tuple[int, int, int]:
    """(chunk, number of full chunks, size of the remainder chunk)."""
    chunk = min(chunk_size, vocab)
    return chunk, vocab // chunk, vocab % chunk


def _logsumexp_chunked(h: jax.Array, w: jax.Array, temperature: float, chunk_size: int) -> jax.Array:
    """``logsumexp_v (h @ w.T / temperature)`` for ``h [N, H]``, ``w [V, H]`` with an online logsumexp."""
    chunk, n_full, rem = _vocab_chunks(w.shape[0], chunk_size)

    def update(carry: tuple[jax.Array, jax.Array], w_chunk: jax.Array) -> tuple[jax.Array, jax.Array]:
        m, s = carry
        z = _logits_chunk(h, w_chunk, temperature)
        m_new = jnp.maximum(m, jnp.max(z, axis=-1))
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(z - m_new[:, None]), axis=-1)
        return m_new, s

    def body(j: jax.Array, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        return update(carry, jax.lax.dynamic_slice_in_dim(w, j * chunk, chunk, axis=0))

    n = h.shape[0]
    carry = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32))
    carry = jax.lax.fori_loop(0, n_full, body, carry)
    if rem:
        carry = update(carry, w[n_full * chunk :])
    m, s = carry
    return m + jnp.log(s)


def _sequence_blocks(x: jax.Array, seq_chunk: int) -> jax.Array:
    """``[B, T, ...] -> [nb, B * c, ...]``: block ``j`` holds positions ``[j c, (j + 1) c)`` of every row,
    ``c = min(seq_chunk, T)``, T zero-padded to ``nb c``. The rows stay the leading axis within a block, so a
    batch sharded over rows stays sharded the same way in every block."""
    b, t = x.shape[:2]
    c = min(seq_chunk, t)
    pad = -t % c
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(b, (t + pad) // c, c, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0).reshape((t + pad) // c, b * c, *x.shape[3:])


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _blocked_token_logps(h: jax.Array, w: jax.Array, labels: jax.Array, temperature: float,
                         chunk_size: int) -> jax.Array:
    """``[nb, M]`` log-probs of the token blocks ``h [nb, M, H]``, ``labels [nb, M]``."""
    return _blocked_token_logps_fwd(h, w, labels, temperature, chunk_size)[0]


def _blocked_token_logps_fwd(
    h: jax.Array, w: jax.Array, labels: jax.Array, temperature: float, chunk_size: int
) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array, jax.Array]]:
    label_z = jnp.sum(h.astype(jnp.float32) * jnp.take(w, labels, axis=0).astype(jnp.float32), axis=-1) / temperature
    lse = jax.lax.map(lambda hb: _logsumexp_chunked(hb, w, temperature, chunk_size), h)
    return label_z - lse, (h, w, labels, lse)


def _blocked_token_logps_bwd(
    temperature: float,
    chunk_size: int,
    res: tuple[jax.Array, jax.Array, jax.Array, jax.Array],
    g: jax.Array,
) -> tuple[jax.Array, jax.Array, None]:
    # d out_n / d z_nv = onehot(label_n)_v - softmax(z_n)_v, and z = h w^T / temperature. Block by block, each
    # walking the vocabulary chunks: only [M, chunk] logits exist at a time; padded positions have g = 0.
    h, w, labels, lse = res
    gs = g.astype(jnp.float32) / temperature
    chunk, n_full, rem = _vocab_chunks(w.shape[0], chunk_size)

    def block_grads(dw: jax.Array, block: tuple[jax.Array, ...]) -> tuple[jax.Array, jax.Array]:
        hb, gb, lseb, lb = block
        hb32 = hb.astype(jnp.float32)

        def chunk_grads(dh, dw, start, w_chunk):
            q = gb[:, None] * jnp.exp(_logits_chunk(hb, w_chunk, temperature) - lseb[:, None])  # [M, C]
            dw_chunk = jax.lax.dynamic_slice_in_dim(dw, start, w_chunk.shape[0], axis=0) - jnp.dot(q.T, hb32)
            return dh - jnp.dot(q, w_chunk.astype(jnp.float32)), jax.lax.dynamic_update_slice_in_dim(
                dw, dw_chunk, start, axis=0)

        def body(j, carry):
            return chunk_grads(*carry, j * chunk, jax.lax.dynamic_slice_in_dim(w, j * chunk, chunk, axis=0))

        dh = gb[:, None] * jnp.take(w, lb, axis=0).astype(jnp.float32)  # the label term, then the softmax's
        dh, dw = jax.lax.fori_loop(0, n_full, body, (dh, dw.at[lb].add(gb[:, None] * hb32)))
        if rem:
            dh, dw = chunk_grads(dh, dw, n_full * chunk, w[n_full * chunk :])
        return dw, dh.astype(h.dtype)

    dw, dh = jax.lax.scan(block_grads, jnp.zeros(w.shape, jnp.float32), (h, gs, lse, labels))
    return dh, dw.astype(w.dtype), None


_blocked_token_logps.defvjp(_blocked_token_logps_fwd, _blocked_token_logps_bwd)


def token_logps_from_hidden(
    hidden: jax.Array,
    lm_head_weight: jax.Array,
    labels: jax.Array,
    temperature: float = 1.0,
    chunk_size: int = 8192,
    seq_chunk: int = 1024,
) -> jax.Array:
    """Same as ``token_logps(hidden @ lm_head_weight.T, labels, temperature)``, without the logits.

    The sequence is processed in blocks of ``seq_chunk`` positions (of every row: the rows, which a mesh shards,
    stay whole in each block) and, within a block, the vocabulary in chunks of ``chunk_size`` rows of
    ``lm_head_weight``: the forward pass keeps a running max and sum per token (online logsumexp), and a custom
    VJP recomputes each chunk's logits in the backward pass, so only ``[B * seq_chunk, chunk_size]`` logits exist
    at any time (for the 7B model's 14,336-token RL rows: 7x less than ``[B * T, chunk_size]``).
    Gradients flow to ``hidden`` and ``lm_head_weight``; the matmuls accumulate in float32.

    Memory beyond the inputs: O(B*seq_chunk*chunk_size + B*T*H) floats, plus the ``[V, H]`` weight gradient
    when it is requested. Compute: one extra logits matmul (the backward recomputes the chunks),
    i.e. 4 instead of 3 ``B*T x H x V`` matmuls for value and gradient. The custom VJP supports
    first-order reverse mode (``jax.grad``/``jax.vjp``), not forward mode or higher orders.

    Args:
      hidden: ``[B, T, H]`` final hidden states (after the final norm).
      lm_head_weight: ``[V, H]``, HF layout of ``lm_head.weight`` / ``embed_tokens.weight``.
      labels: ``[B, T]`` integer token ids aligned with ``hidden``.
      temperature: sampling temperature the logits are divided by (a Python number, static).
      chunk_size: vocabulary rows per chunk (static); the last chunk may be smaller.
      seq_chunk: positions per block (static); the last block is zero-padded.

    Returns:
      ``[B, T]`` float32 log-probabilities.
    """
    if hidden.ndim != 3 or lm_head_weight.ndim != 2 or hidden.shape[-1] != lm_head_weight.shape[-1]:
        raise ValueError(
            f"token_logps_from_hidden: hidden {hidden.shape} must be [B, T, H] and lm_head_weight "
            f"{lm_head_weight.shape} must be [V, H] with the same H"
        )
    if hidden.shape[:2] != labels.shape:
        raise ValueError(
            f"token_logps_from_hidden: hidden shape {hidden.shape} does not match labels shape {labels.shape}"
        )
    if chunk_size < 1 or seq_chunk < 1:
        raise ValueError(f"token_logps_from_hidden: chunk_size and seq_chunk must be >= 1, got {chunk_size}, "
                         f"{seq_chunk}")
    b, t, _ = hidden.shape
    out = _blocked_token_logps(_sequence_blocks(hidden, seq_chunk), lm_head_weight,
                               _sequence_blocks(_safe_labels(labels), seq_chunk), float(temperature), chunk_size)
    return jnp.moveaxis(out.reshape(out.shape[0], b, -1), 0, 1).reshape(b, -1)[:, :t]  # [nb, B*c] -> [B, T]
