"""Splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``) behind the attention interface.

The kernel takes one sequence ``q [N, T, D]``, ``k, v [K, S, D]`` (GQA natively), a static
per-head mask (here :class:`CausalMask` or :class:`FullMask`, whose all-masked blocks it skips) and
per-token ``SegmentIds``. This wrapper

- pre-scales ``q`` (the kernel has no scale argument) and pads ``T`` and ``S`` to multiples of 128
  (the kernel's lane width; padded keys get a segment id no query has, padded query rows are
  sliced off; their zero cotangents contribute nothing to the gradients);
- ``vmap``\\ s the kernel over the batch;
- under a mesh (``jax.set_mesh``) runs it in ``shard_map`` over the batch axes (``data``, ``fsdp``)
  and the head axis (``tensor``) where they divide the batch / the KV heads, so each device runs
  the kernel on its own rows and heads (a Pallas call is opaque to XLA's SPMD partitioner);
- off TPU runs the kernel in Pallas interpret mode (``interpret=True``): slow, for tests on CPU.

Segment-id masking is done inside the kernel's blocks; only the static causal mask prunes
blocks. The vision tower (non-causal, many windows) therefore visits every block pair: O(N) memory
but O(N^2) compute over a micro-batch's patches (the blockwise backend skips by segment ranges).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from specs_jax.model.attention import Segments

LANES = 128
PAD_KV_SEGMENT = -(2**30)  # segment id of padded keys: no query has it
BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"


def _block(n: int, cap: int = 512) -> int:
    for size in (cap, 256, LANES):
        if size <= n and n % size == 0:
            return size
    return LANES


@functools.lru_cache(maxsize=64)
def make_kernel(heads: int, t: int, s: int, causal: bool, interpret: bool):
    """A splash MHA/GQA kernel for ``heads`` query heads, ``T x S`` (multiples of 128), cached per shape."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    one = sm.CausalMask((t, s)) if causal else sm.FullMask((t, s))
    mask = sm.MultiHeadMask([one] * heads)
    bq, bk = _block(t), _block(s)
    sizes = sk.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                          block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
    with jax.ensure_compile_time_eval():  # concrete mask arrays, so the kernel can be reused across traces
        return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _local(q, k, v, qseg, kseg, *, causal: bool, interpret: bool):
    """Per-device: ``q [B, N, T, D]`` (scaled, padded), ``k, v [B, K, S, D]``, ``qseg [B, T]``, ``kseg [B, S]``."""
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

    kernel = make_kernel(q.shape[1], q.shape[2], k.shape[2], causal, interpret)
    return jax.vmap(lambda q, k, v, qs, ks: kernel(q, k, v, SegmentIds(qs, ks)))(q, k, v, qseg, kseg)


def _mesh_specs(b: int, kv_heads: int):
    """``(mesh, batch axes, head axis)`` of the ambient mesh that divide the batch / KV heads, or None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    batch = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
    if batch and b % math.prod(mesh.shape[a] for a in batch):
        batch = ()
    head = HEAD_AXIS if HEAD_AXIS in mesh.axis_names and mesh.shape[HEAD_AXIS] > 1 else None
    if head is not None and kv_heads % mesh.shape[head]:
        head = None
    if not batch and head is None:
        return None
    return mesh, (batch or None), head


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: Segments, *, scale: float,
                     causal: bool) -> jax.Array:
    """Same contract as :func:`specs_jax.model.attention.attention` without ``kv_lengths``."""
    if segments.kv_lengths is not None:
        raise ValueError("splash_attention has no cached-decode path (kv_lengths); use xla or blockwise")
    b, t, n, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    tp, sp = -(-t // LANES) * LANES, -(-s // LANES) * LANES
    interpret = jax.default_backend() != "tpu"
    qs = (q.astype(jnp.float32) * scale).astype(q.dtype)
    qs = jnp.pad(qs, [(0, 0), (0, tp - t), (0, 0), (0, 0)]).transpose(0, 2, 1, 3)  # [B, N, Tp, D]
    kp = jnp.pad(k, [(0, 0), (0, sp - s), (0, 0), (0, 0)]).transpose(0, 2, 1, 3)  # [B, K, Sp, D]
    vp = jnp.pad(v, [(0, 0), (0, sp - s), (0, 0), (0, 0)]).transpose(0, 2, 1, 3)
    qseg = jnp.pad(segments.q.astype(jnp.int32), [(0, 0), (0, tp - t)], mode="edge")
    kseg = jnp.pad(segments.kv.astype(jnp.int32), [(0, 0), (0, sp - s)], constant_values=PAD_KV_SEGMENT)
    fn = functools.partial(_local, causal=causal, interpret=interpret)
    sharded = _mesh_specs(b, kh)
    if sharded is not None:
        mesh, batch, head = sharded
        heads, seg = P(batch, head, None, None), P(batch, None)
        fn = jax.shard_map(fn, mesh=mesh, in_specs=(heads, heads, heads, seg, seg), out_specs=heads,
                           check_vma=False)
    out = fn(qs, kp, vp, qseg, kseg)  # [B, N, Tp, D]
    return out.transpose(0, 2, 1, 3)[:, :t].astype(q.dtype)
